"""merge_results: order, completeness, later file wins, report."""

import csv
import json
import random

import pytest

from batchpipe import BuildOptions, InputError, build_jsonl, merge_results


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def fake_results(build, answer=lambda cid, body: f"answer to {cid}", skip=(), fail=()):
    """Output lines for every request in the shards (chat endpoint), with usage."""
    lines = []
    for shard in build["shards"]:
        for raw in open(shard["path"], encoding="utf-8"):
            req = json.loads(raw)
            cid = req["custom_id"]
            if cid in skip:
                continue
            if cid in fail:
                lines.append(
                    {
                        "custom_id": cid,
                        "response": {
                            "status_code": 400,
                            "body": {"error": {"message": "bad", "code": "invalid_request"}},
                        },
                        "error": None,
                    }
                )
                continue
            lines.append(
                {
                    "id": "x",
                    "custom_id": cid,
                    "error": None,
                    "response": {
                        "status_code": 200,
                        "body": {
                            "choices": [{"message": {"content": answer(cid, req["body"])}}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                        },
                    },
                }
            )
    return lines


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        for x in lines:
            fh.write(json.dumps(x, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def built(tmp_path):
    rows = [
        {"id": str(i), "zip": f"{i:03d}", "prompt": f"q{i}", "note": "" if i % 2 else 'x,"y"\nz'}
        for i in range(12)
    ]
    rows[3]["prompt"] = ""  # invalid
    rows[5]["prompt"] = "unicode 日本 ✓"
    p = write_csv(tmp_path / "in.csv", rows)
    b = build_jsonl(p, BuildOptions(max_requests_per_batch=4), tmp_path / "build")
    return rows, b, tmp_path


def test_merge_order_completeness_and_report(built):
    rows, b, tmp = built
    lines = fake_results(b, skip={"row-7"}, fail={"row-9"})
    random.Random(1).shuffle(lines)
    out_file = write_jsonl(tmp / "out.jsonl", lines[:6])
    err_file = write_jsonl(
        tmp / "err.jsonl",
        lines[6:]
        + [{"custom_id": "row-11", "response": None, "error": {"code": "batch_expired", "message": "late"}}],
    )
    report = merge_results(
        b["manifest"], [out_file, err_file], tmp / "res" / "results.csv", batch_ids=["batch_1"]
    )
    got = read_csv(tmp / "res" / "results.csv")
    assert len(got) == 12
    for src, res in zip(rows, got, strict=True):
        for k, v in src.items():
            assert res[k] == v  # original columns unchanged, as text
    assert list(got[0]) == [
        "id",
        "zip",
        "prompt",
        "note",
        "response",
        "error",
        "answered_from",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ]
    assert (
        got[0]["response"] == "answer to row-0" and got[0]["error"] == "" and got[0]["total_tokens"] == "12"
    )
    assert (
        got[3]["response"] == ""
        and got[3]["error"] == "not sent: empty prompt (column 'prompt')"
        and got[3]["prompt_tokens"] == ""
    )
    assert got[7]["error"] == "no result returned for this request" and got[7]["response"] == ""
    assert got[9]["error"] == "HTTP 400 invalid_request: bad"
    # row 11 was answered; the batch_expired line after it is a duplicate and never replaces the answer
    assert got[11]["error"] == "" and got[11]["response"] == "answer to row-11"
    assert report["duplicate_results"] == 1 and report["duplicate_ids"] == ["row-11"]
    assert report["rows"] == 12 and report["invalid"] == 1
    assert report["answered"] == 9 and report["failed"] == 2
    assert report["errors_by_code"] == {
        "invalid_input": 1,
        "invalid_request": 1,
        "no_result": 1,
    }
    assert report["tokens"] == {"prompt": 90, "completion": 18, "total": 108}
    assert report["batch_ids"] == ["batch_1"]
    assert report["results_csv"] == str((tmp / "res" / "results.csv").resolve())
    assert json.loads((tmp / "res" / "report.json").read_text()) == report
    assert not [p for p in (tmp / "res").iterdir() if p.name.startswith(".")]  # temp files cleaned


def test_later_file_wins(built):
    rows, b, tmp = built
    first = write_jsonl(tmp / "a.jsonl", fake_results(b, fail={"row-1"}))
    second = write_jsonl(tmp / "b.jsonl", fake_results(b, answer=lambda cid, body: "retried"))
    report = merge_results(tmp / "build", [first, second], tmp / "results.csv")
    got = read_csv(tmp / "results.csv")
    assert got[1]["response"] == "retried" and got[1]["error"] == ""
    assert report["answered"] == 11 and report["failed"] == 0


def test_merge_respects_range_and_id_column(tmp_path):
    rows = [{"key": f"k{i}", "prompt": f"p{i}"} for i in range(10)]
    p = write_csv(tmp_path / "in.csv", rows)
    b = build_jsonl(p, BuildOptions(id_column="key", start_row=2, end_row=6), tmp_path / "build")
    res = write_jsonl(tmp_path / "out.jsonl", fake_results(b))
    report = merge_results(b["manifest"], [res], tmp_path / "results.csv")
    got = read_csv(tmp_path / "results.csv")
    assert [r["key"] for r in got] == ["k2", "k3", "k4", "k5"]
    assert [r["response"] for r in got] == ["answer to k2", "answer to k3", "answer to k4", "answer to k5"]
    assert report["rows"] == 4 and report["answered"] == 4


def test_no_result_files(built):
    _, b, tmp = built
    report = merge_results(b["manifest"], [], tmp / "results.csv")
    assert report["answered"] == 0 and report["failed"] == 11 and report["invalid"] == 1


def test_merge_fatal_errors(built):
    _, b, tmp = built
    with pytest.raises(InputError, match="result file not found"):
        merge_results(b["manifest"], [tmp / "nope.jsonl"], tmp / "results.csv")
    with pytest.raises(InputError, match="build manifest not found"):
        merge_results(tmp / "nowhere", [], tmp / "results.csv")


def test_merge_across_chunks(built, monkeypatch):
    import batchpipe.merge as m

    monkeypatch.setattr(m, "CHUNK_ROWS", 5)
    rows, b, tmp = built
    lines = fake_results(b, skip={"row-10"})
    random.Random(7).shuffle(lines)
    report = merge_results(b["manifest"], [write_jsonl(tmp / "o.jsonl", lines)], tmp / "r.csv")
    got = read_csv(tmp / "r.csv")
    assert [r["id"] for r in got] == [str(i) for i in range(12)]
    assert [bool(r["response"]) for r in got] == [i not in (3, 10) for i in range(12)]
    assert (report["answered"], report["failed"], report["invalid"]) == (10, 1, 1)


def test_csv_changed_since_build(built):
    _, b, tmp = built
    with open(tmp / "in.csv", "a", encoding="utf-8") as fh:
        fh.write("99,099,extra,\n")
    with pytest.raises(InputError, match="changed since the build"):
        merge_results(b["manifest"], [], tmp / "results.csv")
    assert not (tmp / "results.csv").exists()


# -- hostile results and inputs (issue 11) -----------------------------------------------------------
def error_line(cid, status=400):
    body = {"error": {"message": "bad", "code": "invalid_request"}}
    return {"custom_id": cid, "response": {"status_code": status, "body": body}, "error": None}


def test_an_error_after_an_answer_never_replaces_it_and_duplicates_are_counted(built):
    rows, b, tmp = built
    answers = fake_results(b)
    again = [dict(x) for x in answers if x["custom_id"] == "row-2"]  # the same answer twice in one file
    out = write_jsonl(tmp / "out.jsonl", answers + again)
    err = write_jsonl(tmp / "err.jsonl", [error_line("row-1"), error_line("row-4", 500)])
    report = merge_results(b["manifest"], [out, err], tmp / "results.csv")
    got = read_csv(tmp / "results.csv")
    assert [r["response"] for r in got[:5]] == [f"answer to row-{i}" if i != 3 else "" for i in range(5)]
    assert got[1]["error"] == "" and got[4]["error"] == ""
    assert report["answered"] == 11 and report["failed"] == 0
    assert report["duplicate_results"] == 3 and report["duplicate_ids"] == ["row-1", "row-2", "row-4"]
    # an error followed by an answer in a later file (a resubmission) is the normal case, not a duplicate
    first = write_jsonl(tmp / "r0.jsonl", [error_line("row-0", 500)])
    report = merge_results(b["manifest"], [first, write_jsonl(tmp / "r1.jsonl", answers)], tmp / "r.csv")
    assert report["answered"] == 11 and report["duplicate_results"] == 0


def test_rows_swapped_since_the_build_fail_the_merge(built):
    rows, b, tmp = built
    # swap two data rows of the same length: same size, same row count, same header
    src = (tmp / "in.csv").read_bytes()
    a, c = b"1,001,q1,\r\n", b"7,007,q7,\r\n"
    assert a in src and c in src
    swapped = src.replace(a, b"\0").replace(c, a).replace(b"\0", c)
    assert len(swapped) == len(src) and swapped != src
    (tmp / "in.csv").write_bytes(swapped)
    res = write_jsonl(tmp / "out.jsonl", fake_results(b))
    with pytest.raises(InputError, match="selected rows changed since the build"):
        merge_results(b["manifest"], [res], tmp / "results.csv")
    assert not (tmp / "results.csv").exists()
    (tmp / "in.csv").write_bytes(src)  # restored: merges
    assert merge_results(b["manifest"], [res], tmp / "results.csv")["answered"] == 11


def test_a_truncated_or_non_json_line_is_named_with_its_row(built):
    rows, b, tmp = built
    answers = [json.dumps(x) for x in fake_results(b) if x["custom_id"] not in ("row-5", "row-6")]
    cut = json.dumps(next(x for x in fake_results(b) if x["custom_id"] == "row-5"))[:60]
    path = tmp / "out.jsonl"
    path.write_text("\n".join(answers + ["<html>502 Bad Gateway</html>", cut]), encoding="utf-8")
    report = merge_results(b["manifest"], [path], tmp / "results.csv")
    got = read_csv(tmp / "results.csv")
    assert got[5]["error"].startswith("result line unreadable (truncated or not JSON): out.jsonl line 11")
    assert got[6]["error"].startswith("no result returned for this request (1 result line(s) could not")
    assert report["malformed_lines"] == 2 and report["failed"] == 2
    assert report["broken_lines"] == [
        {"file": "out.jsonl", "line": 10, "custom_id": None},
        {"file": "out.jsonl", "line": 11, "custom_id": "row-5"},
    ]
    assert report["errors_by_code"]["broken_result_line"] == 1


def test_answers_that_look_like_formulas_are_escaped_and_inputs_are_not(tmp_path):
    rows = [{"prompt": p, "note": "=1+1"} for p in ("a", "b", "c", "d", "e", "f", "g")]
    p = write_csv(tmp_path / "in.csv", rows)
    b = build_jsonl(p, BuildOptions(), tmp_path / "build")
    answers = ['=HYPERLINK("http://evil","x")', "+1", "-2", "@SUM(A1)", "\tx", "\rx", "plain = fine"]
    lines = fake_results(b, answer=lambda cid, body: answers[int(cid[4:])], fail={"row-6"})
    lines[-1]["response"]["body"]["error"]["message"] = "x"
    res = write_jsonl(tmp_path / "o.jsonl", lines)
    report = merge_results(b["manifest"], [res], tmp_path / "r.csv")
    got = read_csv(tmp_path / "r.csv")
    assert [r["response"] for r in got[:6]] == ["'" + a for a in answers[:6]]
    assert all(r["note"] == "=1+1" for r in got)  # input columns byte for byte
    assert len(got) == 7 and got[6]["error"] == "HTTP 400 invalid_request: x"  # "\r" split no row
    assert report["formula_cells_escaped"] == 6 and report["csv_formula_escape"] is True
    report = merge_results(b["manifest"], [res], tmp_path / "raw.csv", formula_escape=False)
    assert [r["response"] for r in read_csv(tmp_path / "raw.csv")[:6]] == answers[:6]
    assert report["formula_cells_escaped"] == 0


def test_a_lone_carriage_return_in_an_answer_or_a_cell_stays_on_its_row(tmp_path):
    rows = [{"prompt": "a", "note": "left\rright"}, {"prompt": "b", "note": "n"}]
    p = write_csv(tmp_path / "in.csv", rows)
    b = build_jsonl(p, BuildOptions(), tmp_path / "build")
    res = write_jsonl(tmp_path / "o.jsonl", fake_results(b, answer=lambda cid, body: f"x\r{cid}"))
    merge_results(b["manifest"], [res], tmp_path / "r.csv")
    got = read_csv(tmp_path / "r.csv")
    assert [(r["note"], r["response"]) for r in got] == [("left\rright", "x\rrow-0"), ("n", "x\rrow-1")]


@pytest.mark.parametrize(
    "before, after",
    [
        # a row separator moved between rows, a cell separator moved between cells: same size and count
        ("prompt\nTranslate: cat\nTranslate: dog\x1eTranslate: bird\n",
         "prompt\nTranslate: cat\x1eTranslate: dog\nTranslate: bird\n"),
        ("k,prompt\nk1,hello\x1fworld\n", "k,prompt\nk1\x1fhello,world\n"),
    ],
)  # fmt: skip
def test_the_row_digest_cannot_be_fooled_by_separator_characters_in_cells(tmp_path, before, after):
    src = tmp_path / "in.csv"
    src.write_text(before, encoding="utf-8")
    b = build_jsonl(src, BuildOptions(), tmp_path / "build")
    src.write_text(after, encoding="utf-8")
    assert len(after) == len(before)
    with pytest.raises(InputError, match="selected rows changed since the build"):
        merge_results(b["manifest"], [], tmp_path / "results.csv")


def test_a_lone_surrogate_is_kept_as_its_escape_and_invalid_utf8_is_a_broken_line(built):
    rows, b, tmp = built
    lines = [json.dumps(x) for x in fake_results(b) if x["custom_id"] not in ("row-1", "row-2", "row-4")]
    bad = [x for x in fake_results(b) if x["custom_id"] in ("row-1", "row-2", "row-4")]
    bad[0]["response"]["body"]["choices"][0]["message"]["content"] = "half \ud800 a pair"
    lines.append(json.dumps(bad[0]))  # ensure_ascii: the escape \ud800 in the file
    lines.append(json.dumps(bad[1], ensure_ascii=False).replace("answer", "caf\udcff"))
    unknown = {**bad[2], "custom_id": "never-\udc80"}
    path = tmp / "out.jsonl"
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line.encode("utf-8", "surrogateescape") + b"\n")  # \udcff -> the raw byte 0xff
        fh.write(json.dumps(unknown).encode() + b"\n")
    report = merge_results(b["manifest"], [path], tmp / "results.csv")
    got = read_csv(tmp / "results.csv")
    assert got[1]["response"] == "half \\ud800 a pair" and got[1]["error"] == ""  # answered, text kept
    assert got[2]["error"].startswith("result line unreadable")  # not "caf\ufffd" counted as an answer
    assert "\ufffd" not in "".join(r["response"] for r in got)
    assert report["malformed_lines"] == 1 and report["unmatched_results"] == 1


def test_rows_of_a_batch_without_an_outcome_get_its_error_and_answers_stay(built):
    from batchpipe.resubmit import write_unfinished

    rows, b, tmp = built
    shard = b["shards"][1]
    ids = [json.loads(raw)["custom_id"] for raw in open(shard["path"], encoding="utf-8")]
    answered = [x for x in fake_results(b) if x["custom_id"] in ("row-0", ids[1])]  # line 2 was answered
    first = write_jsonl(tmp / "a.jsonl", answered)
    message = "batch batch_x failed validation: invalid_request: bad file"
    by_line = {2: "line 2: invalid", 3: "line 3: invalid_request: The body is not valid."}
    written = write_unfinished(shard["path"], tmp / "u.jsonl", "batch_failed", message, by_line)
    assert written == shard["requests"] == len(ids)
    report = merge_results(tmp / "build", [first, tmp / "u.jsonl"], tmp / "results.csv")
    got = {r["id"]: r for r in read_csv(tmp / "results.csv")}
    assert list(got) == [r["id"] for r in rows]
    row = lambda cid: got[cid.removeprefix("row-")]  # noqa: E731 (ids are the row numbers)
    assert row(ids[1])["response"] == f"answer to {ids[1]}" and row(ids[1])["error"] == ""  # never replaced
    assert row("row-0")["response"] == "answer to row-0"
    assert "line 3: invalid_request: The body is not valid." in row(ids[2])["error"]
    for cid in (ids[0], *ids[3:]):
        assert row(cid)["response"] == "" and message in row(cid)["error"]
        assert "batch_failed" in row(cid)["error"]
    assert report["errors_by_code"]["batch_failed"] == len(ids) - 1


def test_an_unfinished_file_is_whole_or_absent_and_names_each_request_once(tmp_path):
    from batchpipe.resubmit import write_unfinished

    shard = tmp_path / "s.jsonl"
    lines = [b'{"custom_id": "a"}', b"", b'{"custom_id": "b"}', b'{"custom_id": "a"}', b"not json"]
    shard.write_bytes(b"\n".join([*lines, b'{"custom_id": "c"}']))
    n = write_unfinished(shard, tmp_path / "out" / "u.jsonl", "wait_stopped", "m", {3: "third"})
    lines = [json.loads(x) for x in (tmp_path / "out" / "u.jsonl").read_text().splitlines()]
    assert n == 3 and [x["custom_id"] for x in lines] == ["a", "b", "c"]
    assert [x["error"]["message"] for x in lines] == ["m", "third", "m"]
    assert all(x["response"] is None and x["error"]["code"] == "wait_stopped" for x in lines)
    with pytest.raises(FileNotFoundError):
        write_unfinished(tmp_path / "missing.jsonl", tmp_path / "out" / "v.jsonl", "c", "m")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["u.jsonl"]  # no half-written file


# -- the two ways merge reads the CSV ---------------------------------------------------------------------
# Arrow's reader is the fast way; it is used only when the rows' digest proves it read what the build read
# (the csv module's reading), else the csv module reads and decides. Both must give the same files.
TRICKY = (
    "\ufeffid,prompt,zip,note\r\n"
    '001,"quotes ""inside"", commas",007,\r\n'
    '002,"line one\nline two\r\nline three",,"=SUM(A1)"\r\n'
    "\r\n"  # a blank line between rows: not a row
    "003,日本語 🚀 \u2028 naïve,0,tab\there\r\n"
    '004,"lone\rcr",,\r\n'
    "005,  spaces  ,00,\r\n"
)


def _merge_both_ways(tmp_path, monkeypatch, text, options=None, answers=None):
    import pyarrow as pa

    from batchpipe import csvio

    src = tmp_path / "in.csv"
    src.write_bytes(text.encode("utf-8"))
    b = build_jsonl(src, options or BuildOptions(prompt_column="prompt"), tmp_path / "b", allowed_roots=None)
    res = write_jsonl(tmp_path / "o.jsonl", fake_results(b, answer=answers or (lambda cid, body: f"-{cid}")))
    read = []
    real, careful = csvio.arrow_chunks, csvio.iter_chunks

    def spy(*a, **k):
        read.append("arrow")
        return real(*a, **k)

    def spy_careful(*a, **k):
        read.append("csv module")
        return careful(*a, **k)

    monkeypatch.setattr(csvio, "arrow_chunks", spy)
    monkeypatch.setattr(csvio, "iter_chunks", spy_careful)
    fast = merge_results(b["manifest"], [res], tmp_path / "fast" / "results.csv", allowed_roots=None)

    def refuse(*a, **k):
        read.append("refused")
        raise pa.ArrowInvalid("as if Arrow could not read it")
        yield

    monkeypatch.setattr(csvio, "arrow_chunks", refuse)
    slow = merge_results(b["manifest"], [res], tmp_path / "slow" / "results.csv", allowed_roots=None)
    return b, fast, slow, read


def _same_files(tmp_path):
    import pyarrow.parquet as pq

    assert (tmp_path / "fast" / "results.csv").read_bytes() == (
        tmp_path / "slow" / "results.csv"
    ).read_bytes()
    fast = pq.read_table(tmp_path / "fast" / "results.parquet")
    assert fast.equals(pq.read_table(tmp_path / "slow" / "results.parquet"))
    return fast


def test_arrow_and_csv_module_reading_give_the_same_files(tmp_path, monkeypatch):
    b, fast, slow, read = _merge_both_ways(tmp_path, monkeypatch, TRICKY)
    assert read == ["arrow", "refused", "csv module"]
    drop = ("results_csv", "results_parquet", "report")
    assert {k: v for k, v in fast.items() if k not in drop} == {
        k: v for k, v in slow.items() if k not in drop
    }
    table = _same_files(tmp_path)
    rows = read_csv(tmp_path / "fast" / "results.csv")
    assert [r["zip"] for r in rows] == ["007", "", "0", "", "00"]
    assert rows[1]["prompt"] == "line one\nline two\r\nline three" and rows[3]["prompt"] == "lone\rcr"
    assert rows[4]["prompt"] == "  spaces  " and rows[1]["note"] == "=SUM(A1)"  # input cells as they are
    assert [r["response"] for r in rows] == [f"'-row-{i}" for i in range(5)]  # escaped in the CSV only
    assert table.column("response").to_pylist() == [f"-row-{i}" for i in range(5)]
    assert table.column("note").to_pylist() == ["", "=SUM(A1)", "tab\there", "", ""]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        # a short row: the csv module pads it, Arrow refuses it
        ("id,prompt,zip\r\n1,a,007\r\n2,b\r\n3,c,\r\n", ["arrow", "csv module"]),
        # a blank line before the header: Arrow takes the header for a row (the digest differs)
        ("\r\nid,prompt,zip\r\n1,a,007\r\n2,b,x\r\n", ["arrow", "csv module"]),
        # the digest's separators inside cells: Arrow's cells are hashed row by row, and used
        ('id,prompt,zip\r\n1,"a\x1fb",007\r\n2,"c\x1ed",\r\n', ["arrow"]),
    ],
    ids=["short-row", "blank-before-header", "digest-separators"],
)
def test_a_csv_arrow_reads_otherwise_is_read_by_the_csv_module(tmp_path, monkeypatch, text, first):
    b, fast, slow, read = _merge_both_ways(tmp_path, monkeypatch, text)
    assert read == first + ["refused", "csv module"]
    assert fast["answered"] == slow["answered"] == b["valid"]
    _same_files(tmp_path)
    rows = read_csv(tmp_path / "fast" / "results.csv")
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(len(rows))]
    assert rows[0]["zip"] == "007"


def test_arrow_reading_with_an_id_column_and_a_row_range(tmp_path, monkeypatch):
    text = "id,prompt\r\n" + "".join(f'k{i:03d},"p {i}\nx"\r\n' for i in range(50))
    opts = BuildOptions(prompt_column="prompt", id_column="id", start_row=7, end_row=43)
    b, fast, slow, read = _merge_both_ways(tmp_path, monkeypatch, text, opts)
    assert read == ["arrow", "refused", "csv module"] and fast["rows"] == slow["rows"] == 36
    _same_files(tmp_path)
    rows = read_csv(tmp_path / "fast" / "results.csv")
    assert [r["id"] for r in rows] == [f"k{i:03d}" for i in range(7, 43)]
    assert [r["response"] for r in rows] == [f"'-k{i:03d}" for i in range(7, 43)]

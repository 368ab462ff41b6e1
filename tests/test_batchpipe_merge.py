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
    assert got[11]["error"] == "batch_expired: late" and got[11]["response"] == ""
    assert report["rows"] == 12 and report["invalid"] == 1
    assert report["answered"] == 8 and report["failed"] == 3
    assert report["errors_by_code"] == {
        "batch_expired": 1,
        "invalid_input": 1,
        "invalid_request": 1,
        "no_result": 1,
    }
    assert report["tokens"] == {"prompt": 80, "completion": 16, "total": 96}
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

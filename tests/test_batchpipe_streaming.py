"""Streaming build/merge: exact shard cut points, merge over many chunks, unicode round trip,
concurrent image encoding that keeps input order and exact bytes, fast paths equal to the generic ones."""

import csv
import json
import random

import pytest
from PIL import Image

from batchpipe import BuildOptions, build_jsonl, merge_results
from batchpipe import build as build_mod
from batchpipe import merge as merge_mod
from batchpipe.build import _line_template, _request_line
from batchpipe.images import encode_image, image_url_for_cell
from batchpipe.results import iter_outcomes


def write_rows(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def shard_lines(result):
    out = []
    for s in result["shards"]:
        with open(s["path"], "rb") as fh:
            out.append(fh.read().splitlines(keepends=True))
    return out


def answer_line(cid, text, code=200):
    if code != 200:
        return {
            "custom_id": cid,
            "response": {"status_code": code, "body": {"error": {"message": "nope", "code": "bad_thing"}}},
            "error": None,
        }
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": {
            "status_code": 200,
            "request_id": "r",
            "body": {
                "choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            },
        },
        "error": None,
    }


def write_jsonl(path, objs):
    with open(path, "w", encoding="utf-8") as fh:
        for o in objs:
            fh.write(json.dumps(o, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- shard boundaries


def test_shards_cut_by_count_exactly(tmp_path):
    csv_path = write_rows(tmp_path / "in.csv", ["prompt"], [[f"p{i}"] for i in range(10)])
    res = build_jsonl(csv_path, BuildOptions(max_requests_per_batch=3), tmp_path / "b", allowed_roots=None)
    got = [(s["requests"], s["first_row"], s["last_row"]) for s in res["shards"]]
    assert got == [(3, 0, 2), (3, 3, 5), (3, 6, 8), (1, 9, 9)]
    lines = shard_lines(res)
    assert [json.loads(line)["custom_id"] for part in lines for line in part] == [
        f"row-{i}" for i in range(10)
    ]
    for s, part in zip(res["shards"], lines, strict=True):
        assert s["bytes"] == sum(len(x) for x in part)


def test_shards_cut_by_bytes_exactly(tmp_path):
    rnd = random.Random(5)
    prompts = [[f"{i}" + ("x" * rnd.randint(1, 80)) + "é" * rnd.randint(0, 5)] for i in range(60)]
    csv_path = write_rows(tmp_path / "in.csv", ["prompt"], prompts)
    whole = build_jsonl(csv_path, BuildOptions(), tmp_path / "whole", allowed_roots=None)
    (lines,) = shard_lines(whole)
    sizes = [len(x) for x in lines]
    limit = sizes[0] + sizes[1] + sizes[2]  # the first shard is exactly full after row 2
    res = build_jsonl(csv_path, BuildOptions(max_batch_bytes=limit), tmp_path / "b", allowed_roots=None)

    expected, cur, start = [], 0, 0  # greedy: cut before the line that would overflow
    for i, n in enumerate(sizes):
        if cur + n > limit:
            expected.append((start, i - 1, cur))
            start, cur = i, 0
        cur += n
    expected.append((start, len(sizes) - 1, cur))
    assert [(s["first_row"], s["last_row"], s["bytes"]) for s in res["shards"]] == expected
    assert res["shards"][0]["last_row"] == 2 and res["shards"][0]["bytes"] == limit
    assert all(s["bytes"] <= limit for s in res["shards"])
    assert b"".join(line for part in shard_lines(res) for line in part) == b"".join(lines)


def test_shards_cut_by_count_and_bytes_together(tmp_path):
    csv_path = write_rows(tmp_path / "in.csv", ["prompt"], [["a" * (1 + (i % 7) * 30)] for i in range(40)])
    whole = build_jsonl(csv_path, BuildOptions(), tmp_path / "whole", allowed_roots=None)
    sizes = [len(x) for x in shard_lines(whole)[0]]
    limit = max(sizes) * 3
    res = build_jsonl(
        csv_path,
        BuildOptions(max_requests_per_batch=4, max_batch_bytes=limit),
        tmp_path / "b",
        allowed_roots=None,
    )
    expected, cur, count, start = [], 0, 0, 0
    for i, n in enumerate(sizes):
        if count + 1 > 4 or cur + n > limit:
            expected.append((start, i - 1))
            start, cur, count = i, 0, 0
        cur += n
        count += 1
    expected.append((start, len(sizes) - 1))
    assert [(s["first_row"], s["last_row"]) for s in res["shards"]] == expected


# --------------------------------------------------------------------------- fast line = generic line


@pytest.mark.parametrize(
    "opts",
    [
        BuildOptions(),
        BuildOptions(system_prompt='Be "brief"\n✓', max_tokens=5, temperature=0.5, model="o3-mini"),
        BuildOptions(endpoint="/v1/responses", system_prompt="sys", max_tokens=19, temperature=1),
        BuildOptions(endpoint="/v1/embeddings", model="text-embedding-3-small"),
        BuildOptions(extra_body={"seed": 1, "metadata": {"k": "ü"}}),
        BuildOptions(extra_body={"messages": [{"role": "user", "content": "fixed"}]}),  # prompt not in body
    ],
)
def test_line_template_matches_generic_serialisation(opts):
    template = _line_template(opts)
    if opts.extra_body and "messages" in opts.extra_body:
        assert template is None
        return
    head, middle, tail = template
    for cid, prompt in [("row-0", "hi"), ("007", 'a "q"\n\tb\\ 日本 🚀 \u2028 \x01'), ("x" * 300, " é ")]:
        fast = (
            head
            + json.dumps(cid, ensure_ascii=False)
            + middle
            + json.dumps(prompt, ensure_ascii=False)
            + tail
        )
        assert fast.encode("utf-8") == _request_line(opts, cid, prompt, None)


def test_text_build_with_template_and_ids_same_as_generic(tmp_path, monkeypatch):
    rows = [[f"{i:03d}", f"q{i}\n✓", "Zürich"] for i in range(50)] + [["", "x", "y"], ["051", " ", "z"]]
    csv_path = write_rows(tmp_path / "in.csv", ["id", "q", "city"], rows)
    opts = BuildOptions(id_column="id", prompt_template="{q} in {city} {{x}}", max_requests_per_batch=7)
    fast = build_jsonl(csv_path, opts, tmp_path / "fast", allowed_roots=None)
    monkeypatch.setattr(build_mod, "_line_template", lambda o: None)  # force the generic path
    slow = build_jsonl(csv_path, opts, tmp_path / "slow", allowed_roots=None)
    assert shard_lines(fast) == shard_lines(slow)
    assert (
        fast["first_invalid"]
        == slow["first_invalid"]
        == [
            {"row": 50, "line": 102, "column": "id", "error": "empty id"},  # 2 physical lines a row
        ]
    )
    assert (tmp_path / "fast" / "invalid.jsonl").read_bytes() == (
        tmp_path / "slow" / "invalid.jsonl"
    ).read_bytes()


def test_text_build_starts_no_thread_pool(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no pool for a text-only build")

    monkeypatch.setattr(build_mod, "ThreadPoolExecutor", boom)
    csv_path = write_rows(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])
    assert build_jsonl(csv_path, BuildOptions(), tmp_path / "b", allowed_roots=None)["valid"] == 2


# --------------------------------------------------------------------------- merge over many chunks


@pytest.mark.parametrize("id_column", [None, "id"])
def test_merge_order_and_completeness_over_many_chunks(tmp_path, monkeypatch, id_column):
    monkeypatch.setattr(merge_mod, "CHUNK_ROWS", 37)
    monkeypatch.setattr(merge_mod, "INSERT_BATCH", 11)
    monkeypatch.setattr(merge_mod, "CHUNK_BYTES", 300)  # answers spilled by size too
    n = 1000
    rows = [[f"{i:05d}", f"prompt {i}" if i % 97 else "  ", f"{i % 1000:03d}"] for i in range(n)]
    csv_path = write_rows(tmp_path / "in.csv", ["id", "prompt", "zip"], rows)
    b = build_jsonl(
        csv_path,
        BuildOptions(id_column=id_column, max_requests_per_batch=100),
        tmp_path / "b",
        allowed_roots=None,
    )
    assert len(b["shards"]) == 10
    cids = [json.loads(line)["custom_id"] for part in shard_lines(b) for line in part]
    missing = set(cids[5::101])
    failed = set(cids[7::89])
    lines = [
        answer_line(c, f"answer {c} ✓\nsecond", 400 if c in failed else 200) for c in cids if c not in missing
    ]
    # a stale answer in an early file, overridden by a later file
    stale = [answer_line(c, "stale") for c in cids[:50] if c not in missing]
    lines += [answer_line(c, "never matches") for c in ("row-0007", "row-" + "9" * 30, "row-", "row-١")]
    lines.append(answer_line("nobody", "x"))
    rnd = random.Random(9)
    rnd.shuffle(lines)
    files = [write_jsonl(tmp_path / "r0.jsonl", stale)]
    files += [write_jsonl(tmp_path / f"r{k + 1}.jsonl", lines[k::3]) for k in range(3)]
    rep = merge_results(tmp_path / "b", files, tmp_path / "out" / "results.csv", allowed_roots=None)

    out = read_csv(tmp_path / "out" / "results.csv")
    assert [r["id"] for r in out] == [f"{i:05d}" for i in range(n)]
    assert [r["zip"] for r in out] == [f"{i % 1000:03d}" for i in range(n)]
    by_cid = {}
    for i, r in enumerate(out):
        cid = r["id"] if id_column else f"row-{i}"
        by_cid[cid] = r
        if i % 97 == 0:
            assert r["error"] == "not sent: empty prompt (column 'prompt')"
            assert r["response"] == ""
    answered_early = {json.loads(x)["custom_id"] for x in open(files[0], encoding="utf-8")}
    for c in cids:
        r = by_cid[c]
        if c in missing:
            assert r["error"] == merge_mod.NO_RESULT
        elif c in failed and c in answered_early:  # an error never replaces an answer
            assert r["response"] == "stale" and r["error"] == ""
        elif c in failed:
            assert r["response"] == "" and r["error"].startswith("HTTP 400 bad_thing")
        else:
            assert r["response"] == f"answer {c} ✓\nsecond"
            assert (r["error"], r["prompt_tokens"], r["total_tokens"]) == ("", "3", "7")
    invalid = (n + 96) // 97
    assert rep["rows"] == n
    assert rep["invalid"] == invalid
    failed_late = failed - answered_early
    assert failed_late != failed  # the case of an error after an answer is in the test
    assert rep["answered"] == len(cids) - len(missing) - len(failed_late)
    assert rep["failed"] == len(missing) + len(failed_late)
    assert rep["errors_by_code"] == {
        "bad_thing": len(failed_late),
        "invalid_input": invalid,
        "no_result": len(missing),
    }
    assert rep["unmatched_results"] == 5
    assert rep["tokens"]["total"] == 7 * (len(cids) - len(missing) - len(failed_late))
    # every early answer was followed by another line for its id: each counts once as a duplicate
    assert rep["duplicate_results"] == len(answered_early)


def test_merge_fast_result_parsing_equals_iter_outcomes(tmp_path):
    ok = answer_line("row-1", "hi")
    objs = [
        ok,
        {**ok, "custom_id": 5},
        {**ok, "response": {**ok["response"], "body": json.dumps(ok["response"]["body"])}},
        {
            **ok,
            "response": {
                "status_code": 200,
                "body": {"choices": [{"message": {"content": [{"text": "a"}]}}]},
            },
        },
        {**ok, "response": {"status_code": 200, "body": {"choices": [{"message": {"refusal": "no"}}]}}},
        {**ok, "response": {"status_code": 200, "body": {"choices": {"0": 1}}}},
        {**ok, "response": {"status_code": 200, "body": {"choices": [{"message": {"content": ""}}]}}},
        {
            **ok,
            "response": {
                "status_code": 200,
                "body": {"choices": [{"message": {"content": "x"}}], "usage": 3},
            },
        },
        {
            **ok,
            "response": {
                "status_code": 200,
                "body": {
                    "choices": [{"message": {"content": "x"}}],
                    "usage": {"prompt_tokens": True, "completion_tokens": 1.5, "total_tokens": 2},
                },
            },
        },
        {"custom_id": "row-2", "response": None, "error": {"code": "batch_expired", "message": "late"}},
        {"custom_id": "row-3", "response": {"status_code": 500, "body": "oops"}, "error": None},
        [1, 2],
    ]
    path = tmp_path / "r.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for o in objs:
            fh.write(json.dumps(o) + "\n")
        fh.write("\n{not json\n")
    for endpoint in ("/v1/chat/completions", "/v1/responses"):
        broken = merge_mod._Broken()
        fast = list(merge_mod._iter_records([path], endpoint, broken))
        ref = [
            (
                o.custom_id,
                (o.response, o.error, o.error_code, o.prompt_tokens, o.completion_tokens, o.total_tokens),
            )
            for o in iter_outcomes([path], endpoint)
        ]
        assert [f[0] for f in fast] == [r[0] for r in ref if r[0] is not None]
        assert [f[1][:-1] for f in fast] == [r[1] for r in ref if r[0] is not None]  # [-1]: file index
        assert broken.count == sum(1 for r in ref if r[0] is None)  # [1, 2] and {not json: counted


# --------------------------------------------------------------------------- unicode round trip


def test_unicode_and_newlines_survive_build_and_merge(tmp_path):
    prompts = [
        "héllo wörld",
        "line one\nline two\r\nline three",
        'quotes "inside", commas, and ; semicolons',
        "日本語 テキスト 🚀 \u2028 sep",
        "tab\there \\ backslash",
    ]
    rows = [[f"{i:03d}", p, "007"] for i, p in enumerate(prompts)]
    csv_path = write_rows(tmp_path / "in.csv", ["id", "prompt", "zip"], rows)
    b = build_jsonl(csv_path, BuildOptions(id_column="id"), tmp_path / "b", allowed_roots=None)
    reqs = [json.loads(line) for part in shard_lines(b) for line in part]
    assert [r["body"]["messages"][-1]["content"] for r in reqs] == prompts
    raw = b"".join(line for part in shard_lines(b) for line in part)
    assert "日本語".encode() in raw and b"\\u" not in raw.replace(b"\\u2028", b"")
    answers = {r["custom_id"]: "echo: " + r["body"]["messages"][-1]["content"] for r in reqs}
    res = write_jsonl(tmp_path / "r.jsonl", [answer_line(c, a) for c, a in reversed(answers.items())])
    merge_results(tmp_path / "b", [res], tmp_path / "m" / "results.csv", allowed_roots=None)
    out = read_csv(tmp_path / "m" / "results.csv")
    assert [r["prompt"] for r in out] == prompts
    assert [r["id"] for r in out] == ["000", "001", "002", "003", "004"]
    assert {r["zip"] for r in out} == {"007"}
    assert [r["response"] for r in out] == ["echo: " + p for p in prompts]


# --------------------------------------------------------------------------- concurrent images


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rnd = random.Random(3)
    names = []
    for k in range(12):
        size = 8 + 9 * k
        im = Image.new("RGB", (size, size))
        im.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(size * size)])
        name = f"i{k}." + ("png" if k % 2 else "jpg")
        im.save(d / name)
        names.append(f"imgs/{name}")
    (d / "notimage.png").write_bytes(b"plain text, not an image")
    return names


@pytest.mark.parametrize("budget", [None, 1, 5000])
def test_concurrent_images_keep_order_and_exact_bytes(tmp_path, image_dir, monkeypatch, budget):
    if budget is not None:
        monkeypatch.setattr(build_mod, "IMAGE_BYTES_IN_FLIGHT", budget)
    rows = []
    for i in range(300):
        if i % 41 == 5:
            cell = "imgs/missing.png"
        elif i % 53 == 7:
            cell = "imgs/notimage.png"
        elif i % 29 == 3:
            cell = ""
        elif i % 31 == 4:
            cell = "https://example.com/x.png"
        else:
            cell = image_dir[(i * 7) % len(image_dir)]
        prompt = "" if i % 67 == 9 else f"describe {i} ✓"
        rows.append([prompt, cell])
    csv_path = write_rows(tmp_path / "in.csv", ["prompt", "image"], rows)
    opts = BuildOptions(image_column="image", max_requests_per_batch=40)
    res = build_jsonl(csv_path, opts, tmp_path / "b", allowed_roots=None)

    # sequential reference, row by row, with the library's own single-image functions
    expected_lines, expected_invalid = [], []
    for i, (prompt, cell) in enumerate(rows):
        if prompt.strip() == "":
            expected_invalid.append((i, "prompt", "empty prompt"))
            continue
        try:
            url = image_url_for_cell(cell, tmp_path, opts.max_image_mb)
        except Exception as exc:  # RowError
            expected_invalid.append((i, "image", exc.message))
            continue
        expected_lines.append(_request_line(opts, f"row-{i}", prompt, url))
    got = [line for part in shard_lines(res) for line in part]
    assert got == expected_lines
    inv = [json.loads(x) for x in (tmp_path / "b" / "invalid.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["row"], r["column"], r["error"]) for r in inv] == expected_invalid
    assert res["valid"] == len(expected_lines) and res["invalid"] == len(expected_invalid)
    # exact bytes: the data URL decodes to the file's bytes
    first = json.loads(got[0])["body"]["messages"][0]["content"][1]["image_url"]["url"]
    assert first == encode_image(tmp_path / rows[0][1])[0]


def test_image_pipeline_bounds_bytes_in_flight(tmp_path, image_dir, monkeypatch):
    """With a tiny budget, at most one image is pending beyond the budget at any time."""
    monkeypatch.setattr(build_mod, "IMAGE_BYTES_IN_FLIGHT", 1)
    peak = 0
    real = build_mod.image_url_for_cell
    active = []

    def spy(cell, *a, **k):
        nonlocal peak
        active.append(cell)
        peak = max(peak, len(active))
        try:
            return real(cell, *a, **k)
        finally:
            active.remove(cell)

    monkeypatch.setattr(build_mod, "image_url_for_cell", spy)
    csv_path = write_rows(
        tmp_path / "in.csv", ["prompt", "image"], [[f"p{i}", image_dir[i % 12]] for i in range(60)]
    )
    res = build_jsonl(csv_path, BuildOptions(image_column="image"), tmp_path / "b", allowed_roots=None)
    assert res["valid"] == 60
    assert peak == 1

"""Each distinct request sent once: the build leaves out a row whose request repeats an earlier row's (same
body; images by their bytes), and the merge gives it that row's answer (``answered_from: row N``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from batchpipe import BuildOptions, build_jsonl, merge_results


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def sent(build: dict) -> list[dict]:
    return [json.loads(x) for s in build["shards"] for x in Path(s["path"]).read_text("utf-8").splitlines()]


def line(cid: str, body_of: dict[str, dict], status: int = 200) -> dict:
    body = body_of[cid]
    prompt = body["messages"][-1]["content"]
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    if status != 200:
        return {"custom_id": cid, "response": {"status_code": status, "body": {"error": {"message": "no",
                "code": "bad_thing"}}}, "error": None}  # fmt: skip
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    choices = [{"message": {"content": f"answer to {text}"}, "finish_reason": "stop"}]
    return {"custom_id": cid, "response": {"status_code": 200, "body": {"choices": choices, "usage": usage}},
            "error": None}  # fmt: skip


def answer_all(build: dict, path: Path, fail: set[str] = frozenset(), skip: set[str] = frozenset()) -> Path:
    bodies = {r["custom_id"]: r["body"] for r in sent(build)}
    with open(path, "w", encoding="utf-8") as fh:
        for cid in bodies:
            if cid not in skip:
                fh.write(json.dumps(line(cid, bodies, 400 if cid in fail else 200)) + "\n")
    return path


@pytest.mark.parametrize("id_column", [None, "id"])
def test_a_repeated_request_is_sent_once_and_every_row_gets_its_answer(tmp_path, monkeypatch, id_column):
    import batchpipe.merge as merge_mod

    monkeypatch.setattr(merge_mod, "CHUNK_ROWS", 4)  # sources in earlier chunks than their copies
    prompts = ["a", "b", "a", "c", "", "b", "d", "a", "e", "c", "f", "g", "b"]
    rows = [[f"k{i:02d}", p] for i, p in enumerate(prompts)]
    src = write_csv(tmp_path / "in.csv", ["id", "prompt"], rows)
    b = build_jsonl(src, BuildOptions(id_column=id_column), tmp_path / "b", allowed_roots=None)
    assert b["valid"] == 12 and b["invalid"] == 1 and b["duplicates"] == 5
    assert [r["body"]["messages"][-1]["content"] for r in sent(b)] == ["a", "b", "c", "d", "e", "f", "g"]
    cid = (lambda i: f"k{i:02d}") if id_column else (lambda i: f"row-{i}")
    dups = [json.loads(x) for x in (tmp_path / "b" / "duplicates.jsonl").read_text().splitlines()]
    assert dups[0] == {"row": 2, "custom_id": cid(2), "of_row": 0, "of": cid(0)}
    assert [(d["row"], d["of_row"]) for d in dups] == [(2, 0), (5, 1), (7, 0), (9, 3), (12, 1)]
    # "c" (row 3) fails: its copy on row 9 gets the same error; "g" (row 11) gets no result line
    res = answer_all(b, tmp_path / "out.jsonl", fail={cid(3)}, skip={cid(11)})
    report = merge_results(b["manifest"], [res], tmp_path / "r" / "results.csv", allowed_roots=None)
    out = read_csv(tmp_path / "r" / "results.csv")
    assert [r["id"] for r in out] == [r[0] for r in rows]
    for i, (r, p) in enumerate(zip(out, prompts, strict=True)):
        copy_of = {2: 0, 5: 1, 7: 0, 9: 3, 12: 1}.get(i)
        assert r["answered_from"] == ("" if p == "" else f"row {copy_of}" if copy_of is not None else "batch")
        if p in ("a", "b", "d", "e", "f"):
            assert (r["response"], r["error"]) == (f"answer to {p}", ""), (i, r)
        if copy_of is not None:
            assert r["total_tokens"] == ""  # billed once, on the row that sent it
        elif p and p not in ("c", "g"):
            assert r["total_tokens"] == "10"
    assert out[3]["error"].startswith("HTTP 400 bad_thing") and out[9]["error"] == out[3]["error"]
    assert out[11]["error"] == merge_mod.NO_RESULT and out[4]["error"].startswith("not sent: empty prompt")
    assert report["answered_from_rows"] == 5 and report["answered"] == 9
    assert report["tokens"]["total"] == 10 * 5  # a, b, d, e, f: each billed once
    assert report["errors_by_code"] == {"bad_thing": 2, "invalid_input": 1, "no_result": 1}
    assert report["unmatched_results"] == 0 and report["duplicate_results"] == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "r" / "results.parquet").to_pylist()
    assert [t["answered_from"] for t in table] == [r["answered_from"] or None for r in out]


def test_without_dedupe_every_row_is_sent(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["same"], ["same"], ["same"]])
    b = build_jsonl(src, BuildOptions(dedupe=False), tmp_path / "b", allowed_roots=None)
    assert b["duplicates"] == 0 and len(sent(b)) == 3 and not (tmp_path / "b" / "duplicates.jsonl").exists()
    report = merge_results(
        b["manifest"], [answer_all(b, tmp_path / "o.jsonl")], tmp_path / "r.csv", allowed_roots=None
    )
    assert [r["answered_from"] for r in read_csv(tmp_path / "r.csv")] == ["batch"] * 3
    assert report["answered_from_rows"] == 0 and report["tokens"]["total"] == 30


def test_images_are_the_same_request_by_their_bytes_not_their_paths(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    (tmp_path / "copy-of-red.png").write_bytes((tmp_path / "red.png").read_bytes())
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    rows = [
        ["What?", "red.png"],
        ["What?", "copy-of-red.png"],
        ["What?", "blue.png"],
        ["What?", str(tmp_path / "red.png")],
    ]
    src = write_csv(tmp_path / "in.csv", ["prompt", "image"], rows)
    b = build_jsonl(src, BuildOptions(image_column="image"), tmp_path / "b", allowed_roots=None)
    assert len(sent(b)) == 2 and b["duplicates"] == 2  # red (three paths to one picture) and blue
    report = merge_results(
        b["manifest"], [answer_all(b, tmp_path / "o.jsonl")], tmp_path / "r.csv", allowed_roots=None
    )
    out = read_csv(tmp_path / "r.csv")
    assert [r["answered_from"] for r in out] == ["batch", "row 0", "batch", "row 0"]
    assert out[1]["response"] == out[0]["response"] != out[2]["response"]
    assert report["answered"] == 4
    from batchpipe.report import finish_report

    finish_report(tmp_path / "r.csv", report)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<p class="note" id="sent-once">2 row(s) repeat an earlier row' in page


def test_the_estimate_counts_what_is_sent_and_what_repeating_rows_did_not_cost(tmp_path):
    from batchpipe.estimate import estimate_build, format_estimate

    prompts = [["alpha beta"], ["gamma"], ["alpha beta"], ["alpha beta"], ["delta epsilon zeta"], ["gamma"]]
    src = write_csv(tmp_path / "in.csv", ["prompt"], prompts)
    once = estimate_build(
        build_jsonl(src, BuildOptions(max_tokens=50), tmp_path / "a", allowed_roots=None)["manifest"]
    )
    every = estimate_build(
        build_jsonl(src, BuildOptions(max_tokens=50, dedupe=False), tmp_path / "b", allowed_roots=None)[
            "manifest"
        ]
    )
    assert (once["requests"], every["requests"]) == (3, 6)
    saved = once["duplicates"]
    assert saved["rows"] == 3 and saved["prompt_tokens"] == every["prompt_tokens"] - once["prompt_tokens"] > 0
    assert saved["output_tokens_expected"] == every["output_tokens_expected"] - once["output_tokens_expected"]
    assert saved["batch_usd_expected"] == pytest.approx(  # each figure rounded to 6 decimals
        every["cost"]["batch"]["expected"] - once["cost"]["batch"]["expected"], abs=2e-6
    )
    assert "| rows answered from a repeated request | 3 (not sent: about $" in format_estimate(once)

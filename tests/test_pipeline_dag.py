"""Full runs of ``openai_batch_pipeline`` with ``dag.test()`` against the local batch server over
real HTTP with the real ``openai`` client."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, local_openai

SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    config = {"validating_seconds": 0.2, "in_progress_seconds": 0.5, "finalizing_seconds": 0.2}
    with local_openai(tmp_path_factory.mktemp("server"), "sk-local-test-secret", config) as srv:
        yield srv


def run(dag, conf: dict):
    dr = dag.test(run_conf=conf)
    tis = dr.get_task_instances()
    states = {(ti.task_id, ti.map_index): ti.state for ti in tis}
    run.tries = {(ti.task_id, ti.map_index): ti.try_number for ti in tis}
    return dr, states


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def results_path(out: Path, stem: str) -> Path:
    found = list((out / stem).glob("*/results.csv"))
    assert len(found) == 1, found
    return found[0]


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_sample_csv_every_row_back_once_in_order(dag, server, tmp_path):
    data = tmp_path / "in"
    shutil.copytree(SAMPLE, data)
    out = tmp_path / "out"
    before = len(server.client().batches.list(limit=100).data)
    dr, states = run(
        dag,
        {
            "input_csv": str(data / "questions.csv"),
            "output_dir": str(out),
            "prompt_column": "prompt",
            "image_column": "image",
            "check_interval": 1,
        },
    )
    assert dr.state == "success", states
    assert set(run.tries.values()) == {1}, run.tries  # nothing needed a retry
    results = results_path(out, "questions")
    rows = read_csv(results)
    source = read_csv(data / "questions.csv")
    # every row exactly once, in input order, original columns unchanged as text
    assert [r["id"] for r in rows] == [r["id"] for r in source]
    for got, orig in zip(rows, source, strict=True):
        assert {k: got[k] for k in orig} == orig
    assert rows[1]["zip"] == "007" and rows[3]["zip"] == ""
    by_id = {r["id"]: r for r in rows}
    # text rows: each answered by its own response although the service shuffles its output
    for orig in source:
        row = by_id[orig["id"]]
        if orig["prompt"] and not orig["image"] and "[[reject]]" not in orig["prompt"]:
            assert row["response"] == "ECHO: " + orig["prompt"], orig["id"]
            assert row["error"] == ""
            assert int(row["prompt_tokens"]) > 0 and int(row["total_tokens"]) > 0
    # images go out as data URLs with the exact bytes and MIME type
    assert f"[image image/png sha256={sha16(data / 'images/red_circle.png')}]" in by_id["q003"]["response"]
    assert (
        f"[image image/jpeg sha256={sha16(data / 'images/green_triangle.jpg')}]" in by_id["q010"]["response"]
    )
    # rejected by the service: error with its HTTP status, no response
    assert by_id["q014"]["response"] == "" and "400" in by_id["q014"]["error"]
    # bad rows were not sent and say why
    assert by_id["q008"]["response"] == "" and "prompt" in by_id["q008"]["error"].lower()
    assert by_id["q012"]["response"] == "" and "does_not_exist.png" in by_id["q012"]["error"]
    report = json.loads((results.parent / "report.json").read_text())
    assert report["rows"] == 30
    assert report["invalid"] == 2 and report["failed"] == 1 and report["answered"] == 27
    assert len(report["batch_ids"]) == 1
    assert len(server.client().batches.list(limit=100).data) == before + 1
    # temporary files removed after a successful merge (keep_temp_files defaults to false)
    assert not (results.parent / "work").exists()
    assert sorted(p.name for p in results.parent.iterdir()) == [
        "estimate.json",
        "estimate.md",
        "report.html",
        "report.json",
        "results.csv",
        "results.parquet",
    ]


def test_25_rows_split_into_4_batches_and_one_results_csv(dag, server, tmp_path):
    src = tmp_path / "many.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "n"])
        for i in range(25):
            writer.writerow([f"question number {i}", f"{i:03d}"])
    out = tmp_path / "out"
    before = {b.id for b in server.client().batches.list(limit=100).data}
    dr, states = run(
        dag,
        {
            "input_csv": str(src),
            "output_dir": str(out),
            "max_requests_per_batch": 7,
            "check_interval": 1,
            "keep_temp_files": True,
        },
    )
    assert dr.state == "success", states
    assert sorted(i for (task, i) in states if task == "wait_for_batch") == [0, 1, 2, 3]
    new = [b for b in server.client().batches.list(limit=100).data if b.id not in before]
    assert len(new) == 4
    assert sorted(b.request_counts.total for b in new) == [4, 7, 7, 7]
    assert all(b.metadata["dag_id"] == "openai_batch_pipeline" for b in new)
    results = results_path(out, "many")
    rows = read_csv(results)
    assert [r["n"] for r in rows] == [f"{i:03d}" for i in range(25)]
    assert all(r["response"] == f"ECHO: question number {int(r['n'])}" for r in rows)
    report = json.loads((results.parent / "report.json").read_text())
    assert report["answered"] == 25 and sorted(report["batch_ids"]) == sorted(b.id for b in new)
    # keep_temp_files: the shard files and downloads stay
    assert len(list((results.parent / "work").glob("shard-*.jsonl"))) == 4


def test_row_range_selects_rows(dag, server, tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "in"
    shutil.copytree(SAMPLE, data)
    dr, states = run(
        dag,
        {"input_csv": str(data / "questions.csv"), "output_dir": str(out), "start_row": 2, "end_row": 5,
         "image_column": "image", "check_interval": 1},
    )  # fmt: skip
    assert dr.state == "success", states
    rows = read_csv(results_path(out, "questions"))
    assert [r["id"] for r in rows] == ["q003", "q004", "q005"]


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"prompt_column": "question"}, "column 'question'"),
        ({"image_column": "picture"}, "column 'picture'"),
        ({"start_row": 40}, "row"),
    ],
)
def test_bad_input_fails_validate_before_any_upload(dag, server, tmp_path, conf, expected, capfd):
    data = tmp_path / "in"
    shutil.copytree(SAMPLE, data)
    files_before = len(server.client().files.list().data)
    dr, states = run(dag, {"input_csv": str(data / "questions.csv"), "output_dir": str(tmp_path), **conf})
    assert dr.state == "failed"
    assert states[("validate_csv", -1)] == "failed"
    assert states[("build_jsonl", -1)] == "upstream_failed"
    assert len(server.client().files.list().data) == files_before
    logged = "".join(capfd.readouterr())
    assert "AirflowFailException" in logged and "questions.csv" in logged and expected in logged


def test_unparsable_csv_fails_naming_the_file(dag, server, tmp_path, capfd):
    bad = tmp_path / "broken.csv"
    bad.write_bytes(b'prompt,x\n"unterminated quote,1\n')
    dr, states = run(dag, {"input_csv": str(bad), "output_dir": str(tmp_path)})
    assert dr.state == "failed" and states[("validate_csv", -1)] == "failed"
    assert "broken.csv" in "".join(capfd.readouterr())


def test_no_sendable_request_still_lands_every_row_with_its_error(dag, server, tmp_path):
    # The row passes validation but its request line is larger than a batch file may be:
    # build keeps it aside, no batch is created, and merge still writes the row with the reason.
    src = tmp_path / "huge.csv"
    src.write_text("prompt\n" + "word " * 400 + "\n", encoding="utf-8")
    batches_before = len(server.client().batches.list(limit=100).data)
    dr, states = run(
        dag, {"input_csv": str(src), "output_dir": str(tmp_path / "out"), "max_batch_bytes": 1000}
    )
    assert dr.state == "success", states
    assert states[("merge", -1)] == "success"
    rows = read_csv(results_path(tmp_path / "out", "huge"))
    assert len(rows) == 1 and rows[0]["response"] == "" and "1000" in rows[0]["error"]
    assert len(server.client().batches.list(limit=100).data) == batches_before


def test_25_rows_of_which_2_repeat_earlier_rows_send_23_requests(dag, server, tmp_path):
    # Each distinct request is sent once (dedupe, on by default): rows 10 and 20 repeat rows 3 and 7
    # exactly (prompt and image); row 21 has row 3's prompt with another image: another request.
    # (The same image bytes under another file name are the same request: test_dedupe.py.)
    data = tmp_path / "in"
    shutil.copytree(SAMPLE / "images", data / "images")
    pics = ["images/red_circle.png", "images/green_triangle.jpg", "images/blue_square.png", ""]
    rows = [[f"r{i:02d}", f"What is in picture {i}?", pics[i % 4]] for i in range(25)]
    rows[10][1:] = rows[3][1:]
    rows[20][1:] = rows[7][1:]
    rows[21][1:] = [rows[3][1], "images/yellow_star.jpg"]
    src = data / "pictures.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["id", "prompt", "image"], *rows])
    out = tmp_path / "out"
    before = {b.id for b in server.client().batches.list(limit=100).data}
    dr, states = run(
        dag, {"input_csv": str(src), "output_dir": str(out), "image_column": "image", "check_interval": 1}
    )
    assert dr.state == "success", states
    new = [b for b in server.client().batches.list(limit=100).data if b.id not in before]
    assert [b.request_counts.total for b in new] == [23]  # 25 rows, 2 of them repeats
    got = read_csv(results_path(out, "pictures"))
    assert [r["id"] for r in got] == [r[0] for r in rows]
    copies = {10: 3, 20: 7}
    for i, (row, (_, prompt, pic)) in enumerate(zip(got, rows, strict=True)):
        assert row["response"].startswith(f"ECHO: {prompt}"), (i, row)  # its own answer, to its own request
        if pic:
            assert f"sha256={sha16(data / pic)}]" in row["response"], (i, row)
        assert row["answered_from"] == (f"row {copies[i]}" if i in copies else "batch")
        assert (row["total_tokens"] == "") == (i in copies)  # billed once, on the row that sent it
    assert got[10]["response"] == got[3]["response"] and got[21]["response"] != got[3]["response"]
    report = json.loads((results_path(out, "pictures").parent / "report.json").read_text())
    assert report["answered"] == 25 and report["answered_from_rows"] == 2
    estimate = json.loads((results_path(out, "pictures").parent / "estimate.json").read_text())
    assert estimate["requests"] == 23 and estimate["duplicates"]["rows"] == 2

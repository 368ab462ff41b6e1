"""Hostile inputs and a lying service (issue 11): nothing lost, nothing on the wrong row. Whole runs with
``dag.test()`` against the local batch server, plus the Airflow-layer helpers they rely on."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import pytest

from conftest import run_pipeline

SECRET = "sk-hostile-tests-secret-51f0"


def run(dag, tmp_path, csv_path, **conf):
    dr, tis = run_pipeline(dag, tmp_path, csv_path, **conf)
    return dr, {key: ti.state for key, ti in tis.items()}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- run folders ----------------------------------------------------------------------------------
def run_dir(params, run_id):
    """The run folder :class:`RunConfig` resolves for ``params``."""
    from openai_batch_airflow.config import RunConfig

    return RunConfig.resolve(params, run_id).run_dir


def work_location(params, run_id):
    from openai_batch_airflow.config import RunConfig

    return RunConfig.resolve(params, run_id).work_dir


def test_run_ids_that_differ_only_in_punctuation_get_their_own_folders(tmp_path):
    params = {"input_csv": str(tmp_path / "q.csv"), "output_dir": str(tmp_path / "out")}
    ids = ["batch:1", "batch+1", "batch_1", "nightly.", "nightly", "manual__2026-11-30T05:00:00+00:00"]
    folders = [run_dir(params, i) for i in ids]
    assert len(set(folders)) == len(ids), folders
    assert run_dir(params, "nightly") == tmp_path / "out" / "q" / "nightly"  # safe ids stay readable
    works = [work_location({**params, "work_dir": str(tmp_path / "w")}, i) for i in ids]
    assert len(set(works)) == len(ids)


@pytest.mark.parametrize("name", ["...csv", "..csv", ".csv"])
def test_an_input_named_dots_never_writes_outside_the_output_folder(tmp_path, name):
    out = tmp_path / "out"
    params = {"input_csv": str(tmp_path / "in" / name), "output_dir": str(out)}
    for where in (run_dir(params, "r"), work_location({**params, "work_dir": str(tmp_path / "w")}, "r")):
        resolved = Path(where).resolve()
        assert resolved.parent.parent in (out.resolve(), (tmp_path / "w").resolve()), where
        assert resolved.parent.name not in ("", ".", "..")


def test_work_clean_up_removes_only_what_the_run_wrote(tmp_path):
    from openai_batch_airflow.tasks import remove_work_files

    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    mine = ["shard-00000.jsonl", "shard-00001.r1.jsonl", "invalid.jsonl", "build_manifest.json",
            "results/shard-00000.r0.b.output.jsonl", "results/shard-00000.r0.b.error.jsonl"]  # fmt: skip
    theirs = ["results.csv", "report.json", "report.html", "estimate.json", "estimate.md", "notes.txt",
              "results/keep.csv", "my-shard-00000.jsonl"]  # fmt: skip
    for name in mine + theirs:
        (run / name).write_text("x")
    assert remove_work_files(run) == len(mine)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(theirs)
    # a work folder holding nothing else goes away entirely
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "shard-00000.jsonl").write_text("x")
    (work / "results" / "shard-00000.r0.b.output.jsonl").write_text("x")
    remove_work_files(work)
    assert not work.exists()


def test_work_dir_equal_to_output_dir_keeps_the_results(dag, server, tmp_path, sample):
    server.reset()
    out = tmp_path / "out"
    dr, states = run(dag, tmp_path, sample, work_dir=str(out), max_requests_per_batch=10)
    assert dr.state == "success", states
    (folder,) = (out / "questions").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["estimate.json", "estimate.md", "report.html", "report.json", "results.csv",
                     "results.parquet"], names  # fmt: skip
    rows = read_rows(folder / "results.csv")
    assert len(rows) == 30 and sum(1 for r in rows if r["response"]) == 27
    assert json.loads((folder / "report.json").read_text())["answered"] == 27


def test_extra_body_cannot_send_another_model_than_the_one_priced(dag, server, tmp_path, sample):
    server.reset()
    conf = {"model": "gpt-4o-mini", "extra_body": {"model": "gpt-4o"}, "max_cost_usd": 1}
    dr, states = run(dag, tmp_path, sample, **conf)
    assert dr.state == "failed" and states[("validate_csv", -1)] == "failed", states
    assert server.client().files.list().data == []  # nothing uploaded, nothing billed


# -- partial is better than nothing ---------------------------------------------------------------
def when_first_batch_exists(srv, then: dict) -> threading.Thread:
    """Set ``then`` as the server's config as soon as the run's first batch exists."""
    client = srv.client()

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline and not client.batches.list(limit=1).data:
            time.sleep(0.05)
        srv.set_config(then)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_refused_follow_up_batch_lands_every_answer_and_fails_the_run(dag, srv, tmp_path, sample):
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    refuse = {"http_faults": [{"method": "POST", "path": "^/v1/batches$", "status": 400, "times": None}]}
    watcher = when_first_batch_exists(srv, refuse)
    dr, states = run(dag, tmp_path, sample)
    watcher.join(5)
    assert dr.state == "failed" and states[("merge", -1)] == "failed", states
    assert states[("download", 0)] == "success"
    (made,) = srv.client().batches.list(limit=10).data  # the follow-up was never created
    assert made.status == "expired"
    (path,) = (tmp_path / "out" / "questions").glob("*/results.csv")
    rows = read_rows(path)
    assert len(rows) == 30  # every row, once
    expired = [r for r in rows if r["error"].startswith("batch_expired")]
    assert len(expired) == 14 and sum(1 for r in rows if r["response"]) == 13
    report = json.loads((path.parent / "report.json").read_text())
    assert report["answered"] == 13 and len(report["problems"]) == 1
    assert "follow-up batch for 14 request(s)" in report["problems"][0] and "refused" in report["problems"][0]
    assert "follow-up batch for 14 request(s)" in (path.parent / "report.html").read_text()
    assert list((path.parent / "work").glob("shard-*.jsonl"))  # the run failed: its files stay for a look


def landed(tmp_path) -> tuple[list[dict], dict, Path]:
    (path,) = (tmp_path / "out" / "questions").glob("*/results.csv")
    return read_rows(path), json.loads((path.parent / "report.json").read_text()), path.parent


def test_a_400_after_a_200_for_the_same_request_never_replaces_the_answer(dag, srv, tmp_path, sample):
    srv.set_config({"result_faults": {"error_after_answer": 3}})
    dr, states = run(dag, tmp_path, sample)
    assert dr.state == "success", states
    rows, report, _ = landed(tmp_path)
    assert len(rows) == 30 and report["answered"] == 27 and report["failed"] == 1
    assert report["duplicate_results"] == 3 and len(report["duplicate_ids"]) == 3
    assert all(r["error"] == "" for r in rows if r["response"])


def test_an_unknown_custom_id_in_the_error_file_does_not_stop_the_resubmission(dag, srv, tmp_path, sample):
    srv.set_config(
        {"expire_fraction": 0.5, "expire_batches": 1, "result_faults": {"unknown_ids": 2, "batches": 1}}
    )
    dr, states = run(dag, tmp_path, sample)
    assert dr.state == "success", states
    assert len(srv.client().batches.list(limit=10).data) == 2  # the follow-up went out
    rows, report, _ = landed(tmp_path)
    assert len(rows) == 30 and report["answered"] == 27
    assert report["unmatched_results"] == 2  # counted and reported, not fatal


@pytest.mark.parametrize(
    "fault",
    [{"truncate_last_line": True}, {"truncate_last_line": True, "garbage_line": True}],
    ids=["cut-off last line", "cut-off and an HTML line"],
)
def test_a_broken_download_is_fetched_again(dag, srv, tmp_path, sample, fault):
    # a cut-off last line keeps the line count: only reading every line shows the download is broken
    srv.set_config({"result_faults": {**fault, "downloads": 1}})
    dr, states = run(dag, tmp_path, sample)
    assert dr.state == "success", states
    rows, report, _ = landed(tmp_path)
    assert report["answered"] == 27 and report["malformed_lines"] == 0


def test_a_download_that_stays_broken_lands_every_readable_answer_and_fails(dag, srv, tmp_path, sample):
    srv.set_config({"result_faults": {"truncate_last_line": True, "drop_lines": 2}})
    dr, states = run(dag, tmp_path, sample)
    assert dr.state == "failed" and states[("merge", -1)] == "failed", states
    rows, report, folder = landed(tmp_path)
    assert len(rows) == 30 and report["answered"] == 24  # 27 answers, 3 lost in the "download"
    cut = [r for r in rows if r["error"].startswith("result line unreadable (truncated or not JSON)")]
    lost = [r for r in rows if r["error"] == "no result returned for this request"]
    assert len(cut) == 1 and len(lost) == 2
    assert report["malformed_lines"] == 1 and report["broken_lines"][0]["custom_id"] is not None
    assert len(report["problems"]) == 2 and "still broken after 3 downloads" in report["problems"][0]
    assert "short" in report["problems"][0] and "unreadable" in report["problems"][0]
    assert report["problems"][1].startswith("2 request(s) were sent but no result line came back")


def test_a_line_for_an_unknown_id_cannot_hide_a_missing_answer(dag, srv, tmp_path, sample):
    # one answer dropped, one line for an id never sent: as many ids as requests, yet a row is unanswered
    srv.set_config({"result_faults": {"drop_lines": 1, "unknown_ids": 1}})
    dr, states = run(dag, tmp_path, sample)
    assert dr.state == "failed" and states[("merge", -1)] == "failed", states
    rows, report, folder = landed(tmp_path)
    assert len(rows) == 30 and report["answered"] == 26 and report["unmatched_results"] == 1
    assert report["problems"] == [
        "1 request(s) were sent but no result line came back for them (rows marked 'no result returned for "
        "this request')"
    ]
    assert list((folder / "work" / "results").glob("*.jsonl"))  # the evidence is kept


def test_a_csv_of_thousands_of_wide_columns_keeps_the_xcom_small(dag, srv, tmp_path):
    from airflow.utils.session import create_session
    from sqlalchemy import text

    src = tmp_path / "wide.csv"
    header = ["prompt"] + [f"column_{i}_" + "x" * 200 for i in range(3000)]
    src.write_text(",".join(header) + "\n" + ",".join(["hello"] + [""] * 3000) + "\n", encoding="utf-8")
    dr, states = run(dag, tmp_path, src, image_column=None, estimate_only=True)
    assert dr.state == "success", states
    with create_session() as session:
        sql = "SELECT value FROM xcom WHERE run_id = :r AND task_id = 'validate_csv' AND key = 'return_value'"
        (value,) = session.execute(text(sql), {"r": dr.run_id}).one()
    summary = json.loads(value) if isinstance(value, str) else value
    assert summary["columns_total"] == 3001 and len(summary["columns"]) == 50
    assert len(json.dumps(summary)) < 8000

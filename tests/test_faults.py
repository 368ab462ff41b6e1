"""Every fault a Batch job meets, injected into the local batch server (or the file system), and
the promise checked each time: results.csv has every row exactly once, and no extra batch was
created. These are the tests behind the fault table in docs/faults.md."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from pathlib import Path

from conftest import run_pipeline as run

SECRET = "sk-fault-tests-secret-9d2c71"


def results(tmp_path, stem="questions") -> tuple[list[dict], dict]:
    (path,) = (tmp_path / "out" / stem).glob("*/results.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((path.parent / "report.json").read_text())


def assert_every_row_once(rows, csv_path):
    with open(csv_path, newline="", encoding="utf-8") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    assert [r["id"] for r in rows] == ids


def batches(srv) -> list:
    return srv.client().batches.list(limit=100).data


def in_creation_order(srv) -> list:
    """Oldest first. The list is newest first, like OpenAI's; created_at has whole seconds only,
    so sorting by it cannot order two batches made within the same second."""
    return list(reversed(batches(srv)))


def states(tis) -> dict:
    return {key: ti.state for key, ti in tis.items()}


# -- nothing billed twice -------------------------------------------------------------------------
def test_create_whose_response_is_lost_reattaches_instead_of_a_second_batch(dag, srv, tmp_path, sample):
    # the service creates the batch, but the answer never arrives (a 502 after the fact)
    srv.set_config(
        {"http_faults": [{"method": "POST", "path": "^/v1/batches$", "status": 502, "after": True}]}
    )
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "success", states(tis)
    assert len(batches(srv)) == 1
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    assert report["answered"] == 27


def test_task_retry_after_create_reattaches_to_the_batch(dag, srv, tmp_path, sample):
    # the create goes through but its answer is lost, and looking for it fails too: the task
    # fails, Airflow retries it, and the retry finds the batch instead of creating another
    srv.set_config(
        {
            "http_faults": [
                {"method": "POST", "path": "^/v1/batches$", "status": 500, "after": True},
                {"method": "GET", "path": "^/v1/batches$", "status": 503, "times": 3},
            ]
        }
    )
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "success", states(tis)
    assert tis[("create_batch", 0)].try_number == 2
    assert len(batches(srv)) == 1
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    assert report["answered"] == 27 and report["batch_ids"] == [batches(srv)[0].id]


def test_429_and_5xx_on_upload_create_poll_and_download(dag, srv, tmp_path, sample):
    faults = [
        {"method": "POST", "path": "^/v1/files$", "status": 429, "times": 2},
        {"method": "POST", "path": "^/v1/batches$", "status": 503, "times": 1},
        {"method": "GET", "path": "^/v1/batches/[^/]+$", "status": 502, "times": 3},
        {"method": "GET", "path": "^/v1/files/[^/]+/content$", "status": 500, "times": 2},
    ]
    srv.set_config({"http_faults": faults})
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "success", states(tis)
    assert srv.get_config()["http_faults"] == []  # every fault fired
    assert len(batches(srv)) == 1 and len(srv.client().files.list(purpose="batch").data) == 1
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    assert report["answered"] == 27


# -- partial outcomes -----------------------------------------------------------------------------
def test_expired_batch_keeps_its_half_and_the_rest_is_resubmitted(dag, srv, tmp_path, sample):
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "success", states(tis)
    made = in_creation_order(srv)
    assert [b.status for b in made] == ["expired", "completed"]
    # half of the 28 requests ran (one of them the request the server rejects); the 14 that did
    # not run come back as batch_expired and go out again, the rejected one does not
    assert made[0].request_counts.total == 28 and made[1].request_counts.total == 14
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    assert report["answered"] == 27 and report["failed"] == 1 and report["invalid"] == 2
    assert sorted(report["batch_ids"]) == sorted(b.id for b in made)
    assert all(r["error"] == "" or "400" in r["error"] or "not sent" in r["error"] for r in rows)


def test_expiring_every_time_stops_after_max_resubmits_with_the_rest_marked(dag, srv, tmp_path, sample):
    srv.set_config({"expire_fraction": 0.5})
    dr, tis = run(dag, tmp_path, sample, max_resubmits=1)
    assert dr.state == "success", states(tis)
    assert len(batches(srv)) == 2  # the first batch and one follow-up, no more
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    expired = [r for r in rows if r["error"].startswith("batch_expired")]
    assert len(expired) == 7 and report["answered"] == 28 - 1 - 7
    assert all(r["response"] == "" for r in expired)


def test_cancelled_batch_keeps_what_completed_and_is_not_resubmitted(dag, srv, tmp_path, sample):
    srv.set_config({"in_progress_seconds": 6})
    client = srv.client()

    def cancel_midway():
        deadline = time.time() + 60
        while time.time() < deadline:
            found = client.batches.list(limit=1).data
            if found and found[0].status == "in_progress" and found[0].request_counts.completed >= 5:
                client.batches.cancel(found[0].id)
                return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_midway)
    canceller.start()
    dr, tis = run(dag, tmp_path, sample)
    canceller.join()
    assert dr.state == "success", states(tis)
    (batch,) = batches(srv)
    assert batch.status == "cancelled"
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    cancelled = [r for r in rows if r["error"].startswith("batch_cancelled")]
    answered = [r for r in rows if r["response"]]
    assert cancelled and all(r["response"] == "" for r in cancelled)
    assert len(answered) >= 5 and report["answered"] == len(answered)  # what completed is kept
    assert report["answered"] + report["failed"] + report["invalid"] == 30


def test_token_limit_refusal_waits_and_submits_again(dag, srv, tmp_path, sample):
    srv.set_config(
        {
            "fail_validation": {
                "code": "token_limit_exceeded",
                "message": "Enqueued token limit reached for {model} in organization org-test.",
                "times": 1,
            }
        }
    )
    dr, tis = run(dag, tmp_path, sample, token_limit_wait=1)
    assert dr.state == "success", states(tis)
    made = in_creation_order(srv)
    assert [b.status for b in made] == ["failed", "completed"]
    assert made[1].input_file_id == made[0].input_file_id  # the same file, submitted again
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    assert report["answered"] == 27


def test_other_validation_failure_fails_naming_the_row(dag, srv, tmp_path, sample, capfd):
    srv.set_config(
        {"fail_validation": {"code": "invalid_request", "message": "The body is not valid.", "line": 2}}
    )
    dr, tis = run(dag, tmp_path, sample, id_column="id")
    assert dr.state == "failed"
    assert tis[("wait_for_batch", 0)].state == "success" and tis[("wait_for_batch", 0)].try_number == 1
    assert tis[("merge", -1)].state == "failed" and tis[("merge", -1)].try_number == 1  # not retried
    logged = "".join(capfd.readouterr())
    named = "line 2 of shard-00000.jsonl (custom_id q002): invalid_request: The body is not valid."
    assert named in logged
    rows, report = results(tmp_path)  # landed: every row, each with the reason it has no answer
    assert_every_row_once(rows, sample)
    sent = [r for r in rows if "batch_failed" in r["error"] and "failed validation" in r["error"]]
    assert len(sent) == report["rows"] - report["invalid"] > 0 and all(r["response"] == "" for r in rows)
    assert named in next(r for r in rows if r["id"] == "q002")["error"]
    assert any(named in p for p in report["problems"])


# -- allowed paths --------------------------------------------------------------------------------
def test_input_csv_outside_the_allowed_roots_fails_before_upload(
    dag, srv, tmp_path, sample, monkeypatch, capfd
):
    monkeypatch.setenv("OPENAI_BATCH_ALLOWED_ROOTS", str(tmp_path / "elsewhere"))
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "failed" and tis[("validate_csv", -1)].state == "failed"
    assert srv.client().files.list().data == []
    assert "outside the allowed roots (OPENAI_BATCH_ALLOWED_ROOTS" in "".join(capfd.readouterr())


def test_image_outside_the_allowed_roots_only_invalidates_its_row(dag, srv, tmp_path, sample, monkeypatch):
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    shutil.copy(sample.parent / "images" / "red_circle.png", secret)
    text = sample.read_text(encoding="utf-8").replace("images/blue_square.png", "../private/secret.png")
    sample.write_text(text, encoding="utf-8")
    monkeypatch.setenv("OPENAI_BATCH_ALLOWED_ROOTS", str(sample.parent) + os.pathsep + str(tmp_path / "out"))
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "success", states(tis)
    rows, report = results(tmp_path)
    assert_every_row_once(rows, sample)
    row = next(r for r in rows if r["id"] == "q006")
    assert row["response"] == "" and "outside the allowed roots" in row["error"]
    assert report["invalid"] == 3


def test_output_folder_outside_the_output_roots_fails_before_upload(dag, srv, tmp_path, sample, monkeypatch):
    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOTS", str(tmp_path / "results-only-here"))
    dr, tis = run(dag, tmp_path, sample)
    assert dr.state == "failed" and tis[("validate_csv", -1)].state == "failed"
    assert srv.client().files.list().data == []
    assert not (tmp_path / "out").exists()


# -- secrets --------------------------------------------------------------------------------------
def test_the_api_key_never_reaches_logs_xcom_conf_or_files(dag, srv, tmp_path, sample, capfd, airflow_db):
    from airflow.utils.session import create_session
    from sqlalchemy import text

    dr, tis = run(dag, tmp_path, sample, max_requests_per_batch=10)
    assert dr.state == "success", states(tis)
    logged = "".join(capfd.readouterr())
    assert "validate_csv" in logged and SECRET not in logged
    with create_session() as session:
        for table in ("xcom", "dag_run", "rendered_task_instance_fields", "task_instance", "trigger"):
            dump = json.dumps(
                [list(map(str, row)) for row in session.execute(text(f"SELECT * FROM {table}"))]
            )
            assert SECRET not in dump, table
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for path in Path(airflow_db).rglob("*.log"):
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in srv.log()


def test_shards_go_out_in_waves_under_the_enqueued_token_limit(dag, srv, tmp_path):
    from batchpipe.build import build_jsonl
    from batchpipe.options import BuildOptions
    from batchpipe.tokens import shard_prompt_tokens

    src = tmp_path / "many.csv"
    src.write_text("id,prompt\n" + "".join(f"{i},question number {i}\n" for i in range(25)), encoding="utf-8")
    opts = BuildOptions(max_requests_per_batch=9)
    shards = build_jsonl(src, opts, tmp_path / "probe")["shards"]
    sizes = [shard_prompt_tokens(s["path"], opts.endpoint, opts.model) for s in shards]
    limit = max(sizes) + min(sizes) - 1  # any one shard fits, no two together
    dr, tis = run(dag, tmp_path, src, image_column=None, max_requests_per_batch=9, max_enqueued_tokens=limit)
    assert dr.state == "success", states(tis)
    made = in_creation_order(srv)
    assert len(made) == 3
    assert sorted(int(b.metadata["est_prompt_tokens"]) for b in made) == sorted(sizes)
    for earlier, later in zip(made, made[1:], strict=False):
        assert later.created_at >= earlier.completed_at  # never two enqueued at once
    rows, report = results(tmp_path, "many")
    assert [r["id"] for r in rows] == [str(i) for i in range(25)] and report["answered"] == 25

"""More shards than mapped task instances: shards are grouped (``batchpipe.build.group_shards``), one task
instance and one trigger carry several batches, and every row still comes back once.

Full runs with ``dag.test()`` against the local batch server over real HTTP. The small cases set
``OPENAI_BATCH_SHARD_GROUPS`` so a few shards share a group. The one-request-batches case runs 130
batches in 8 groups in ``make test``; ``make test-1100`` runs it at full scale, 1,100 batches in the
default 64 groups (5 minutes here, which is why it is not in ``make test``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_pipeline as run

SECRET = "sk-shard-groups-secret-51e0"


def text_csv(tmp_path: Path, rows: int, name: str = "many.csv") -> Path:
    src = tmp_path / name
    src.write_text(
        "id,prompt\n" + "".join(f"{i:04d},question number {i}\n" for i in range(rows)), encoding="utf-8"
    )
    return src


def results(tmp_path: Path, stem: str = "many") -> tuple[list[dict], dict]:
    (path,) = (tmp_path / "out" / stem).glob("*/results.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads((path.parent / "report.json").read_text())


def instances(tis) -> Counter:
    return Counter(task for (task, index) in tis if index >= 0)


def all_batches(srv) -> list:
    return list(reversed(list(srv.client().batches.list(limit=100))))  # oldest first


def assert_answered_in_order(rows: list[dict], count: int) -> None:
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(count)]
    assert all(r["response"] == f"ECHO: {r['prompt']}" and r["error"] == "" for r in rows)


@pytest.fixture
def groups(monkeypatch):
    def set_groups(n: int) -> None:
        monkeypatch.setenv("OPENAI_BATCH_SHARD_GROUPS", str(n))

    return set_groups


#: One-request batches of the grouping case: 130 in 8 groups (``make test``), or 1,100 in the default 64
#: (``OPENAI_BATCH_TEST_SHARDS=1100``, ``make test-1100``).
SHARDS = int(os.environ.get("OPENAI_BATCH_TEST_SHARDS") or 130)
GROUPS = 64 if SHARDS >= 1_100 else 8


def test_one_request_batches_need_at_most_the_groups_task_instances(
    dag, srv, tmp_path, capfd, caplog, groups
):
    if GROUPS != 64:
        groups(GROUPS)
    srv.set_config({"validating_seconds": 0, "in_progress_seconds": 0.05, "finalizing_seconds": 0})
    src = text_csv(tmp_path, SHARDS)
    dr, tis = run(dag, tmp_path, src, image_column=None, max_requests_per_batch=1)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items() if ti.state != "success"}
    counts = instances(tis)
    assert set(counts) == {"upload", "create_batch", "wait_for_batch", "download"}
    assert max(counts.values()) <= GROUPS and counts["wait_for_batch"] == GROUPS
    rows, report = results(tmp_path)
    assert_answered_in_order(rows, SHARDS)
    made = all_batches(srv)
    assert len(made) == SHARDS and {b.status for b in made} == {
        "completed"
    }  # one batch per shard, none twice
    assert sorted(int(b.metadata["shard"]) for b in made) == list(range(SHARDS))
    assert sorted(report["batch_ids"]) == sorted(b.id for b in made)  # every batch in the report
    logged = "".join(capfd.readouterr()) + caplog.text
    size, extra = divmod(SHARDS, GROUPS)
    assert f"{SHARDS} shards in {GROUPS} groups of {size} to {size + bool(extra)}" in logged
    assert all(f"batch {b.id}: status=completed" in logged for b in made)  # progress per batch in the log


def test_a_group_resubmits_the_expired_part_of_one_of_its_batches(dag, srv, tmp_path, groups):
    groups(2)
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})  # the first batch expires half done
    src = text_csv(tmp_path, 12)
    dr, tis = run(dag, tmp_path, src, image_column=None, max_requests_per_batch=2)
    assert dr.state == "success"
    assert instances(tis)["wait_for_batch"] == 2  # 6 shards, 2 task instances
    made = all_batches(srv)
    assert [b.status for b in made].count("expired") == 1 and len(made) == 7  # 6 shards + 1 follow-up
    followup = made[-1]
    assert followup.metadata["round"] == "1" and followup.request_counts.total == 1
    rows, report = results(tmp_path)
    assert_answered_in_order(rows, 12)
    assert sorted(report["batch_ids"]) == sorted(b.id for b in made)


def test_a_group_pauses_one_batch_for_the_token_limit_while_the_others_finish(dag, srv, tmp_path, groups):
    groups(1)
    message = "Enqueued token limit reached for {model} in organization org-test."
    srv.set_config({"fail_validation": {"code": "token_limit_exceeded", "message": message, "times": 1}})
    src = text_csv(tmp_path, 9)
    dr, tis = run(dag, tmp_path, src, image_column=None, max_requests_per_batch=3, token_limit_wait=1)
    assert dr.state == "success"
    assert instances(tis)["wait_for_batch"] == 1
    made = all_batches(srv)
    assert [b.status for b in made] == ["failed", "completed", "completed", "completed"]
    assert made[-1].input_file_id == made[0].input_file_id  # the refused shard, created again from its file
    rows, report = results(tmp_path)
    assert_answered_in_order(rows, 9)


def test_waves_under_the_token_limit_hold_inside_a_group(dag, srv, tmp_path, groups):
    from batchpipe.build import build_jsonl
    from batchpipe.options import BuildOptions
    from batchpipe.tokens import shard_prompt_tokens

    groups(1)  # all three shards in one create_batch task instance
    src = text_csv(tmp_path, 25)
    opts = BuildOptions(max_requests_per_batch=9)
    shards = build_jsonl(src, opts, tmp_path / "probe")["shards"]
    sizes = [shard_prompt_tokens(s["path"], opts.endpoint, opts.model) for s in shards]
    limit = max(sizes) + min(sizes) - 1  # any one shard fits, no two together
    dr, tis = run(dag, tmp_path, src, image_column=None, max_requests_per_batch=9, max_enqueued_tokens=limit)
    assert dr.state == "success"
    assert instances(tis)["create_batch"] == 1
    made = all_batches(srv)
    assert len(made) == 3 and [b.metadata["shard"] for b in made] == ["0", "1", "2"]
    for earlier, later in zip(made, made[1:], strict=False):
        assert later.created_at >= earlier.completed_at  # never two enqueued at once
    rows, _ = results(tmp_path)
    assert_answered_in_order(rows, 25)


# -- one shard's trouble stays that shard's -------------------------------------------------------------
def assert_landed_with(tmp_path, tis, failing: range, code: str, why: str) -> tuple[list[dict], dict]:
    """The run failed in merge, not before: every row landed, the rows of ``failing`` with ``code`` and
    ``why``, every other row answered."""
    assert tis[("wait_for_batch", 0)].state == "success" and tis[("merge", -1)].state == "failed"
    rows, report = results(tmp_path)
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(len(rows))]
    for i, r in enumerate(rows):
        if i in failing:
            assert r["response"] == "" and code in r["error"] and why in r["error"], r
        else:
            assert r["response"] == f"ECHO: {r['prompt']}" and r["error"] == "", r
    assert report["answered"] == len(rows) - len(failing) and report["errors_by_code"] == {code: len(failing)}
    assert any(why in p for p in report["problems"])
    return rows, report


def test_a_batch_of_a_group_that_fails_validation_fails_only_its_rows(dag, srv, tmp_path, groups, capfd):
    groups(1)
    message = "The body is not valid."
    srv.set_config(
        {"fail_validation": {"code": "invalid_request", "message": message, "line": 2, "times": 1}}
    )
    dr, tis = run(dag, tmp_path, text_csv(tmp_path, 9), image_column=None, max_requests_per_batch=3)
    assert dr.state == "failed"
    made = all_batches(srv)
    assert [b.status for b in made] == ["failed", "completed", "completed"]  # the others were waited for
    rows, _ = assert_landed_with(
        tmp_path, tis, range(0, 3), "batch_failed", f"batch {made[0].id} failed validation"
    )
    assert f"line 2 of shard-00000.jsonl (custom_id row-1): invalid_request: {message}" in rows[1]["error"]
    assert "failed validation" in rows[0]["error"]  # the batch's reason, on every one of its rows


def test_a_batch_of_a_group_that_cannot_be_polled_fails_only_its_rows(dag, srv, tmp_path, groups):
    groups(1)
    srv.set_config({"http_faults": [{"method": "GET", "path": "^/v1/batches/[^/]+$", "status": 404,
                                     "times": None, "batch": 1, "message": "No batch found"}]})  # fmt: skip
    dr, tis = run(dag, tmp_path, text_csv(tmp_path, 9), image_column=None, max_requests_per_batch=3)
    assert dr.state == "failed"
    made = all_batches(srv)
    assert [b.metadata["shard"] for b in made] == ["0", "1", "2"]
    assert_landed_with(
        tmp_path, tis, range(3, 6), "wait_stopped", f"polling batch {made[1].id} failed: HTTP 404"
    )


def test_a_refused_create_in_a_group_fails_only_its_rows(dag, srv, tmp_path, groups):
    groups(1)
    srv.set_config({"http_faults": [{"method": "POST", "path": "^/v1/batches$", "status": 400, "times": 1,
                                     "message": "Invalid input file"}]})  # fmt: skip
    dr, tis = run(dag, tmp_path, text_csv(tmp_path, 9), image_column=None, max_requests_per_batch=3)
    assert dr.state == "failed"
    made = all_batches(srv)
    assert [b.metadata["shard"] for b in made] == ["1", "2"] and {b.status for b in made} == {"completed"}
    assert_landed_with(tmp_path, tis, range(0, 3), "batch_refused", "creating the batch was refused")

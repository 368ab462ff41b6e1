"""The deferral works outside ``dag.test()``: scheduler, dag-processor, API server and a separate
triggerer process, run as they are in production (LocalExecutor on SQLite).

``dag.test()`` runs triggers inline in the test process, so it cannot tell whether the triggerer
can import the trigger. Here the waiting task is first left deferred with *no* triggerer running
(it must not move), then a triggerer process is started and has to finish the wait.
"""

from __future__ import annotations

import csv
import json
import shutil
import time

import pytest

from airflow_stack import AirflowStack
from conftest import REPO
from local_batch_server.testing import running_server

pytestmark = pytest.mark.slow
DAG_ID = "openai_batch_pipeline"


def states(stack: AirflowStack, run_id: str, task_id: str) -> list[str | None]:
    return [s for (t, _, s) in stack.task_states(DAG_ID, run_id) if t == task_id]


def wait_for(predicate, timeout: float, what: str, stack: AirflowStack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n--- scheduler ---\n{stack.log_tail('scheduler')}")


def test_deferred_wait_is_finished_by_a_separate_triggerer_process(tmp_path):
    data = tmp_path / "in"
    shutil.copytree(REPO / "data" / "sample", data)
    out = tmp_path / "out"
    # Batches stay in progress until the test lets them finish (phase durations are read live).
    with running_server(tmp_path / "server", config={"in_progress_seconds": 600}) as server:
        conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-real-triggerer-secret"}
        stack = AirflowStack(
            tmp_path / "airflow", extra_env={"AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn)}
        )
        with stack:
            stack.migrate()
            stack.start("api-server", "scheduler", "dag-processor")
            stack.wait_healthy()
            stack.wait_dag(DAG_ID)
            run_id = stack.trigger(
                DAG_ID,
                {
                    "input_csv": str(data / "questions.csv"),
                    "output_dir": str(out),
                    "image_column": "image",
                    "max_requests_per_batch": 20,  # two shards, two deferred waits
                    "check_interval": 1,
                },
                run_id="real_triggerer_test",
            )
            wait_for(
                lambda: states(stack, run_id, "wait_for_batch") == ["deferred", "deferred"],
                240,
                "both wait_for_batch tasks to defer",
                stack,
            )
            # Without a triggerer nobody polls: the batches finish on the server but the tasks
            # stay deferred.
            server.set_config({"in_progress_seconds": 0.2})
            client = server.client()
            wait_for(
                lambda: all(b.status == "completed" for b in client.batches.list(limit=10).data),
                60,
                "the batches to complete on the server",
                stack,
            )
            time.sleep(3)
            assert states(stack, run_id, "wait_for_batch") == ["deferred", "deferred"]
            assert stack.run_state(DAG_ID, run_id) == "running"

            stack.start("triggerer")
            state = stack.wait_run(DAG_ID, run_id, timeout=300)
            assert state == "success", (stack.task_states(DAG_ID, run_id), stack.log_tail("triggerer"))

        # The trigger ran in the triggerer process and logged its polls there.
        trigger_logs = "\n".join(
            p.read_text(errors="replace")
            for p in (tmp_path / "airflow").rglob("*")
            if p.is_file() and "trigger" in p.name
        )
        assert "status=completed" in trigger_logs
        assert "sk-real-triggerer-secret" not in trigger_logs

    results = list(out.glob("questions/*/results.csv"))
    assert len(results) == 1
    with open(results[0], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30
    assert sum(1 for r in rows if r["response"]) == 27
    assert stack.xcom(DAG_ID, run_id, "merge") == str(results[0])

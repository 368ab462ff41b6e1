"""OpenAIBatchWaitOperator outside a DAG run: its checks, and ``on_kill`` after a retry resumed the wait,
against the local batch server over real HTTP (the operator's context is a plain dict; what it calls is
real). Full runs through ``dag.test()`` are in test_shard_groups.py and test_faults.py."""

from __future__ import annotations

import io
import json
import threading
import time
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from conftest import StateStore, connection
from openai_batch_airflow.operators import OpenAIBatchWaitOperator


@pytest.fixture(scope="module")
def server(bare_server):
    return bare_server


@pytest.fixture
def conn(server, monkeypatch):
    server.set_config({"http_faults": [], "latency_seconds": 0, "validating_seconds": 60})
    return connection(monkeypatch, server, "operator_test", "sk-local-operator-secret")


def context(store: StateStore) -> dict:
    ti = SimpleNamespace(max_tries=2, task=SimpleNamespace(retries=2))
    return {"task_state_store": store, "ti": ti, "dag": SimpleNamespace(dag_id="d"), "run_id": "r"}


def make_batch(server) -> str:
    client = server.client()
    line = {"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}}  # fmt: skip
    file = client.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    return client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def operator(group, conn, **kwargs) -> OpenAIBatchWaitOperator:
    return OpenAIBatchWaitOperator(task_id="wait", group=group, conn_id=conn, check_interval=1, **kwargs)


def test_a_retry_that_resumed_the_wait_cancels_its_batches_when_killed_before_it_defers(server, conn):
    ids = [make_batch(server), make_batch(server)]
    group = {"group": 0, "shards": [{"index": i, "batch_id": b} for i, b in enumerate(ids)]}
    store = StateStore()
    with pytest.raises(TaskDeferred):  # the first try waits
        operator(group, conn).execute(context(store))
    retry = operator(group, conn)  # a new try (a new process) resumes from the store
    server.set_config({"latency_seconds": 1.5})  # its first look at the batches is slow: kill it then
    deferred = []

    def run():
        try:
            retry.execute(context(store))
        except TaskDeferred as exc:
            deferred.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    assert not deferred  # still looking
    retry.on_kill()
    thread.join(30)
    server.set_config({"latency_seconds": 0})
    assert {server.client().batches.retrieve(b).status for b in ids} <= {"cancelling", "cancelled"}


def test_a_group_the_operator_cannot_wait_for_fails_before_any_call(server, conn):
    with pytest.raises(AirflowFailException, match=r"shard\(s\) \[1\] more than once"):
        operator({"shards": [{"index": 1, "batch_id": "a"}, {"index": 1, "batch_id": "b"}]}, conn).execute(
            context(StateStore())
        )
    with pytest.raises(AirflowFailException, match="shard 2 has no batch_id"):
        operator({"shards": [{"index": 2}]}, conn).execute(context(StateStore()))
    with pytest.raises(AirflowFailException, match="check_interval must be at least 1 second"):
        OpenAIBatchWaitOperator(task_id="w", group="batch_x", conn_id=conn, check_interval=0).execute(
            context(StateStore())
        )
    server.set_config({"http_faults": [{"method": "*", "path": ".*", "status": 500, "times": None}]})
    # a shard refused before it had a batch ends at once with its reason: nothing to wait for, no call made
    refused = {"index": 0, "refused": "creating the batch was refused: HTTP 400", "path": "/nowhere/s.jsonl"}
    done = operator({"shards": [refused]}, conn).execute(context(StateStore()))
    ((shard),) = done["shards"]
    assert shard["unfinished"]["code"] == "batch_refused" and shard["problems"] == [
        "shard 0: creating the batch was refused: HTTP 400"
    ]


# -- a cleared wait (a new generation) continues where the last one stopped ------------------------------
def shard_file(server, tmp_path, n: int = 4) -> dict:
    """A shard of ``n`` requests written locally and submitted as a batch: the group entry for it."""
    path = tmp_path / "shard-00000.jsonl"
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"q{i}"}]}}
             for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    client = server.client()
    file = client.files.create(file=("shard-00000.jsonl", path.read_bytes()), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return {"index": 0, "batch_id": batch.id, "input_file_id": file.id, "path": str(path)}


def ended(server, batch_id: str, timeout: float = 30) -> str:
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.batches.retrieve(batch_id).status
        if status in ("completed", "expired", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not end")


def cleared(ctx: dict) -> dict:
    """The context of the task's first try after a clear: Airflow raises max_tries, a new generation."""
    ti = SimpleNamespace(max_tries=ctx["ti"].max_tries + 3, task=ctx["ti"].task)
    return {**ctx, "ti": ti}


def batch_count(server) -> int:
    return len(server.client().batches.list(limit=100).data)


def test_a_cleared_wait_resubmits_nothing_that_was_resubmitted(server, conn, tmp_path):
    server.set_config({"validating_seconds": 0.1, "in_progress_seconds": 0.2, "finalizing_seconds": 0.1,
                       "expire_fraction": 0.5, "expire_batches": 1})  # fmt: skip
    before = batch_count(server)
    group = {"group": 0, "shards": [shard_file(server, tmp_path)]}
    assert ended(server, group["shards"][0]["batch_id"]) == "expired"  # half its requests unanswered
    store = StateStore()
    first = context(store)
    with pytest.raises(TaskDeferred):  # resubmits the unanswered half, waits for it
        operator(group, conn, max_resubmits=2).execute(first)
    assert batch_count(server) == before + 2
    follow_up = store.get("wait_state")["shards"][0]["batch_id"]
    assert ended(server, follow_up) == "completed"
    # the task is cleared (say the run failed later): its first try after the clear
    result = operator(group, conn, max_resubmits=2).execute(cleared(first))
    assert batch_count(server) == before + 2  # the follow-up was not submitted (and billed) again
    shard = result["shards"][0]
    assert [b["id"] for b in shard["batches"]] == [group["shards"][0]["batch_id"], follow_up]
    assert shard["batch"]["status"] == "completed" and shard["unfinished"] is None


def test_a_cleared_wait_polls_again_a_batch_it_had_stopped_waiting_for(server, conn, tmp_path, monkeypatch):
    server.set_config({"validating_seconds": 0.1, "in_progress_seconds": 0.2, "finalizing_seconds": 0.1,
                       "expire_fraction": None, "expire_batches": None})  # fmt: skip
    group = {"group": 0, "shards": [shard_file(server, tmp_path)]}
    batch_id = group["shards"][0]["batch_id"]
    store = StateStore()
    first = context(store)
    server.set_config({"validating_seconds": 60})  # still validating when the first try looks
    with pytest.raises(TaskDeferred):
        operator(group, conn).execute(first)
    # the trigger could no longer poll it (a 404 storm, say): the shard ends without outcome
    gave_up = operator(group, conn).execute_complete(
        first,
        {"status": "done", "ended": [], "failed": [{"batch_id": batch_id, "message": "polling failed"}]},
    )
    assert gave_up["shards"][0]["unfinished"]["code"] == "wait_stopped"
    server.set_config({"validating_seconds": 0.1})
    assert ended(server, batch_id) == "completed"
    reopened = []
    real = OpenAIBatchWaitOperator._reopen

    def spy(self, state):
        reopened.append([(sh["batch_id"], sh["done"]) for sh in real(self, state)["shards"]])
        return state

    monkeypatch.setattr(OpenAIBatchWaitOperator, "_reopen", spy)
    result = operator(group, conn).execute(cleared(first))  # cleared: the batch is polled again
    assert reopened == [[(batch_id, False)]]  # the stopped shard was opened again, from the saved state
    shard = result["shards"][0]
    assert shard["unfinished"] is None and shard["batch"]["status"] == "completed"
    assert not shard["problems"]  # the earlier give-up is not reported against the finished shard

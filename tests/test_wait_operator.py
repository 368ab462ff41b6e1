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

"""OpenAIBatchTrigger: serialize round trip, and real polls of the local batch server."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import time

import pytest

from local_batch_server.testing import running_server
from openai_batch_airflow.triggers import OpenAIBatchTrigger


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture
def conn(server, monkeypatch):
    conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-local-trigger-secret"}
    monkeypatch.setenv("AIRFLOW_CONN_TRIGGER_TEST", json.dumps(conn))
    server.set_config({"http_faults": [], "validating_seconds": 0.2, "in_progress_seconds": 0.3})
    return "trigger_test"


def make_batch(server, lines: int = 3) -> str:
    client = server.client()
    body = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"q{i}"}]},
            }
        )
        + "\n"
        for i in range(lines)
    )
    file = client.files.create(file=("in.jsonl", io.BytesIO(body.encode())), purpose="batch")
    return client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


async def collect(trigger: OpenAIBatchTrigger, timeout: float = 60) -> list:
    async def run():
        return [event async for event in trigger.run()]

    return await asyncio.wait_for(run(), timeout)


def test_serialize_round_trip():
    trigger = OpenAIBatchTrigger(
        batch_id="batch_1",
        conn_id="c",
        poll_interval=2.5,
        max_consecutive_errors=4,
        deadline=1_900_000_000.5,
        cancel_on_kill=False,
    )
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    assert module == "openai_batch_airflow.triggers"  # importable by a triggerer, not from dags/
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs == {
        "batch_id": "batch_1",
        "conn_id": "c",
        "poll_interval": 2.5,
        "max_consecutive_errors": 4,
        "deadline": 1_900_000_000.5,
        "cancel_on_kill": False,
    }


def test_polls_until_completed_and_logs_progress(server, conn, capfd):
    batch_id = make_batch(server, lines=3)
    trigger = OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn, poll_interval=0.2)
    events = asyncio.run(collect(trigger))
    logged = "".join(capfd.readouterr())  # Airflow's structlog writes task/trigger logs to the console
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "done"
    batch = payload["batch"]
    assert batch["id"] == batch_id and batch["status"] == "completed"
    assert batch["output_file_id"] and batch["error_file_id"] is None
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    json.dumps(payload)  # the event must be serialisable for the triggerer's DB
    progress = [line for line in logged.splitlines() if f"batch {batch_id}: status=" in line]
    assert len(progress) >= 2  # one line per poll
    assert any("status=validating" in m or "status=in_progress" in m for m in progress)
    assert "status=completed completed=3 failed=0 total=3" in progress[-1]
    assert "sk-local-trigger-secret" not in logged


def test_an_unknown_status_is_warned_about_on_every_poll_and_waited_on(server, conn, capfd):
    batch_id = make_batch(server, lines=2)
    server.set_config({"status_faults": {"status": "paused_for_review", "times": 4}})
    try:
        deadline = time.time() + 3600
        trigger = OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn, poll_interval=0.2, deadline=deadline)
        events = asyncio.run(collect(trigger))
    finally:
        server.set_config({"status_faults": None})
    logged = "".join(capfd.readouterr())
    warned = [line for line in logged.splitlines() if "unknown status 'paused_for_review'" in line]
    assert len(warned) == 4, logged  # every poll that saw it, not once and then silence
    assert (
        "treated as still running, waited for until "
        + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline))
        in warned[0]
    )
    assert all("warning" in line.lower() for line in warned)
    (event,) = events  # then the real status came back, and the wait ended normally
    assert event.payload["status"] == "done" and event.payload["batch"]["status"] == "completed"


def test_transient_poll_errors_are_retried(server, conn):
    batch_id = make_batch(server)
    # two 503s in a row, fewer than max_consecutive_errors: the wait goes on and completes
    server.set_config(
        {"http_faults": [{"method": "GET", "path": "^/v1/batches/", "status": 503, "times": 2}]}
    )
    trigger = OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn, poll_interval=0.2, max_consecutive_errors=5)
    # the openai client itself retries too; its own retries count inside one poll
    events = asyncio.run(collect(trigger))
    assert events[0].payload["status"] == "done"
    assert events[0].payload["batch"]["status"] == "completed"


def test_persistent_poll_errors_end_the_wait_with_a_clear_message(server, conn):
    batch_id = make_batch(server)
    server.set_config(
        {"http_faults": [{"method": "GET", "path": "^/v1/batches/", "status": 500, "times": None}]}
    )
    trigger = OpenAIBatchTrigger(
        batch_id=batch_id, conn_id=conn, poll_interval=0.05, max_consecutive_errors=2
    )
    events = asyncio.run(collect(trigger))
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "error" and payload["batch_id"] == batch_id
    assert "2 consecutive polling errors" in payload["message"] and "500" in payload["message"]


def test_unknown_batch_is_a_permanent_error(server, conn):
    trigger = OpenAIBatchTrigger(batch_id="batch_does_not_exist", conn_id=conn, poll_interval=0.1)
    events = asyncio.run(collect(trigger))
    payload = events[0].payload
    assert payload["status"] == "error" and "404" in payload["message"]


def test_deadline_ends_the_wait(server, conn):
    server.set_config({"in_progress_seconds": 30})
    batch_id = make_batch(server)
    trigger = OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn, poll_interval=0.2, deadline=time.time() + 1)
    events = asyncio.run(collect(trigger))
    assert events[0].payload["status"] == "error" and "deadline" in events[0].payload["message"]
    server.client().batches.cancel(batch_id)


def test_on_kill_cancels_the_batch_unless_told_not_to(server, conn):
    server.set_config({"in_progress_seconds": 30})
    keep = make_batch(server)
    asyncio.run(OpenAIBatchTrigger(batch_id=keep, conn_id=conn, cancel_on_kill=False).on_kill())
    assert server.client().batches.retrieve(keep).status in ("validating", "in_progress")
    stop = make_batch(server)
    asyncio.run(OpenAIBatchTrigger(batch_id=stop, conn_id=conn).on_kill())
    assert server.client().batches.retrieve(stop).status in ("cancelling", "cancelled")
    server.client().batches.cancel(keep)
    # a cancel the service refuses (an unknown batch, a 500, a broken connection) never raises from on_kill
    asyncio.run(OpenAIBatchTrigger(batch_id="batch_unknown", conn_id=conn).on_kill())
    asyncio.run(OpenAIBatchTrigger(batch_id=stop, conn_id="no_such_connection").on_kill())

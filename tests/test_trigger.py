"""OpenAIBatchTrigger: serialize round trip, and real polls of the local batch server."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import time

import pytest

from conftest import connection
from openai_batch_airflow.triggers import OpenAIBatchTrigger


@pytest.fixture(scope="module")
def server(bare_server):
    return bare_server


@pytest.fixture
def conn(server, monkeypatch):
    server.set_config({"http_faults": [], "validating_seconds": 0.2, "in_progress_seconds": 0.3})
    return connection(monkeypatch, server, "trigger_test", "sk-local-trigger-secret")


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
        batch_ids=["batch_1", "batch_2"],
        conn_id="c",
        poll_interval=2.5,
        max_consecutive_errors=4,
        deadline=1_900_000_000.5,
        cancel_on_kill=False,
        provider="anthropic",
    )
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    assert module == "openai_batch_airflow.triggers"  # importable by a triggerer, not from dags/
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs == {
        "batch_ids": ["batch_1", "batch_2"],
        "conn_id": "c",
        "poll_interval": 2.5,
        "max_consecutive_errors": 4,
        "deadline": 1_900_000_000.5,
        "cancel_on_kill": False,
        "wake_at": None,
        "deadlines": {},
        "provider": "anthropic",
    }


def test_polls_until_completed_and_logs_progress(server, conn, capfd):
    batch_id = make_batch(server, lines=3)
    trigger = OpenAIBatchTrigger(batch_ids=[batch_id], conn_id=conn, poll_interval=0.2)
    events = asyncio.run(collect(trigger))
    logged = "".join(capfd.readouterr())  # Airflow's structlog writes task/trigger logs to the console
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "done"
    (batch,) = payload["ended"]
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
        trigger = OpenAIBatchTrigger(batch_ids=[batch_id], conn_id=conn, poll_interval=0.2, deadline=deadline)
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
    assert event.payload["status"] == "done" and event.payload["ended"][0]["status"] == "completed"


def test_transient_poll_errors_are_retried(server, conn):
    batch_id = make_batch(server)
    # two 503s in a row, fewer than max_consecutive_errors: the wait goes on and completes
    server.set_config(
        {"http_faults": [{"method": "GET", "path": "^/v1/batches/", "status": 503, "times": 2}]}
    )
    trigger = OpenAIBatchTrigger(
        batch_ids=[batch_id], conn_id=conn, poll_interval=0.2, max_consecutive_errors=5
    )
    # the openai client itself retries too; its own retries count inside one poll
    events = asyncio.run(collect(trigger))
    assert events[0].payload["status"] == "done"
    assert events[0].payload["ended"][0]["status"] == "completed"


@pytest.mark.parametrize("status", [408, 409])
def test_a_408_or_409_while_polling_is_tried_again_as_on_create(server, conn, status):
    batch_id = make_batch(server)
    fault = {
        "method": "GET",
        "path": "^/v1/batches/",
        "status": status,
        "times": 6,
    }  # past the client's retries
    server.set_config({"http_faults": [fault]})
    trigger = OpenAIBatchTrigger(
        batch_ids=[batch_id], conn_id=conn, poll_interval=0.1, max_consecutive_errors=10
    )
    (event,) = asyncio.run(collect(trigger))
    assert event.payload["failed"] == [] and event.payload["ended"][0]["status"] == "completed"


def test_persistent_poll_errors_end_the_wait_with_a_clear_message(server, conn):
    batch_id = make_batch(server)
    server.set_config(
        {"http_faults": [{"method": "GET", "path": "^/v1/batches/", "status": 500, "times": None}]}
    )
    trigger = OpenAIBatchTrigger(
        batch_ids=[batch_id], conn_id=conn, poll_interval=0.05, max_consecutive_errors=2
    )
    events = asyncio.run(collect(trigger))
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "done" and payload["ended"] == []
    ((failed),) = payload["failed"]
    assert failed["batch_id"] == batch_id
    assert "2 consecutive polling errors" in failed["message"] and "500" in failed["message"]


def test_an_unknown_batch_is_given_up_at_once_and_the_others_are_still_polled(server, conn, capfd):
    server.set_config({"in_progress_seconds": 30})
    running = make_batch(server)
    trigger = OpenAIBatchTrigger(batch_ids=["batch_does_not_exist", running], conn_id=conn, poll_interval=0.1)
    (event,) = asyncio.run(collect(trigger))
    assert event.payload["ended"] == []
    ((failed),) = event.payload["failed"]
    assert failed["batch_id"] == "batch_does_not_exist" and "404" in failed["message"]
    assert f"batch {running}: status=" in "".join(capfd.readouterr())  # polled in the same round
    server.client().batches.cancel(running)


def test_deadline_ends_the_wait(server, conn):
    server.set_config({"in_progress_seconds": 30})
    batch_id = make_batch(server)
    trigger = OpenAIBatchTrigger(
        batch_ids=[batch_id], conn_id=conn, poll_interval=0.2, deadline=time.time() + 1
    )
    events = asyncio.run(collect(trigger))
    ((failed),) = events[0].payload["failed"]
    assert failed["batch_id"] == batch_id and "has not ended by its deadline" in failed["message"]
    server.client().batches.cancel(batch_id)


def test_each_batch_has_its_own_deadline(server, conn):
    server.set_config({"in_progress_seconds": 30})
    early, late = make_batch(server), make_batch(server)
    soon = time.time() + 1
    trigger = OpenAIBatchTrigger(
        batch_ids=[early, late], conn_id=conn, poll_interval=0.2, deadlines={early: soon, late: soon + 3600}
    )
    (event,) = asyncio.run(collect(trigger))
    assert [f["batch_id"] for f in event.payload["failed"]] == [early]
    for batch_id in (early, late):
        server.client().batches.cancel(batch_id)


def test_on_kill_cancels_the_batch_unless_told_not_to(server, conn):
    server.set_config({"in_progress_seconds": 30})
    keep = make_batch(server)
    asyncio.run(OpenAIBatchTrigger(batch_ids=[keep], conn_id=conn, cancel_on_kill=False).on_kill())
    assert server.client().batches.retrieve(keep).status in ("validating", "in_progress")
    stop = make_batch(server)
    asyncio.run(OpenAIBatchTrigger(batch_ids=[stop], conn_id=conn).on_kill())
    assert server.client().batches.retrieve(stop).status in ("cancelling", "cancelled")
    server.client().batches.cancel(keep)
    # a cancel the service refuses (an unknown batch, a 500, a broken connection) never raises from on_kill
    asyncio.run(OpenAIBatchTrigger(batch_ids=["batch_unknown"], conn_id=conn).on_kill())
    asyncio.run(OpenAIBatchTrigger(batch_ids=[stop], conn_id="no_such_connection").on_kill())


# -- BatchPoller: the trigger's decisions, no server, no triggerer ------------------------------------
def summary(batch_id: str, status: str) -> dict:
    return {"id": batch_id, "status": status, "request_counts": {"total": 1, "completed": 0, "failed": 0}}


def test_poller_ends_the_wait_with_every_batch_that_ended_in_the_round():
    from openai_batch_airflow.triggers import BatchPoller

    poller = BatchPoller(["a", "b", "c"], poll_interval=5, max_consecutive_errors=3)
    step = poller.after_round(0, [summary("a", "in_progress"), summary("b", "in_progress")], [])
    assert step.event is None and step.sleep == 5
    polled = [summary("a", "completed"), summary("b", "validating"), summary("c", "expired")]
    step = poller.after_round(0, polled, [])
    assert step.event == {"status": "done", "ended": [polled[0], polled[2]], "failed": []}


def test_poller_waits_on_an_unknown_status_and_a_known_non_terminal_one():
    from openai_batch_airflow.triggers import BatchPoller

    poller = BatchPoller(["a"], poll_interval=2, max_consecutive_errors=3)
    for status in ("paused_for_review", None, "cancelling", "finalizing"):
        assert poller.after_round(0, [summary("a", status)], []).event is None


def test_poller_counts_transient_errors_per_batch_in_a_row_with_backoff():
    from openai_batch_airflow.triggers import BatchPoller, PollError

    poller = BatchPoller(["a", "b"], poll_interval=10, max_consecutive_errors=3)
    flaky = PollError("a", "HTTP 503: busy", transient=True)
    assert poller.after_round(0, [summary("b", "in_progress")], [flaky]).sleep == 10
    assert poller.after_round(0, [summary("b", "in_progress")], [flaky]).sleep == 20  # backoff doubles
    # a good poll of "a" resets its count; "b" failing now starts its own
    step = poller.after_round(0, [summary("a", "in_progress")], [PollError("b", "HTTP 502", True)])
    assert step.event is None and step.sleep == 10 and poller.failures == {"b": 1}
    poller.after_round(0, [summary("a", "in_progress")], [PollError("b", "HTTP 502", True)])
    step = poller.after_round(0, [summary("a", "in_progress")], [PollError("b", "HTTP 502: last", True)])
    ((failed),) = step.event["failed"]
    assert step.event["status"] == "done" and failed["batch_id"] == "b"
    assert "3 consecutive polling errors" in failed["message"] and "HTTP 502: last" in failed["message"]
    long = BatchPoller(["a"], poll_interval=100, max_consecutive_errors=50)
    for _ in range(10):
        step = long.after_round(0, [], [flaky])
    assert step.sleep == BatchPoller.MAX_BACKOFF
    slow = BatchPoller(["a"], poll_interval=900, max_consecutive_errors=50)  # backoff never polls faster
    assert [slow.after_round(0, [], [flaky]).sleep for _ in range(3)] == [900, 900, 900]


def test_poller_a_permanent_error_gives_up_that_batch_at_once_and_reports_the_ended_ones_too():
    from openai_batch_airflow.triggers import BatchPoller, PollError

    poller = BatchPoller(["a", "b", "c"], poll_interval=1, max_consecutive_errors=10)
    polled = [summary("a", "completed"), summary("c", "in_progress")]
    step = poller.after_round(0, polled, [PollError("b", "HTTP 404: no such batch", False)])
    assert step.event == {
        "status": "done",
        "ended": [polled[0]],
        "failed": [{"batch_id": "b", "message": "polling batch b failed: HTTP 404: no such batch"}],
    }


def test_poller_an_ended_batch_wins_over_a_transient_error_of_another():
    from openai_batch_airflow.triggers import BatchPoller, PollError

    poller = BatchPoller(["a", "b"], poll_interval=1, max_consecutive_errors=1)
    step = poller.after_round(0, [summary("a", "completed")], [PollError("b", "HTTP 500", True)])
    assert step.event["status"] == "done"  # "b" is polled again by the next wait


def test_poller_deadline_and_wake_up():
    from openai_batch_airflow.triggers import BatchPoller

    poller = BatchPoller(
        ["a", "b"], poll_interval=60, max_consecutive_errors=3, deadline=1000.0, wake_at=500.0
    )
    assert poller.before_round(100) is None
    assert poller.after_round(100, [summary("a", "in_progress")], []).sleep == 60
    assert (
        poller.after_round(480, [summary("a", "in_progress")], []).sleep == 20
    )  # cut short to meet the wake-up
    assert poller.before_round(500).event == {"status": "wake"}
    step = BatchPoller(["a", "b"], 60, 3, deadline=1000.0).before_round(1000.5)
    assert [f["batch_id"] for f in step.event["failed"]] == ["a", "b"]
    assert "batch a has not ended by its deadline" in step.event["failed"][0]["message"]
    own = BatchPoller(["a", "b"], 60, 3, deadline=5000.0, deadlines={"b": 900.0})  # b's own deadline first
    assert own.before_round(800) is None
    assert [f["batch_id"] for f in own.before_round(901).event["failed"]] == ["b"]
    # nothing to poll, only a wake-up: sleep until it
    idle = BatchPoller([], poll_interval=60, max_consecutive_errors=3, wake_at=30.0)
    assert idle.before_round(0) is None and idle.after_round(0, [], []).sleep == 30
    assert idle.before_round(31).event == {"status": "wake"}


def test_trigger_with_no_batches_wakes_without_a_client():
    trigger = OpenAIBatchTrigger(batch_ids=[], conn_id="no_such_connection", wake_at=time.time() + 0.3)
    events = asyncio.run(collect(trigger, timeout=10))
    assert [e.payload for e in events] == [{"status": "wake"}]


def test_a_trigger_for_several_batches_ends_with_the_first_to_end(server, conn):
    server.set_config({"in_progress_seconds": 30})
    slow, fast = make_batch(server), make_batch(server)
    server.client().batches.cancel(fast)  # it ends (cancelled) while the other runs on
    trigger = OpenAIBatchTrigger(batch_ids=[slow, fast], conn_id=conn, poll_interval=0.2)
    (event,) = asyncio.run(collect(trigger))
    assert [b["id"] for b in event.payload["ended"]] == [fast]
    server.client().batches.cancel(slow)


def test_a_batch_as_azure_openai_reports_it_is_read_as_documented():
    # Azure's REST examples: capitalised statuses, "" for files not made, null counts while validating
    from openai_batch_airflow.status import BatchStatus
    from openai_batch_airflow.triggers import batch_summary

    assert BatchStatus.of("Completed") is BatchStatus.COMPLETED and BatchStatus.ended(" Expired ")
    assert BatchStatus.of("Finished") is None and BatchStatus.of(None) is None
    s = batch_summary({"id": "b1", "status": "Validating", "output_file_id": "", "error_file_id": "",
                       "input_file_id": "f1", "request_counts": None})  # fmt: skip
    assert (s["status"], s["output_file_id"], s["error_file_id"], s["input_file_id"]) == (
        "validating",
        None,
        None,
        "f1",
    )
    assert s["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    done = batch_summary(
        {"id": "b1", "status": "Completed", "request_counts": {"total": 3, "completed": None}}
    )
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3,
        "completed": 0,
        "failed": 0,
    }
    assert batch_summary({"id": "b1", "status": "weird"})["status"] == "weird"  # unknown: kept as given

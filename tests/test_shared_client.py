"""Triggers in one event loop (as in a triggerer) share one async client per connection.

Real triggers poll the local batch server over HTTP; the registry is looked at while they wait.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from local_batch_server.testing import running_server
from openai_batch_airflow.hooks import SHARED_ASYNC_CLIENTS, SHARED_CLIENT_ENV, OpenAIBatchHook
from openai_batch_airflow.triggers import OpenAIBatchTrigger
from test_trigger import make_batch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


def set_conn(monkeypatch, server, name: str, password: str = "sk-local-shared") -> str:
    conn = {"conn_type": "openai", "host": server.base_url, "password": password}
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps(conn))
    return name


@pytest.fixture
def conn(server, monkeypatch):
    monkeypatch.delenv(SHARED_CLIENT_ENV, raising=False)
    server.set_config({"http_faults": [], "validating_seconds": 0.2, "in_progress_seconds": 1.5})
    return set_conn(monkeypatch, server, "shared_test")


async def until(predicate, timeout: float = 20) -> None:
    async def wait():
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


async def drain(trigger: OpenAIBatchTrigger) -> list:
    return [event async for event in trigger.run()]


def polled(trigger: OpenAIBatchTrigger) -> bool:
    return trigger.hook._aconn is not None


def test_triggers_in_one_loop_share_one_client_closed_when_the_last_ends(server, conn):
    triggers = [
        OpenAIBatchTrigger(batch_ids=[make_batch(server)], conn_id=conn, poll_interval=0.1) for _ in range(5)
    ]

    async def go():
        tasks = [asyncio.create_task(drain(t)) for t in triggers]
        await until(lambda: all(polled(t) for t in triggers))
        clients = {id(t.hook._aconn) for t in triggers}
        in_use = SHARED_ASYNC_CLIENTS.users()
        client = triggers[0].hook._aconn
        events = await asyncio.gather(*tasks)
        return clients, in_use, client, events, SHARED_ASYNC_CLIENTS.users()

    clients, in_use, client, events, after = asyncio.run(go())
    assert len(clients) == 1  # five waiting batches, one HTTP pool
    assert list(in_use.values()) == [5] and next(iter(in_use))[0] == conn
    assert all(
        e[0].payload["ended"][0]["status"] == "completed" for e in events
    )  # each still polled to its end
    assert client.is_closed() and after == {}  # the last trigger out closed it


def test_cancelled_triggers_let_go_and_the_last_one_closes_it(server, conn):
    server.set_config({"in_progress_seconds": 60})
    triggers = [
        OpenAIBatchTrigger(batch_ids=[make_batch(server)], conn_id=conn, poll_interval=0.1) for _ in range(3)
    ]

    async def go():
        tasks = [asyncio.create_task(drain(t)) for t in triggers]
        await until(lambda: all(polled(t) for t in triggers))
        client = triggers[0].hook._aconn
        tasks[0].cancel()  # the triggerer cancels a trigger whose task was cleared or moved
        await asyncio.gather(tasks[0], return_exceptions=True)
        one_gone = (SHARED_ASYNC_CLIENTS.users(), client.is_closed())
        await asyncio.sleep(0.3)  # the others keep polling through it
        polling_on = [t.done() for t in tasks[1:]]
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return one_gone, polling_on, client.is_closed(), SHARED_ASYNC_CLIENTS.users()

    (users, closed), polling_on, closed_at_end, after = asyncio.run(go())
    assert list(users.values()) == [2] and not closed
    assert polling_on == [False, False]
    assert closed_at_end and after == {}
    for t in triggers:
        server.client().batches.cancel(t.batch_ids[0])


def test_a_changed_connection_gets_a_new_client_and_the_old_lives_on_for_its_users(server, conn, monkeypatch):
    server.set_config({"in_progress_seconds": 60})
    old = OpenAIBatchTrigger(batch_ids=[make_batch(server)], conn_id=conn, poll_interval=0.1)
    new = OpenAIBatchTrigger(batch_ids=[make_batch(server)], conn_id=conn, poll_interval=0.1)

    async def go():
        first = asyncio.create_task(drain(old))
        await until(lambda: polled(old))
        set_conn(monkeypatch, server, conn, password="sk-local-rotated")  # the key was rotated
        second = asyncio.create_task(drain(new))
        await until(lambda: polled(new))
        both = SHARED_ASYNC_CLIENTS.users()
        a, b = old.hook._aconn, new.hook._aconn
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        mid = (a.is_closed(), b.is_closed())
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        return both, a, b, mid

    both, a, b, mid = asyncio.run(go())
    assert a is not b and b.api_key == "sk-local-rotated" and a.api_key == "sk-local-shared"
    assert sorted(both.values()) == [1, 1] and {k[0] for k in both} == {conn}
    assert "sk-local" not in repr(both)  # the key is fingerprinted, never kept in the registry's keys
    assert mid == (True, False) and b.is_closed()
    for t in (old, new):
        server.client().batches.cancel(t.batch_ids[0])


def test_sharing_switched_off_gives_each_trigger_its_own_client(server, conn, monkeypatch):
    monkeypatch.setenv(SHARED_CLIENT_ENV, "0")
    triggers = [
        OpenAIBatchTrigger(batch_ids=[make_batch(server)], conn_id=conn, poll_interval=0.1) for _ in range(3)
    ]
    _, kwargs = OpenAIBatchTrigger(batch_ids=["b"], conn_id=conn).serialize()
    # the switch is the process's, never serialized
    assert set(kwargs) == {"batch_ids", "conn_id", "poll_interval", "max_consecutive_errors", "deadline",
                           "cancel_on_kill", "wake_at", "deadlines", "provider"}  # fmt: skip

    async def go():
        tasks = [asyncio.create_task(drain(t)) for t in triggers]
        await until(lambda: all(polled(t) for t in triggers))
        clients = [t.hook._aconn for t in triggers]
        in_use = SHARED_ASYNC_CLIENTS.users()
        events = await asyncio.gather(*tasks)
        return clients, in_use, events

    clients, in_use, events = asyncio.run(go())
    assert len({id(c) for c in clients}) == 3 and in_use == {}
    assert all(c.is_closed() for c in clients)
    assert all(e[0].payload["status"] == "done" for e in events)


def test_each_event_loop_gets_its_own_client_and_a_broken_connection_takes_none(server, conn):
    async def one():
        hook = OpenAIBatchHook(conn_id=conn)
        client = await hook.aconn()
        assert (await hook.aconn()) is client  # one user per hook, however often it asks
        assert list(SHARED_ASYNC_CLIENTS.users().values()) == [1]
        await hook.aclose()
        await hook.aclose()  # twice is harmless
        return client

    first, second = asyncio.run(one()), asyncio.run(one())
    assert first is not second and first.is_closed() and second.is_closed()

    async def broken():
        trigger = OpenAIBatchTrigger(batch_ids=["batch_x"], conn_id="no_such_connection_anywhere")
        events = await drain(trigger)
        return events, SHARED_ASYNC_CLIENTS.users()

    events, after = asyncio.run(broken())
    assert (
        events[0].payload["status"] == "error"
        and "cannot build the OpenAI client" in events[0].payload["message"]
    )
    assert after == {}

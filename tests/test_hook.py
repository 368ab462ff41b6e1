"""OpenAIBatchHook: every call the pipeline makes to the Batch API, against the local batch server over real
HTTP (fast: no ``dag.test()``); BatchStatus; and a source scan that keeps the hook the only place that
builds OpenAI clients and keeps the task bodies out of the other plugin modules."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import time
from pathlib import Path

import openai
import pytest

from conftest import REPO, StateStore, connection

PLUGIN = REPO / "plugins" / "openai_batch_airflow"


@pytest.fixture(scope="module")
def server(bare_server):
    return bare_server


@pytest.fixture
def hook(server, monkeypatch):
    from openai_batch_airflow.hooks import OpenAIBatchHook

    connection(monkeypatch, server, "hook_test", "sk-local-hook-secret")
    server.reset()
    server.set_config({"validating_seconds": 0.1, "in_progress_seconds": 0.2})
    return OpenAIBatchHook(conn_id="hook_test")


Store = StateStore


def recorded(store, key="k", generation=1):
    from openai_batch_airflow.submit import Intent

    return Intent(store, key, generation)


def shard(tmp_path: Path, lines: int = 3, model: str = "gpt-4o") -> Path:
    path = tmp_path / "shard.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
                }
            )
            + "\n"
            for i in range(lines)
        )
    )
    return path


def submit(hook, tmp_path, metadata=None, lines=3):
    uploaded = hook.upload_once(shard(tmp_path, lines), "t", recorded(Store(), "u"))
    return hook.create_once(
        recorded(Store(), "c"),
        metadata=metadata or {},
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )


def finished(hook, batch_id, timeout=30):
    from openai_batch_airflow.hooks import BatchStatus

    end = time.time() + timeout
    while time.time() < end:
        batch = hook.retrieve(batch_id)
        if BatchStatus.ended(batch.status):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not end")


# -- the client ------------------------------------------------------------------------------------
def test_one_sync_client_per_hook_from_the_connection(hook, server):
    assert hook.conn is hook.conn
    assert str(hook.conn.base_url).rstrip("/") == server.base_url
    assert hook.conn.api_key == "sk-local-hook-secret"
    assert hook.conn_id == "hook_test"


def test_the_default_connection_is_openai_default():
    from openai_batch_airflow.hooks import OpenAIBatchHook

    assert OpenAIBatchHook().conn_id == "openai_default"


def test_a_hook_can_wrap_a_given_client(server):
    from openai_batch_airflow.hooks import OpenAIBatchHook

    client = server.client()
    wrapped = OpenAIBatchHook("anything", client=client)
    assert wrapped.conn is client
    assert "gpt-4o" in wrapped.list_models()


# -- upload once / create once ---------------------------------------------------------------------
def test_upload_once_reattaches_to_the_file_a_recorded_intent_names(hook, server, tmp_path):
    store = Store()
    first = hook.upload_once(shard(tmp_path), "shard-0", recorded(store))
    assert store.data["k"]["file_id"] == first.id
    again = hook.upload_once(shard(tmp_path), "shard-0", recorded(store))  # a retry of the same task
    assert again.id == first.id
    assert [f.id for f in server.client().files.list().data] == [first.id]  # uploaded once


def test_upload_once_finds_a_file_whose_upload_answer_was_lost(hook, server, tmp_path):
    server.set_config(
        {"http_faults": [{"method": "POST", "path": "^/v1/files$", "status": 502, "after": True}]}
    )
    store = Store()
    found = hook.upload_once(shard(tmp_path), "shard-0", recorded(store))
    assert [f.id for f in server.client().files.list().data] == [found.id]
    assert store.data["k"]["file_id"] == found.id


def test_create_once_reattaches_when_the_create_answer_was_lost(hook, server, tmp_path):
    uploaded = hook.upload_once(shard(tmp_path), "shard-0", recorded(Store(), "u"))
    server.set_config(
        {"http_faults": [{"method": "POST", "path": "^/v1/batches$", "status": 500, "after": True}]}
    )
    store = Store()
    kwargs = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = hook.create_once(recorded(store), metadata={"shard": "0"}, **kwargs)
    listed = server.client().batches.list().data
    assert [b.id for b in listed] == [batch.id]  # the lost create was found, not repeated
    assert listed[0].metadata["submission"] == store.data["k"]["submission"]
    again = hook.create_once(recorded(store), metadata={"shard": "0"}, **kwargs)  # the task's retry
    assert again.id == batch.id and len(server.client().batches.list().data) == 1


def test_a_cleared_task_is_a_new_submission(hook, server, tmp_path):
    uploaded = hook.upload_once(shard(tmp_path), "shard-0", recorded(Store(), "u"))
    store = Store()
    kwargs = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = hook.create_once(recorded(store, generation=1), metadata={}, **kwargs)
    second = hook.create_once(recorded(store, generation=2), metadata={}, **kwargs)
    assert first.id != second.id


def test_a_try_that_died_after_recording_its_intent_finds_what_it_made(hook, server, tmp_path):
    # the earlier try recorded its intent, made the file and the batch, and died before recording their ids
    store = Store()
    started = recorded(store).start()
    client = server.client()
    made = client.files.create(file=(f"shard-0-{started['submission']}.jsonl", shard(tmp_path).read_bytes()),
                               purpose="batch")  # fmt: skip
    kwargs = {"input_file_id": made.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = client.batches.create(metadata={"submission": started["submission"]}, **kwargs)
    retry = recorded(store)
    assert retry.resumed
    assert hook.upload_once(shard(tmp_path), "shard-0", retry).id == made.id
    assert hook.create_once(recorded(store), metadata={}, **kwargs).id == batch.id
    assert len(client.files.list().data) == 1 and len(client.batches.list().data) == 1  # nothing twice


def test_a_new_intent_does_not_list_what_exists(hook, server, tmp_path):
    # a fresh submission id cannot be on anything made before: no listing of files or batches (at scale,
    # a listing per shard is quadratic); listing is broken here to prove it is not called
    server.set_config({"http_faults": [{"method": "GET", "path": "^/v1/(files|batches)$", "status": 500,
                                        "times": None}]})  # fmt: skip
    fresh = recorded(Store())
    assert not fresh.resumed
    uploaded = hook.upload_once(shard(tmp_path), "shard-0", fresh)
    batch = hook.create_once(recorded(Store()), metadata={}, input_file_id=uploaded.id,
                             endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip
    server.set_config({"http_faults": []})
    assert [b.id for b in server.client().batches.list().data] == [batch.id]


# -- enqueued tokens, retrieve, cancel --------------------------------------------------------------
def test_enqueued_tokens_count_this_models_active_batches_only(hook, server, tmp_path):
    server.set_config({"validating_seconds": 60})
    a = submit(hook, tmp_path, {"model": "gpt-4o", "est_prompt_tokens": "100"})
    submit(hook, tmp_path, {"model": "gpt-4o", "est_prompt_tokens": "20"})
    submit(hook, tmp_path, {"model": "gpt-4o-mini", "est_prompt_tokens": "5000"})
    submit(hook, tmp_path, {"model": "gpt-4o"})  # no estimate: not counted
    assert hook.enqueued_tokens("gpt-4o") == 120
    assert hook.enqueued_tokens("gpt-4o-mini") == 5000
    assert hook.enqueued_tokens("o3") == 0
    cancelled = hook.cancel(a.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert hook.enqueued_tokens("gpt-4o") == 20  # a cancelled batch holds no tokens


def test_the_async_side_retrieves_and_cancels(hook, server, tmp_path):
    server.set_config({"validating_seconds": 60})
    batch = submit(hook, tmp_path)

    async def go():
        try:
            seen = await hook.aretrieve(batch.id)
            assert (await hook.aconn()) is (await hook.aconn())  # one async client while it is open
        finally:
            await hook.aclose()
        outcomes = await hook.acancel_all([batch.id, "batch_unknown"])  # after the shared client closed
        return seen, outcomes

    seen, outcomes = asyncio.run(go())
    assert seen.id == batch.id and seen.status == "validating"
    assert outcomes[batch.id].status in ("cancelling", "cancelled")
    assert isinstance(outcomes["batch_unknown"], openai.NotFoundError)  # returned, not raised
    assert hook.retrieve(batch.id).status in ("cancelling", "cancelled")


def test_a_poll_that_hangs_is_given_up_within_its_timeout(hook, server, tmp_path, monkeypatch):
    import time as clock

    from openai_batch_airflow import hooks

    batch = submit(hook, tmp_path)
    monkeypatch.setattr(hooks, "POLL_TIMEOUT_SECONDS", 0.3)
    server.set_config({"latency_seconds": 5})

    async def poll():
        try:
            return await hook.aretrieve(batch.id)
        finally:
            await hook.aclose()

    started = clock.monotonic()
    try:
        with pytest.raises(openai.APITimeoutError):
            asyncio.run(poll())
    finally:
        server.set_config({"latency_seconds": 0})
    assert clock.monotonic() - started < 4  # the client's retries included, far under one hung call


def test_cancelling_many_batches_goes_out_concurrently(hook, server, tmp_path):
    import time as clock

    server.set_config({"validating_seconds": 60})
    ids = [submit(hook, tmp_path).id for _ in range(6)]
    server.set_config({"latency_seconds": 0.2})
    started = clock.monotonic()
    outcomes = asyncio.run(hook.acancel_all(ids, concurrency=6))
    took = clock.monotonic() - started
    assert all(outcomes[i].status in ("cancelling", "cancelled") for i in ids)
    assert took < 6 * 0.2  # one after another would take at least 1.2 s


# -- the checked download ---------------------------------------------------------------------------
def test_a_broken_download_is_fetched_again_until_whole(hook, server, tmp_path, caplog):
    server.set_config({"result_faults": {"truncate_last_line": True, "batches": 1, "downloads": 1}})
    batch = finished(hook, submit(hook, tmp_path, lines=4).id)
    summary = {**batch.model_dump(), "round": 0}
    folder = tmp_path / "results"
    with caplog.at_level(logging.WARNING, logger="openai_batch_airflow.hooks"):
        files, problems = hook.download_results(summary, folder, 0, tmp_path / "scratch")
    assert problems == []
    assert "broken download (1 of 3)" in caplog.text
    (stored, local), *_ = files
    assert stored.endswith(f"shard-00000.r0.{batch.id}.output.jsonl") and local.parent == folder
    assert [json.loads(line)["custom_id"] for line in local.read_text().splitlines()] != []
    assert len(local.read_text().splitlines()) == 4
    assert not list(folder.glob("*.part"))


def test_a_download_that_stays_broken_is_kept_and_named(hook, server, tmp_path):
    server.set_config({"result_faults": {"garbage_line": True, "batches": 1}})
    batch = finished(hook, submit(hook, tmp_path, lines=2).id)
    files, problems = hook.download_results({**batch.model_dump(), "round": 0}, tmp_path / "r", 3, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"batch {batch.id} (shard 3): result files still broken after 3 downloads")
    assert "every readable answer was kept" in problems[0]
    assert files and files[0][1].exists()


def test_download_file_streams_to_the_path(hook, server, tmp_path):
    batch = finished(hook, submit(hook, tmp_path, lines=2).id)
    target = tmp_path / "out" / "o.jsonl"
    target.parent.mkdir()
    hook.download_file(batch.output_file_id, target)
    assert len(target.read_text().splitlines()) == 2


# -- models (what preflight asks) -------------------------------------------------------------------
def test_model_lookups_and_preflight_through_the_hook(hook):
    import openai
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_model

    assert hook.retrieve_model("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        hook.retrieve_model("gpt-4o-mnii")
    assert "gpt-4o-mini" in hook.list_models()
    assert len(hook.list_models(limit=2)) == 2
    check_model(hook, "gpt-4o", "hook_test")
    with pytest.raises(AirflowFailException, match="did you mean 'gpt-4o-mini'"):
        check_model(hook, "gpt-4o-mnii", "hook_test")


# -- statuses ---------------------------------------------------------------------------------------
def test_batch_status_says_what_each_documented_status_means():
    from openai_batch_airflow.hooks import BatchStatus

    assert {s.value for s in BatchStatus} == {
        "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
    }  # fmt: skip
    assert {s.value for s in BatchStatus if s.is_terminal} == {"completed", "failed", "expired", "cancelled"}
    assert {s.value for s in BatchStatus if s.is_active} == {"validating", "in_progress", "finalizing"}
    assert {s.value for s in BatchStatus if s.is_resubmittable} == {"completed", "expired"}
    assert (
        BatchStatus.of("in_progress") is BatchStatus.IN_PROGRESS and BatchStatus.IN_PROGRESS == "in_progress"
    )
    for unknown in ("paused", "", None, "complete", 3, ["completed"]):
        assert BatchStatus.of(unknown) is None
        assert not BatchStatus.ended(unknown)
    # case and blanks do not matter (Azure OpenAI spells "Completed"): a finished batch is not waited on
    assert BatchStatus.of("COMPLETED") is BatchStatus.COMPLETED and BatchStatus.ended("Cancelled ")
    assert BatchStatus.ended("cancelled") and not BatchStatus.ended("cancelling")


def test_an_unknown_status_is_noted_and_a_known_one_is_not():
    from openai_batch_airflow.triggers import unknown_status_note

    assert unknown_status_note({"id": "b", "status": "finalizing"}, None) is None
    note = unknown_status_note({"id": "b", "status": "paused" * 100}, 0.0 + 86400)
    assert note.startswith("batch b: unknown status 'pausedpaused")
    assert (
        "(known: cancelled, cancelling, completed, expired, failed, finalizing, in_progress, validating)"
        in note
    )
    assert "waited for until 1970-01-02 00:00:00 UTC" in note
    for status, deadline in (({"a": 1}, 1e20), (["x"], float("nan")), (None, float("inf"))):  # never raises
        assert "unknown status" in unknown_status_note({"id": "b", "status": status}, deadline)


# -- the shape: one place builds clients; the task bodies stay the DAG's ------------------------------
CLIENT_BUILDERS = {"OpenAI", "AsyncOpenAI", "get_conn", "aget_conn"}
#: The modules holding the task bodies of a DAG (``tasks`` for the pipeline, ``inbox`` for the inbox).
DAG_FACING = {"tasks.py", "inbox.py"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            yield node.lineno, name


def _imports_tasks(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "openai_batch_airflow.tasks" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            if node.module == "openai_batch_airflow.tasks":
                return True
            if node.module == "openai_batch_airflow" and any(a.name == "tasks" for a in node.names):
                return True
            if node.level and node.module in ("tasks", None) and any(a.name == "tasks" for a in node.names):
                return True
            if node.level and node.module == "tasks":
                return True
    return False


def test_only_the_hook_builds_openai_clients():
    modules = sorted(PLUGIN.glob("*.py"))
    assert len(modules) > 5
    builders = [
        f"{path.name}:{line} {name}"
        for path in modules
        if path.name != "hooks.py"
        for line, name in _calls(ast.parse(path.read_text()))
        if name in CLIENT_BUILDERS
    ]
    assert builders == []
    in_hook = {name for _, name in _calls(ast.parse((PLUGIN / "hooks.py").read_text()))}
    assert in_hook & CLIENT_BUILDERS  # the scan looks at the right names


def test_only_dag_facing_modules_import_the_task_bodies():
    importers = [p.name for p in sorted(PLUGIN.glob("*.py")) if _imports_tasks(ast.parse(p.read_text()))]
    assert set(importers) <= DAG_FACING, importers
    assert _imports_tasks(ast.parse("from openai_batch_airflow.tasks import intent"))  # the scan can see one
    assert _imports_tasks(ast.parse("from openai_batch_airflow import tasks as t"))
    assert _imports_tasks(ast.parse("from . import tasks"))
    assert not _imports_tasks(ast.parse("from openai_batch_airflow import storage"))


def test_parsing_a_dag_does_not_load_the_openai_client():
    # the waiting operator and the trigger are imported when the DAG file is parsed; the client when they run
    import os
    import subprocess
    import sys

    code = (
        "import sys, openai_batch_airflow.operators, openai_batch_airflow.triggers;"
        "print(sorted(m for m in ('openai', 'openai_batch_airflow.tasks') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

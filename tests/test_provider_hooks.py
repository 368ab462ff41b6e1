"""The Azure OpenAI and Anthropic hooks behind the batch-API interface: unit tests of their pure parts, and
real calls to the local batch server (Azure's URLs and ``api-key`` header, Anthropic's Message Batches)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import StateStore
from openai_batch_airflow.anthropic_batches import (
    AmbiguousSubmission,
    AnthropicBatchHook,
    _body_size,
    _requests_body,
    openai_batch,
)
from openai_batch_airflow.hooks import (
    AzureOpenAIBatchHook,
    BatchAPI,
    OpenAIBatchHook,
    azure_client_kwargs,
    batch_hook,
)
from openai_batch_airflow.submit import Intent
from openai_batch_airflow.triggers import batch_summary

KEY = "sk-ant-hook-test-0123456789"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from local_batch_server.testing import running_server

    config = {
        "validating_seconds": 0.05,
        "in_progress_seconds": 0.1,
        "finalizing_seconds": 0.05,
        "api_key": KEY,
    }
    admin = "admin-token-for-hook-tests"
    with running_server(tmp_path_factory.mktemp("srv"), config=config, admin_token=admin) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.reset()
    return server


@pytest.fixture
def anthropic(srv, monkeypatch):
    conn = {"conn_type": "anthropic", "host": srv.root_url, "password": KEY}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_TEST", json.dumps(conn))
    return AnthropicBatchHook("anthropic_test")


def lines(tmp_path, n: int, name: str = "shard.jsonl", prefix: str = "q"):
    path = tmp_path / name
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            params = {"model": "claude-haiku-4-5", "max_tokens": 50,
                      "messages": [{"role": "user", "content": f"{prefix} {i} «ü»"}]}  # fmt: skip
            fh.write(json.dumps({"custom_id": f"row-{i}", "params": params}, ensure_ascii=False) + "\n")
    return path


# -- pure parts ----------------------------------------------------------------------------------------
def test_an_ended_anthropic_batch_in_the_openai_shape():
    raw = {"id": "msgbatch_1", "type": "message_batch", "processing_status": "ended",
           "request_counts": {"processing": 0, "succeeded": 5, "errored": 1, "canceled": 0, "expired": 4},
           "created_at": "2026-12-07T10:00:00Z", "expires_at": "2026-12-08T10:00:00Z",
           "ended_at": "2026-12-08T10:00:01.5Z", "cancel_initiated_at": None, "archived_at": None,
           "results_url": "https://elsewhere.example/v1/messages/batches/msgbatch_1/results"}  # fmt: skip
    summary = batch_summary(openai_batch(raw))
    assert summary["status"] == "expired"  # resubmittable, like an OpenAI batch that expired
    assert summary["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
    assert summary["output_file_id"] == "msgbatch_1" and summary["error_file_id"] is None
    assert summary["expires_at"] == 1796724000 and summary["created_at"] == 1796637600
    assert openai_batch({**raw, "cancel_initiated_at": "2026-12-07T11:00:00Z"})["status"] == "cancelled"
    clean = {**raw, "request_counts": {**raw["request_counts"], "expired": 0}}
    assert openai_batch(clean)["status"] == "completed"
    running = {**raw, "processing_status": "in_progress", "results_url": None}
    assert (
        openai_batch(running)["status"] == "in_progress" and openai_batch(running)["output_file_id"] is None
    )
    assert openai_batch({**raw, "processing_status": "canceling"})["status"] == "cancelling"
    # an unknown status is passed on (waited on until the deadline), odd counts are zero, bad times None
    odd = openai_batch({"id": "x", "processing_status": "paused", "request_counts": {"succeeded": -1,
                        "errored": "2", "expired": True}, "created_at": "yesterday"})  # fmt: skip
    assert odd["status"] == "paused" and odd["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert odd["created_at"] is None


def test_the_create_body_is_the_shard_lines_byte_for_byte(tmp_path):
    path = tmp_path / "s.jsonl"
    raw = [b'{"custom_id":"a","params":{"x":"\\u00e9 \xc3\xa9"}}', b'{"custom_id":"b","params":{}}']
    path.write_bytes(raw[0] + b"\r\n\n" + raw[1])  # CRLF, a blank line, no final newline
    body = b"".join(_requests_body(path))
    assert body == b'{"requests":[' + raw[0] + b"," + raw[1] + b"]}"
    assert len(body) == _body_size(path)
    assert json.loads(body)["requests"][0]["params"]["x"] == "é é"


def test_azure_client_settings_v1_dated_and_entra():
    v1 = azure_client_kwargs("https://res.openai.azure.com/", "k1", {}, "c")
    assert v1 == {"base_url": "https://res.openai.azure.com/openai/v1", "api_key": "k1"}
    assert AzureOpenAIBatchHook._client_class(v1) is openai.OpenAI
    same = azure_client_kwargs("https://res.openai.azure.com/openai/v1/", "k1", {}, "c")
    assert same["base_url"] == v1["base_url"]
    dated = azure_client_kwargs("https://res.openai.azure.com", "k1", {"api_version": "2024-10-21"}, "c")
    assert dated == {
        "azure_endpoint": "https://res.openai.azure.com",
        "api_version": "2024-10-21",
        "api_key": "k1",
    }
    assert AzureOpenAIBatchHook._client_class(dated, asynchronous=True) is openai.AsyncAzureOpenAI
    # the dated API's client sends the key as Azure's api-key header, and no bearer token
    assert openai.AzureOpenAI(**dated).auth_headers == {"api-key": "k1"}
    entra = azure_client_kwargs(
        "https://res.openai.azure.com", "tok", {"auth_type": "entra_token", "api_version": "2024-10-21"}, "c"
    )
    assert entra["azure_ad_token"] == "tok" and "api_key" not in entra
    with pytest.raises(ValueError, match="auth_type"):
        azure_client_kwargs("https://res.openai.azure.com", "k", {"auth_type": "magic"}, "c")
    with pytest.raises(ValueError, match="endpoint"):
        azure_client_kwargs("", "k", {}, "c")


def test_batch_hook_by_provider():
    assert type(batch_hook()) is OpenAIBatchHook and batch_hook().conn_id == "openai_default"
    azure = batch_hook("azure_openai")
    assert isinstance(azure, AzureOpenAIBatchHook) and azure.conn_id == "azure_openai_default"
    assert not azure.checks_model
    claude = batch_hook("anthropic", "mine")
    assert (
        isinstance(claude, AnthropicBatchHook) and isinstance(claude, BatchAPI) and claude.conn_id == "mine"
    )
    assert not claude.uploads_files
    with pytest.raises(ValueError, match="provider"):
        batch_hook("bedrock")


# -- Azure over HTTP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"api_version": "2024-10-21"}])
def test_azure_hook_submits_polls_and_downloads_through_azure_urls(srv, monkeypatch, tmp_path, extra):
    conn = {"conn_type": "azure_openai_batch", "host": srv.root_url, "password": KEY, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_TEST", json.dumps(conn))
    hook = AzureOpenAIBatchHook("azure_test")
    path = tmp_path / "in.jsonl"
    body = {"model": "my-deployment", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    path.write_text(json.dumps(line) + "\n")
    store = StateStore()
    uploaded = hook.upload_once(path, "azure-test", Intent(store, "u", 1))
    batch = hook.create_once(Intent(store, "c", 1), {"shard": "0"}, input_file_id=uploaded.id,
                             endpoint="/v1/chat/completions")  # fmt: skip
    import time

    for _ in range(200):
        summary = batch_summary(hook.retrieve(batch.id))
        if summary["status"] == "completed":
            break
        time.sleep(0.05)
    assert summary["status"] == "completed"
    out = hook.download_file(summary["output_file_id"], tmp_path / "out.jsonl")
    assert json.loads(out.read_text())["response"]["body"]["choices"][0]["message"]["content"] == "ECHO: hi"
    # a wrong key is refused
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_BAD", json.dumps({**conn, "password": "wrong"}))
    with pytest.raises(openai.AuthenticationError):
        AzureOpenAIBatchHook("azure_bad").retrieve(batch.id)


# -- Anthropic over HTTP -------------------------------------------------------------------------------
def wait_ended(hook, batch_id):
    import time

    for _ in range(400):
        summary = batch_summary(hook.retrieve(batch_id))
        if summary["status"] in ("completed", "expired", "cancelled"):
            return summary
        time.sleep(0.05)
    raise AssertionError("never ended")


def test_anthropic_create_poll_download(anthropic, tmp_path):
    path = lines(tmp_path, 4)
    batch = anthropic.create_once(
        Intent(StateStore(), "c", 1), {"shard": "0"}, requests_path=path, requests=4
    )
    assert batch.status == "in_progress" and batch.request_counts["total"] == 4
    summary = wait_ended(anthropic, batch.id)
    assert summary["status"] == "completed" and summary["request_counts"] == {"total": 4, "completed": 4,
                                                                               "failed": 0}  # fmt: skip
    got = anthropic.download_file(summary["output_file_id"], tmp_path / "results.jsonl")
    answers = {json.loads(x)["custom_id"]: json.loads(x)["result"] for x in got.read_text().splitlines()}
    assert answers["row-2"]["message"]["content"][0]["text"] == "ECHO: q 2 «ü»"


def test_anthropic_retry_after_a_lost_create_reattaches_and_two_candidates_stop(anthropic, tmp_path):
    path = lines(tmp_path, 3)
    store = StateStore()
    # try 1 recorded its intent, created the batch, and died before recording the id
    first = Intent(store, "create_batch-0", 1)
    first.start()
    made = anthropic._create(path)
    # try 2 (the task's retry): finds that batch by listing; nothing new is created
    again = anthropic.create_once(Intent(store, "create_batch-0", 1), {}, requests_path=path, requests=3)
    assert again.id == made.id
    assert (
        len(
            httpx.get(f"{anthropic._settings['base_url']}/v1/messages/batches", headers=HEADERS).json()[
                "data"
            ]
        )
        == 1
    )
    # another lost create, and meanwhile someone else created a batch of as many requests: no guess
    store2 = StateStore()
    Intent(store2, "create_batch-1", 1).start()
    anthropic._create(lines(tmp_path, 3, "other.jsonl", prefix="other"))
    with pytest.raises(AmbiguousSubmission, match="cannot be told"):
        anthropic.create_once(Intent(store2, "create_batch-1", 1), {}, requests_path=path, requests=3)
    # a batch of another size is never taken for this shard's
    store3 = StateStore()
    Intent(store3, "create_batch-2", 1).start()
    five = lines(tmp_path, 5, "five.jsonl")
    fresh = anthropic.create_once(Intent(store3, "create_batch-2", 1), {}, requests_path=five, requests=5)
    assert fresh.id != made.id and fresh.request_counts["total"] == 5


def test_anthropic_results_come_from_the_connections_host_only(anthropic, tmp_path, srv):
    """Results are fetched by batch id from the connection's host (the absolute results_url is never
    followed, so the key goes nowhere else); an id that could reach another path is refused."""
    batch = anthropic.create_once(
        Intent(StateStore(), "c", 1), {}, requests_path=lines(tmp_path, 1), requests=1
    )
    wait_ended(anthropic, batch.id)
    with pytest.raises(ValueError):
        anthropic.download_file("../../v1/files", tmp_path / "x")
    with pytest.raises(openai.NotFoundError):
        anthropic.download_file("msgbatch_doesnotexist", tmp_path / "y")


def test_anthropic_errors_are_the_openai_classes(srv, monkeypatch):
    bad = {"conn_type": "anthropic", "host": srv.root_url, "password": "wrong-key-0000"}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_BAD", json.dumps(bad))
    with pytest.raises(openai.AuthenticationError) as caught:
        AnthropicBatchHook("anthropic_bad").retrieve("msgbatch_x")
    assert "wrong-key-0000" not in str(caught.value)
    down = {"conn_type": "anthropic", "host": "http://127.0.0.1:9", "password": KEY}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DOWN", json.dumps(down))
    with pytest.raises(openai.APIConnectionError):
        AnthropicBatchHook("anthropic_down")._call("GET", "/v1/messages/batches", attempts=1)


def test_the_connection_types_are_registered_with_airflow():
    """The package's provider entry gives Airflow's connection form both types, with their fields."""
    from airflow.providers_manager import ProvidersManager

    hooks = ProvidersManager().hooks
    assert hooks["azure_openai_batch"].hook_class_name == "openai_batch_airflow.hooks.AzureOpenAIBatchHook"
    assert hooks["anthropic"].hook_class_name.endswith("anthropic_batches.AnthropicBatchHook")
    assert AnthropicBatchHook.get_ui_field_behaviour()["relabeling"]["password"] == "API key"
    assert AzureOpenAIBatchHook.get_ui_field_behaviour()["relabeling"]["host"] == "Endpoint"


def test_the_trigger_waits_for_anthropic_batches_and_cancels_them_when_killed(anthropic, srv, tmp_path):
    """The deferrable wait on the Anthropic hook: one event when the batch ends (in the OpenAI shape the
    operator reads), and on_kill cancels through a client of its own (an unknown id is reported, not
    raised)."""
    import asyncio

    from openai_batch_airflow.triggers import OpenAIBatchTrigger

    done = anthropic.create_once(
        Intent(StateStore(), "a", 1), {}, requests_path=lines(tmp_path, 2), requests=2
    )

    async def collect(trigger):
        return [event async for event in trigger.run()]

    trigger = OpenAIBatchTrigger(batch_ids=[done.id], conn_id="anthropic_test", poll_interval=0.2,
                                 provider="anthropic")  # fmt: skip
    (event,) = asyncio.run(asyncio.wait_for(collect(trigger), 60))
    ended = event.payload["ended"][0]
    assert event.payload["status"] == "done" and ended["id"] == done.id and ended["status"] == "completed"
    assert ended["request_counts"] == {"total": 2, "completed": 2, "failed": 0}

    srv.set_config({"in_progress_seconds": 30})
    three = lines(tmp_path, 3, "b.jsonl")
    slow = anthropic.create_once(Intent(StateStore(), "b", 1), {}, requests_path=three, requests=3)
    killer = OpenAIBatchTrigger(batch_ids=[slow.id, "msgbatch_unknown"], conn_id="anthropic_test",
                                provider="anthropic")  # fmt: skip
    asyncio.run(killer.on_kill())
    srv.set_config({"in_progress_seconds": 0.1})
    summary = wait_ended(anthropic, slow.id)
    assert summary["status"] == "cancelled"
    got = anthropic.download_file(summary["output_file_id"], tmp_path / "cancelled.jsonl")
    assert {json.loads(x)["result"]["type"] for x in got.read_text().splitlines()} <= {
        "canceled",
        "succeeded",
    }


def test_a_server_answering_something_that_is_no_batch_is_an_api_error_the_wait_survives(
    tmp_path, monkeypatch
):
    """A proxy answering 200 with an HTML page (or a JSON list) for a poll: an openai.APIError, never an
    exception that would end the trigger; the wait gives that batch up after its transient errors."""
    import asyncio
    import subprocess
    import sys
    import time

    from local_batch_server.testing import free_port
    from openai_batch_airflow.triggers import OpenAIBatchTrigger

    folder = tmp_path / "site" / "v1" / "messages" / "batches"
    folder.mkdir(parents=True)
    (folder / "msgbatch_html").write_text("<html><body>Gateway says hello</body></html>")
    (folder / "msgbatch_list").write_text("[1, 2, 3]")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tmp_path / "site")], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        conn = {"conn_type": "anthropic", "host": f"http://127.0.0.1:{port}", "password": KEY}
        monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_LIAR", json.dumps(conn))
        hook = AnthropicBatchHook("anthropic_liar")
        for batch_id in ("msgbatch_html", "msgbatch_list"):
            with pytest.raises(openai.APIResponseValidationError, match="not a JSON object"):
                hook.retrieve(batch_id)
        trigger = OpenAIBatchTrigger(
            batch_ids=["msgbatch_html"],
            conn_id="anthropic_liar",
            poll_interval=0.05,
            max_consecutive_errors=2,
            provider="anthropic",
        )

        async def collect():
            return [event async for event in trigger.run()]

        (event,) = asyncio.run(asyncio.wait_for(collect(), 30))
        assert event.payload["status"] == "done" and event.payload["ended"] == []
        assert event.payload["failed"][0]["batch_id"] == "msgbatch_html"
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_provider_implements_the_whole_interface():
    calls = [name for name, value in vars(BatchAPI).items() if callable(value) and not name.startswith("_")]
    assert {"retrieve", "aretrieve", "cancel", "acancel_all", "create_once", "download_file"} <= set(calls)
    for cls in (OpenAIBatchHook, AzureOpenAIBatchHook, AnthropicBatchHook):
        for name in calls:
            owner = next(k for k in cls.__mro__ if name in vars(k))
            assert owner is not BatchAPI or name in ("download_results", "aclose"), (cls.__name__, name)

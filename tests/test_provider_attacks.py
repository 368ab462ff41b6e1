"""Hostile review of the Azure OpenAI / Anthropic providers: each test here is a defect found by attacking
the hooks with real HTTP (the local batch server, or a tiny threaded server answering what a lying service
or proxy might), or the shared readers with result lines such a service might send. No mocks of the code
under test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from conftest import StateStore
from openai_batch_airflow.anthropic_batches import AnthropicBatchHook
from openai_batch_airflow.hooks import AzureOpenAIBatchHook
from openai_batch_airflow.submit import Intent

KEY = "sk-ant-attack-test-0123456789abcdef"


# -- a tiny real HTTP server answering whatever ``route`` says --------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(
            (self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        status, headers, payload = self.server.route(self.command, self.path, body)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def tiny_server(route):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.route, server.seen = route, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def js(status: int, obj: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"content-type": "application/json", **headers}, json.dumps(obj).encode()


def message_batch(batch_id: str, n: int, created: str | None = "now", **extra: Any) -> dict[str, Any]:
    data = {"id": batch_id, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None, "expires_at": "2099-01-01T00:00:00Z", "cancel_initiated_at": None,
            "archived_at": None, "results_url": None}  # fmt: skip
    if created == "now":
        data["created_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    elif created is not None:
        data["created_at"] = created
    return {**data, **extra}


def anthropic_hook(monkeypatch, name: str, host: str, password: str = KEY) -> AnthropicBatchHook:
    conn = {"conn_type": "anthropic", "host": host, "password": password}
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps(conn))
    return AnthropicBatchHook(name)


def shard(tmp_path, n: int, name: str, prefix: str):
    path = tmp_path / name
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            params = {"model": "claude-haiku-4-5", "max_tokens": 20,
                      "messages": [{"role": "user", "content": f"{prefix} {i}"}]}  # fmt: skip
            fh.write(json.dumps({"custom_id": f"{prefix}-{i}", "params": params}) + "\n")
    return path


# -- the local batch server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from local_batch_server.testing import running_server

    config = {
        "validating_seconds": 0.05,
        "in_progress_seconds": 30,
        "finalizing_seconds": 0.05,
        "api_key": KEY,
    }
    with running_server(
        tmp_path_factory.mktemp("srv"), config=config, admin_token="attack-admin-token-0123"
    ) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.reset()
    return server


# -- 1. a create that surely made nothing adopts a sibling shard's batch ---------------------------------
def test_a_create_refused_with_429_never_adopts_another_shards_batch(srv, monkeypatch, tmp_path):
    """``tasks.create`` creates a group's shards one after another; shards are the same size. Shard 1 was
    created a moment ago (3 requests); shard 0's create (3 requests) is answered 429: nothing was created.
    ``with_retries`` then "looks whether it went through": ``_find_batch`` lists batches since ``since``
    (= intent start - 300 s, so batches made *before* this try began count too) with 3 requests, finds
    shard 1's, and returns it as shard 0's. Shard 0's rows are never sent; shard 1's results are downloaded
    and merged twice. (The same after a worker dies mid-create: the retry adopts a sibling's batch.)"""
    hook = anthropic_hook(monkeypatch, "anthropic_attack_sibling", srv.root_url)
    sibling = hook.create_once(Intent(StateStore(), "create_batch-1", 1), {"shard": "1"},
                               requests_path=shard(tmp_path, 3, "s1.jsonl", "one"), requests=3)  # fmt: skip
    srv.set_config({"http_faults": [{"method": "POST", "path": "^/v1/messages/batches$", "status": 429,
                                     "times": 1}]})  # fmt: skip
    mine = hook.create_once(Intent(StateStore(), "create_batch-0", 1), {"shard": "0"},
                            requests_path=shard(tmp_path, 3, "s0.jsonl", "zero"), requests=3)  # fmt: skip
    assert mine.id != sibling.id, "shard 0 took shard 1's batch for its own after a 429 that created nothing"


# -- 2. the key in error messages --------------------------------------------------------------------------
def test_an_error_answer_quoting_the_key_does_not_put_the_key_in_the_exception(monkeypatch):
    """A gateway that echoes the rejected header (``invalid x-api-key 'sk-...'``): ``_status_error`` copies
    the service's message into the exception, which goes to logs, trigger events, problems in the run's
    report files and ``test_connection``'s answer in the UI. The hook knows the key and could redact it."""

    def route(method, path, body):
        return js(401, {"type": "error", "error": {"type": "authentication_error",
                                                   "message": f"invalid x-api-key '{KEY}'"}})  # fmt: skip

    with tiny_server(route) as liar:
        hook = anthropic_hook(monkeypatch, "anthropic_attack_echo", liar.url)
        with pytest.raises(openai.AuthenticationError) as caught:
            hook.retrieve("msgbatch_x")
        ok, message = hook.test_connection()
    assert KEY not in str(caught.value)
    assert not ok and KEY not in message


def test_a_key_with_a_trailing_newline_is_sent_without_it_and_a_broken_one_is_refused_unquoted(monkeypatch):
    """A key read from a secret file keeps its final newline: h11 refused the header and its error named the
    value (``b'sk-...\\n'``, which Airflow's masker does not match), so the key reached the log in clear.
    The key is now sent stripped; one with a control character inside is refused naming the connection,
    never the key."""
    with tiny_server(lambda m, p, b: js(200, {"data": [], "has_more": False})) as srv:
        hook = anthropic_hook(monkeypatch, "anthropic_attack_newline", srv.url, password=KEY + "\n")
        assert hook._call("GET", "/v1/messages/batches", attempts=1)["data"] == []
        assert srv.seen[-1][2]["x-api-key"] == KEY
        broken = anthropic_hook(
            monkeypatch, "anthropic_attack_ctrl", srv.url, password=KEY[:8] + "\x07" + KEY[8:]
        )
        with pytest.raises(ValueError, match="control character") as caught:
            broken.retrieve("msgbatch_x")
    assert KEY[8:] not in str(caught.value)


def test_an_azure_key_with_a_trailing_newline_is_sent_without_it(monkeypatch):
    """The same key on Azure: sent stripped, as the api-key header of the dated API."""
    with tiny_server(lambda m, p, b: js(200, {"id": "batch_1"})) as srv:
        extra = {"api_version": "2024-10-21", "openai_client_kwargs": {"max_retries": 0}}
        conn = {"conn_type": "azure_openai_batch", "host": srv.url, "password": KEY + "\n", "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_AZURE_ATTACK_NEWLINE", json.dumps(conn))
        AzureOpenAIBatchHook("azure_attack_newline").retrieve("batch_1")
        assert srv.seen[-1][2]["api-key"] == KEY


# -- 4. a poll answer the hook cannot map ends the whole group's wait -----------------------------------
@pytest.mark.parametrize(
    "liar_id",
    [
        "msgbatch_liststatus",  # processing_status is a JSON list: openai_batch() raises TypeError
        "msgbatch_odd%2Fid",  # an id the service named at create that _safe refuses: ValueError
    ],
)
def test_one_batch_the_hook_cannot_read_does_not_crash_the_trigger(monkeypatch, liar_id):
    """``_poll_round`` only catches ``openai.APIError``; the Anthropic hook raises TypeError (an unhashable
    ``processing_status`` in ``{...}.get(raw, raw)``) or ValueError (``_safe``) for one batch, the gather
    raises, and the trigger dies: every other batch of the group loses its wait (the design says one
    batch's trouble never ends the others' wait; an unparsable answer is an APIError)."""
    from openai_batch_airflow.triggers import OpenAIBatchTrigger

    ended = message_batch("msgbatch_good", 0, processing_status="ended", ended_at="2026-12-07T10:00:00Z",
                          results_url="https://x/results",
                          request_counts={"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0,
                                          "expired": 0})  # fmt: skip

    def route(method, path, body):
        if path.endswith("/msgbatch_good"):
            return js(200, ended)
        return js(200, message_batch("msgbatch_liststatus", 1, processing_status=["ended"]))

    with tiny_server(route) as liar:
        conn = {"conn_type": "anthropic", "host": liar.url, "password": KEY}
        monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_ATTACK_POLL", json.dumps(conn))
        trigger = OpenAIBatchTrigger(batch_ids=["msgbatch_good", liar_id], conn_id="anthropic_attack_poll",
                                     poll_interval=0.05, max_consecutive_errors=2,
                                     provider="anthropic")  # fmt: skip

        async def first_event():
            async for event in trigger.run():
                return event.payload

        payload = asyncio.run(asyncio.wait_for(first_event(), 20))
    assert payload["status"] == "done"
    assert [b["id"] for b in payload["ended"]] == ["msgbatch_good"]


# -- 5. the lost-create search on a listing that misbehaves -------------------------------------------------
def test_a_listing_that_repeats_its_page_finds_the_one_lost_batch(monkeypatch, tmp_path):
    """A gateway ignoring ``after_id`` answers the same page with ``has_more`` true: ``_find_batch`` lists
    until 1000 items (10 GETs of the same page; 1000 GETs if a page holds one batch) and counts the one lost
    batch 10 times: AmbiguousSubmission "10 batches ... (msgbatch_lost, msgbatch_lost, ...)" instead of
    re-attaching to it (no dedup by id, no stop on a cursor that does not move)."""
    page = [message_batch("msgbatch_lost", 3)] + [message_batch(f"msgbatch_{i}", 5) for i in range(99)]

    def route(method, path, body):
        if method == "GET" and path.startswith("/v1/messages/batches"):
            return js(200, {"data": page, "has_more": True, "first_id": "msgbatch_lost",
                            "last_id": "msgbatch_98"})  # fmt: skip
        return js(500, {"type": "error", "error": {"type": "api_error", "message": "no"}})

    with tiny_server(route) as liar:
        hook = anthropic_hook(monkeypatch, "anthropic_attack_pages", liar.url)
        store = StateStore()
        Intent(store, "create_batch-0", 1).start()  # try 1 recorded its intent, its create's answer was lost
        path = shard(tmp_path, 3, "s.jsonl", "r")
        got = hook.create_once(Intent(store, "create_batch-0", 1), {}, requests_path=path, requests=3)
        gets = sum(1 for m, *_ in liar.seen if m == "GET")
    assert got.id == "msgbatch_lost"
    assert gets <= 2


def test_a_listed_batch_without_created_at_does_not_end_the_search(monkeypatch, tmp_path):
    """The newest listed batch has no (or an unreadable) ``created_at``: ``batch.created_at or 0`` makes it
    "older than the try", the search stops there and never sees the lost batch listed after it, and a
    second batch is created (billed twice). A batch of unknown age says nothing about the ones after it."""
    undated = message_batch("msgbatch_undated", 5, created=None)
    listing = {"data": [undated, message_batch("msgbatch_lost", 3)], "has_more": False}

    def route(method, path, body):
        if method == "GET":
            return js(200, listing)
        return js(200, message_batch("msgbatch_second", 3))

    with tiny_server(route) as liar:
        hook = anthropic_hook(monkeypatch, "anthropic_attack_undated", liar.url)
        store = StateStore()
        Intent(store, "create_batch-0", 1).start()
        path = shard(tmp_path, 3, "s.jsonl", "r")
        got = hook.create_once(Intent(store, "create_batch-0", 1), {}, requests_path=path, requests=3)
        posts = [p for m, p, *_ in liar.seen if m == "POST"]
    assert not posts, "a second batch was created while the lost one was listed"
    assert got.id == "msgbatch_lost"


# -- 6. readers that disagree on what an Anthropic answer is ---------------------------------------------
MESSAGE = {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
ANSWER = {"custom_id": "row-1", "response": None, "result": {"type": "succeeded", "message": MESSAGE}}


def test_an_answered_anthropic_line_with_a_null_response_is_never_resubmitted(tmp_path):
    """The merge (``parse_result_line``: ``response is None``) and the cache's candidate scan take an
    Anthropic line carrying ``"response": null`` as the answer; ``select_retryable``
    (``_anthropic_result``: ``"response" in line``) does not see it as succeeded, so the same id's
    ``expired`` line gets it resubmitted: paid twice."""
    from batchpipe.resubmit import select_retryable
    from batchpipe.results import parse_result_line

    assert parse_result_line(ANSWER, "/v1/messages").ok  # the merge puts it on its row as the answer
    path = tmp_path / "results.jsonl"
    expired = {"custom_id": "row-1", "result": {"type": "expired"}}
    path.write_text(json.dumps(ANSWER) + "\n" + json.dumps(expired) + "\n")
    assert select_retryable([path]) == []


def test_the_cache_can_read_back_an_anthropic_answer_it_keeps(tmp_path):
    """``_answer_candidates`` (msgspec: ``response`` None -> no response) makes the same line a storable
    answer, so ``NewAnswers.keep`` writes it; ``is_answer_line`` (``"response" in obj``) then refuses it on
    every lookup: the entry is never used and the request is paid for again on every run."""
    from batchpipe.cache import _answer_candidates, is_answer_line

    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ANSWER, separators=(",", ":")) + "\n")
    ((cid, storable, *_),) = list(_answer_candidates([path]))
    assert cid == "row-1" and storable == 1  # kept in the cache once merged
    assert is_answer_line(json.dumps(ANSWER, separators=(",", ":")).encode())

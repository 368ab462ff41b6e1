"""Tests of the local OpenAI-compatible batch server, through the real openai client over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from batchpipe.tokens import count_text_tokens, request_prompt_tokens
from local_batch_server.testing import free_port, running_server

FAST = {"validating_seconds": 0.05, "in_progress_seconds": 0.1, "finalizing_seconds": 0.05}
TERMINAL = {"completed", "failed", "expired", "cancelled"}
PNG = b"\x89PNG\r\n\x1a\nnot-really-a-png-but-bytes"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("lbs"), config=FAST) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.reset()
    return server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)


def chat_line(custom_id, text, model="gpt-4o-mini", **body):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def upload(client, lines, name="input.jsonl"):
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    return client.files.create(file=(name, text.encode()), purpose="batch").id


def run_batch(client, lines, endpoint="/v1/chat/completions", wait=True, **kwargs):
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint=endpoint, completion_window="24h", **kwargs
    )
    assert batch.status == "validating"
    return wait_batch(client, batch.id) if wait else batch


def wait_batch(client, batch_id, timeout=10.0, statuses=TERMINAL):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.03)


def read_lines(client, file_id):
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


# ---- happy paths -----------------------------------------------------------------------------------
def test_chat_text_and_image_happy_path(client):
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    image_msg = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is"},
            {"type": "text", "text": "in this image?"},
            {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ],
    }
    lines = [chat_line(f"r{i}", f"hello number {i}") for i in range(8)]
    lines.append(
        {
            "custom_id": "img",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "system", "content": "You are terse."}, image_msg],
            },
        }
    )
    lines.append(chat_line("short", "one two three four five", max_tokens=4))
    batch = run_batch(client, lines, metadata={"job": "t1"})

    assert batch.status == "completed"
    assert batch.model == "gpt-4o-mini"
    assert batch.metadata == {"job": "t1"}
    assert batch.error_file_id is None and batch.errors is None
    assert batch.request_counts.model_dump() == {"total": 10, "completed": 10, "failed": 0}
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"{batch.id}_output.jsonl"
    out = read_lines(client, batch.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)
    assert ids != [x["custom_id"] for x in lines]  # shuffled
    by_id = {x["custom_id"]: x for x in out}
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        assert line["response"]["body"]["model"] == "gpt-4o-mini"
        assert line["response"]["body"]["object"] == "chat.completion"

    r3 = by_id["r3"]["response"]["body"]
    assert r3["choices"][0]["message"] == {
        "role": "assistant",
        "content": "ECHO: hello number 3",
        "refusal": None,
        "annotations": [],
    }
    assert r3["choices"][0]["finish_reason"] == "stop"
    # tokens as the estimate counts them: 3 framing + "user" + "hello number 3" + 3 for the reply
    r3_line = next(x for x in lines if x["custom_id"] == "r3")
    assert r3["usage"]["prompt_tokens"] == request_prompt_tokens(r3_line["body"], CHAT, "gpt-4o-mini") == 11
    assert r3["usage"]["completion_tokens"] == count_text_tokens("ECHO: hello number 3", "gpt-4o-mini") == 7

    sha = hashlib.sha256(PNG).hexdigest()[:16]
    img = by_id["img"]["response"]["body"]
    expected = f"ECHO: What is\nin this image? [image image/png sha256={sha}] [image url=https://example.com/cat.jpg]"
    assert img["choices"][0]["message"]["content"] == expected
    # gpt-4o-mini images: 2833 each (detail low, and an http URL of unknown size) + the text and framing
    img_line = next(x for x in lines if x["custom_id"] == "img")
    assert img["usage"]["prompt_tokens"] == request_prompt_tokens(img_line["body"], CHAT, "gpt-4o-mini")
    assert img["usage"]["prompt_tokens"] > 2 * 2833
    assert img["usage"]["completion_tokens"] == count_text_tokens(expected, "gpt-4o-mini")

    short = by_id["short"]["response"]["body"]  # max_tokens=4: "ECHO", ":", " one" are 3 + 1 tokens
    assert short["choices"][0]["message"]["content"] == "ECHO: one"
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 4

    usage = batch.usage
    assert usage.input_tokens == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in out)
    assert usage.output_tokens == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in out)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def _expected_vector(text):
    d = hashlib.sha256(text.encode()).digest()
    return [round(int.from_bytes(d[4 * i : 4 * i + 4], "big") / 2**32 * 2 - 1, 6) for i in range(8)]


def test_embeddings(client):
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"some text {i}"},
        }
        for i in range(3)
    ]
    batch = run_batch(client, lines, endpoint="/v1/embeddings")
    assert batch.status == "completed"
    by_id = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, batch.output_file_id)}
    body = by_id["e1"]
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": _expected_vector("some text 1")}]
    tokens = count_text_tokens("some text 1", "text-embedding-3-small")
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert batch.usage.input_tokens == sum(
        count_text_tokens(f"some text {i}", "text-embedding-3-small") for i in range(3)
    )
    assert batch.usage.output_tokens == 0


def test_responses(client):
    lines = [
        {
            "custom_id": "s",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "gpt-4.1-mini", "input": "plain string input", "instructions": "be brief"},
        },
        {
            "custom_id": "parts",
            "method": "POST",
            "url": "/v1/responses",
            "body": {
                "model": "gpt-4.1-mini",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "describe"},
                            {"type": "input_image", "image_url": "http://img.example/x.png"},
                        ],
                    }
                ],
            },
        },
        {
            "custom_id": "t",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "gpt-4.1-mini", "input": "a b c d", "max_output_tokens": 3},
        },
    ]
    batch = run_batch(client, lines, endpoint="/v1/responses")
    assert batch.status == "completed"
    by_id = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, batch.output_file_id)}
    s = by_id["s"]
    assert s["object"] == "response" and s["status"] == "completed" and s["model"] == "gpt-4.1-mini"
    assert s["output"][0]["type"] == "message" and s["output"][0]["role"] == "assistant"
    assert s["output"][0]["content"][0]["type"] == "output_text"
    assert s["output"][0]["content"][0]["text"] == "ECHO: plain string input"
    for line in lines:
        usage = by_id[line["custom_id"]]["usage"]
        text = by_id[line["custom_id"]]["output"][0]["content"][0]["text"]
        assert usage["input_tokens"] == request_prompt_tokens(line["body"], "/v1/responses", "gpt-4.1-mini")
        assert usage["output_tokens"] == count_text_tokens(text, "gpt-4.1-mini")
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert s["instructions"] == "be brief" and s["metadata"] == {} and s["tools"] == []
    parts = by_id["parts"]["output"][0]["content"][0]["text"]
    assert parts == "ECHO: describe [image url=http://img.example/x.png]"
    # gpt-4.1-mini is a patch model: an image of unknown size counts as 512x512 = 256 patches x 1.62
    assert by_id["parts"]["usage"]["input_tokens"] > 415
    assert by_id["t"]["output"][0]["content"][0]["text"] == "ECHO:"  # 3 tokens: no word of the input fits
    assert by_id["t"]["status"] == "incomplete"


def test_reject_marker_goes_to_error_file(client):
    lines = [chat_line(f"r{i}", f"text {i}") for i in range(4)]
    lines[2] = chat_line("r2", "please [[reject]] me")
    batch = run_batch(client, lines)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 3, "failed": 1}
    errors = read_lines(client, batch.error_file_id)
    assert len(errors) == 1
    err = errors[0]
    assert err["custom_id"] == "r2" and err["error"] is None
    assert err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert err["response"]["body"]["error"]["code"] == "invalid_request"
    assert sorted(x["custom_id"] for x in read_lines(client, batch.output_file_id)) == ["r0", "r1", "r3"]
    assert client.files.retrieve(batch.error_file_id).filename == f"{batch.id}_error.jsonl"


# ---- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, code, line",
    [
        ("duplicate", "duplicate_custom_id", 3),
        ("mismatched_url", "mismatched_endpoint", 2),
        ("two_models", "mismatched_model", 3),
        ("not_json", "invalid_json_line", 2),
        ("missing_custom_id", "invalid_request", 1),
        ("too_many", "too_many_requests", None),
        ("too_big", "file_too_large", None),
    ],
)
def test_validation_failures(srv, client, case, code, line):
    lines = [chat_line(f"r{i}", f"t {i}") for i in range(3)]
    if case == "duplicate":
        lines[2]["custom_id"] = "r0"
    elif case == "mismatched_url":
        lines[1]["url"] = "/v1/embeddings"
    elif case == "two_models":
        lines[2]["body"]["model"] = "gpt-4o"
    elif case == "not_json":
        lines[1] = "{not json"
    elif case == "missing_custom_id":
        del lines[0]["custom_id"]
    elif case == "too_many":
        srv.set_config({"max_requests_per_file": 2})
    elif case == "too_big":
        srv.set_config({"max_file_bytes": 100})
    batch = run_batch(client, lines)
    assert batch.status == "failed"
    assert batch.failed_at and batch.in_progress_at is None
    assert batch.errors.object == "list"
    assert batch.errors.data[0].code == code
    assert batch.errors.data[0].line == line
    assert batch.errors.data[0].message
    assert batch.output_file_id is None and batch.error_file_id is None


def test_upload_and_create_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert exc.value.status_code == 400 and exc.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.csv", b"a,b\n"), purpose="batch")
    file_id = upload(client, [chat_line("a", "b")])
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="48h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/nothing", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"k": "v" * 513},
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    # delete
    assert client.files.delete(file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_fail_validation_token_limit(srv, client):
    srv.set_config({"fail_validation": {"code": "token_limit_exceeded", "times": 1}})
    batch = run_batch(client, [chat_line("a", "b", model="gpt-4o")])
    assert batch.status == "failed"
    err = batch.errors.data[0]
    assert err.code == "token_limit_exceeded"
    assert err.message.startswith("Enqueued token limit reached for gpt-4o ")
    assert srv.get_config()["fail_validation"] is None
    assert run_batch(client, [chat_line("a", "b")]).status == "completed"


def test_expire_fraction_keeps_half(srv, client):
    srv.set_config({"expire_fraction": 0.5})
    batch = run_batch(client, [chat_line(f"r{i}", "x") for i in range(6)])
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 3, "failed": 3}
    out = read_lines(client, batch.output_file_id)
    assert sorted(x["custom_id"] for x in out) == ["r0", "r1", "r2"]
    errors = read_lines(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in errors) == ["r3", "r4", "r5"]
    for e in errors:
        assert e["response"] is None
        assert e["error"]["code"] == "batch_expired"
        assert (
            e["error"]["message"]
            == "This request could not be executed before the completion window expired."
        )


def test_cancel_keeps_answered_part(srv, client):
    srv.set_config({"in_progress_seconds": 2.0})
    batch = run_batch(client, [chat_line(f"r{i}", "x") for i in range(20)], wait=False)
    deadline = time.monotonic() + 10
    while True:
        b = client.batches.retrieve(batch.id)
        if b.status == "in_progress" and b.request_counts.completed >= 2:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts.total == 20 and counts.completed >= 2 and counts.failed >= 1
    assert counts.completed + counts.failed == 20
    assert len(read_lines(client, done.output_file_id)) == counts.completed
    errors = read_lines(client, done.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(run_batch(client, [chat_line("a", "b")]).id)  # completed: cannot cancel


def test_slow_finalizing_released_by_config(srv, client):
    srv.set_config({"finalizing_seconds": 1000})
    batch = run_batch(client, [chat_line("a", "b")], wait=False)
    assert wait_batch(client, batch.id, statuses={"finalizing"}).finalizing_at
    time.sleep(0.2)
    assert client.batches.retrieve(batch.id).status == "finalizing"
    srv.set_config({"finalizing_seconds": 0})
    assert wait_batch(client, batch.id).status == "completed"


# ---- HTTP faults, auth, listing, async client ------------------------------------------------------
def test_http_faults(srv, client):
    batch = run_batch(client, [chat_line("a", "b")])
    srv.set_config(
        {"http_faults": [{"method": "GET", "path": r"^/v1/batches/[^/]+$", "status": 500, "times": 1}]}
    )
    with pytest.raises(openai.InternalServerError):
        client.batches.retrieve(batch.id)
    assert client.batches.retrieve(batch.id).status == "completed"  # fault used up
    assert srv.get_config()["http_faults"] == []

    srv.set_config({"http_faults": [{"method": "GET", "path": r"^/v1/batches/", "status": 500, "times": 2}]})
    retrying = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=3)
    assert retrying.batches.retrieve(batch.id).status == "completed"

    srv.set_config({"http_faults": [{"method": "*", "path": "/v1/files", "status": 429, "times": 1}]})
    resp = httpx.get(srv.base_url + "/files")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "0"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(srv.base_url + "/files").status_code == 200


def test_api_key(tmp_path):
    with running_server(tmp_path, config={**FAST, "api_key": "sekrit"}, admin_token=ADMIN_TOKEN) as srv:
        check_api_key(srv)


def check_api_key(srv):
    assert srv.get_config()["api_key"] == "***"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).batches.list()
    good = openai.OpenAI(base_url=srv.base_url, api_key="sekrit", max_retries=0)
    assert good.batches.list().data == []
    srv.set_config({"api_key": "***", "shuffle_seed": 7})  # "***" keeps the secret
    assert good.batches.list().data == []


def test_batches_list_pagination(client):
    ids = [run_batch(client, [chat_line("a", "b")], wait=False).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[2], ids[1]]  # newest first
    assert page.has_more is True
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and rest.has_more is False
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # auto-pagination


def test_async_client(srv):
    async def go():
        aclient = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        f = await aclient.files.create(
            file=("a.jsonl", json.dumps(chat_line("a", "hi")).encode()), purpose="batch"
        )
        b = await aclient.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status not in TERMINAL:
            await asyncio.sleep(0.03)
            b = await aclient.batches.retrieve(b.id)
        content = await aclient.files.content(b.output_file_id)
        await aclient.close()
        return b, content.text

    batch, text = asyncio.run(go())
    assert batch.status == "completed"
    assert json.loads(text)["response"]["body"]["choices"][0]["message"]["content"] == "ECHO: hi"


# ---- upstream forwarding --------------------------------------------------------------------------
@pytest.fixture
def upstream():
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(request.headers.get("authorization"))
        if body["messages"][0]["content"] == "boom":
            return JSONResponse({"error": {"message": "nope", "type": "server_error"}}, status_code=503)
        return {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [],
            "usage": {"prompt_tokens": 7},
        }

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(timeout=5)


def test_upstream_forwarding(tmp_path, upstream):
    base, seen = upstream
    config = {**FAST, "upstream_base_url": base, "upstream_api_key": "up-key"}
    with running_server(tmp_path, config=config) as srv:
        check_upstream_forwarding(srv.client(max_retries=0), seen)


def check_upstream_forwarding(client, seen):
    batch = run_batch(
        client, [chat_line("ok", "hi", model="local-llm"), chat_line("bad", "boom", model="local-llm")]
    )
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    out = read_lines(client, batch.output_file_id)
    assert out[0]["custom_id"] == "ok" and out[0]["response"]["body"]["model"] == "local-llm"
    err = read_lines(client, batch.error_file_id)
    assert err[0]["custom_id"] == "bad" and err[0]["response"]["status_code"] == 503
    assert seen == ["Bearer up-key", "Bearer up-key"]
    assert batch.usage.input_tokens == 7


def test_cancel_while_validating(srv, client):
    srv.set_config({"validating_seconds": 30})
    batch = run_batch(client, [chat_line(f"r{i}", "x") for i in range(3)], wait=False)
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.in_progress_at is None
    assert done.output_file_id is None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 0, "failed": 3}
    assert {e["error"]["code"] for e in read_lines(client, done.error_file_id)} == {"batch_cancelled"}


def test_misc_http(srv, client):
    resp = httpx.get(srv.base_url + "/nothing/here")
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "invalid_request_error"
    bad = httpx.put(srv.base_url.removesuffix("/v1") + "/_admin/config", json={"no_such_option": 1})
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.post(srv.base_url + "/batches", json={"endpoint": "/v1/embeddings"}).status_code == 400
    file_id = upload(client, [chat_line("a", "b")])
    run_batch(client, [chat_line("a", "b")])
    assert file_id in [f.id for f in client.files.list(purpose="batch")]
    assert {f.purpose for f in client.files.list(purpose="batch_output")} == {"batch_output"}
    assert srv.set_config({"shuffle_seed": 99})["shuffle_seed"] == 99
    srv.reset()
    assert srv.get_config()["shuffle_seed"] == 1234 and client.batches.list().data == []


# ---- /_admin authentication and start-up-only settings (issue 11, item 12) -------------------------
ADMIN_TOKEN = "adm-5f0c2e9a41b7d3c8e6f1a2b4"
CLIENT_KEY = "sk-client-key-for-v1-only"
UP_KEY = "sk-upstream-key-never-leaves"


class Listener:
    """A tiny HTTP listener on 127.0.0.1 (thread) that records every request and answers like a chat
    completions endpoint: the "upstream", or the attacker's catcher."""

    def __init__(self):
        import http.server

        self.requests: list[dict] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append({"path": self.path, "headers": dict(self.headers), "body": body.decode()})
                data = json.dumps({"object": "chat.completion", "model": "m", "choices": []}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # /v1/models[/{id}] of the upstream: its own names
                seen.append({"path": self.path, "headers": dict(self.headers), "body": ""})
                name = self.path.removeprefix("/v1/models").strip("/")
                model = {"id": "up-llm", "object": "model", "created": 1, "owned_by": "upstream"}
                status, obj = 200, {"object": "list", "data": [model]}
                if name == "up-llm":
                    obj = model
                elif name:
                    error = {"message": f"no model {name}", "type": "invalid_request_error"}
                    status, obj = 404, {"error": {**error, "param": None, "code": "model_not_found"}}
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def listeners():
    made = []

    def make():
        made.append(Listener())
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def admin(srv, method, path, token=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if isinstance(token, bytes):  # raw header bytes: httpx refuses to encode a non-ASCII str
        headers["Authorization"] = b"Bearer " + token
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{srv.root_url}/_admin/{path}", headers=headers, timeout=10, **kwargs)


@pytest.mark.parametrize(
    "config",
    [{"api_key": CLIENT_KEY}, {"upstream_base_url": "http://127.0.0.1:9/v1", "upstream_api_key": UP_KEY}],
    ids=["api_key", "upstream"],
)
def test_admin_is_refused_without_an_admin_token_when_a_key_or_upstream_is_set(tmp_path, config):
    with running_server(tmp_path, config={**FAST, **config}) as srv:
        keyed = openai.OpenAI(base_url=srv.base_url, api_key=CLIENT_KEY, max_retries=0)
        file_id = upload(keyed, [chat_line("a", "b")])
        for token in (None, CLIENT_KEY, UP_KEY, ADMIN_TOKEN):
            assert admin(srv, "GET", "config", token).status_code == 403
            refused = admin(srv, "PUT", "config", token, json={"api_key": None, "upstream_base_url": None})
            assert refused.status_code == 403
            assert "admin token" in refused.json()["error"]["message"]
            assert admin(srv, "POST", "reset", token).status_code == 403
        assert file_id in [f.id for f in keyed.files.list()]  # reset did not run
        if "api_key" in config:  # {"api_key": null} did not turn auth off
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0).files.list()


def test_admin_needs_the_right_admin_token(tmp_path):
    with running_server(tmp_path, config={**FAST, "api_key": CLIENT_KEY}, admin_token=ADMIN_TOKEN) as srv:
        keyed = openai.OpenAI(base_url=srv.base_url, api_key=CLIENT_KEY, max_retries=0)
        file_id = upload(keyed, [chat_line("a", "b")])
        wrong = [
            None,
            "wrong",
            ADMIN_TOKEN[:-1],
            ADMIN_TOKEN + "x",
            CLIENT_KEY,
            " " + ADMIN_TOKEN,
            "é".encode() * 8,
        ]
        for token in wrong:
            for method, path, body in (("GET", "config", None), ("PUT", "config", {"shuffle_seed": 1})):
                resp = admin(srv, method, path, token, json=body)
                assert resp.status_code == 401, (token, method)
                assert ADMIN_TOKEN not in resp.text and resp.headers["www-authenticate"] == "Bearer"
            assert admin(srv, "POST", "reset", token).status_code == 401
        for headers in (
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"Authorization": ADMIN_TOKEN},
            {"Authorization": "Bearer"},
            {"X-Admin-Token": ADMIN_TOKEN},
        ):
            assert admin(srv, "GET", "config", headers=headers).status_code == 401, headers
        assert admin(srv, "GET", "config", params={"token": ADMIN_TOKEN}).status_code == 401
        assert file_id in [f.id for f in keyed.files.list()]  # no refused reset ran
        assert srv.get_config()["shuffle_seed"] == 1234  # no refused PUT changed anything

        good = admin(srv, "GET", "config", ADMIN_TOKEN)
        assert good.status_code == 200 and good.json()["api_key"] == "***"
        assert (
            admin(srv, "GET", "config", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}).status_code == 200
        )
        assert srv.set_config({"shuffle_seed": 7})["shuffle_seed"] == 7
        srv.reset()
        assert keyed.files.list().data == [] and srv.get_config()["shuffle_seed"] == 1234
        # the admin token opens /_admin only, not /v1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key=ADMIN_TOKEN, max_retries=0).files.list()
        assert ADMIN_TOKEN not in srv.log()


def test_upstream_and_keys_cannot_be_changed_at_run_time_even_with_the_admin_token(tmp_path, listeners):
    upstream, catcher = listeners(), listeners()
    config = {**FAST, "api_key": CLIENT_KEY, "upstream_base_url": upstream.url, "upstream_api_key": UP_KEY}
    with running_server(tmp_path, config=config, admin_token=ADMIN_TOKEN) as srv:
        before = srv.get_config()
        attacks = [
            ({"upstream_base_url": catcher.url}, False),
            ({"upstream_base_url": catcher.url, "shuffle_seed": 5}, False),
            ({"shuffle_seed": 5, "upstream_base_url": None}, False),
            ({"upstream_api_key": "sk-attacker"}, False),
            ({"upstream_api_key": None}, False),
            ({"api_key": None}, False),
            ({"api_key": "attacker-key"}, False),
            ({"admin_token": "attacker-admin-token-0123456789"}, False),
            ({"allow_upstream_change": True, "upstream_base_url": catcher.url}, False),
            ({"upstream_base_url": catcher.url}, True),
            ({**FAST}, True),  # replace=true would drop api_key and the upstream
            ({}, True),
        ]
        for body, replace in attacks:
            params = {"replace": "true"} if replace else None
            resp = admin(srv, "PUT", "config", ADMIN_TOKEN, json=body, params=params)
            assert resp.status_code == 403, (body, replace, resp.text)
            assert "start" in resp.json()["error"]["message"], resp.text
            assert srv.get_config() == before, (body, replace)  # nothing changed, not even shuffle_seed

        # the masks round-trip: "***" keeps a secret, a GET body can be PUT back, even with replace=true
        assert (
            srv.set_config({"api_key": "***", "upstream_api_key": "***", "shuffle_seed": 7})["shuffle_seed"]
            == 7
        )
        assert srv.set_config({**before, "shuffle_seed": 8}, replace=True)["shuffle_seed"] == 8

        keyed = openai.OpenAI(base_url=srv.base_url, api_key=CLIENT_KEY, max_retries=0)
        batch = run_batch(keyed, [chat_line("ok", "the prompt text")])
        assert batch.status == "completed"
        assert catcher.requests == []  # neither the upstream key nor a prompt reached the catcher
        assert [r["headers"]["Authorization"] for r in upstream.requests] == [f"Bearer {UP_KEY}"]
        assert "the prompt text" in upstream.requests[0]["body"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="attacker-key", max_retries=0).files.list()


def test_an_open_server_cannot_be_pointed_at_an_upstream_or_keyed_at_run_time(srv, client, listeners):
    catcher = listeners()
    for body in ({"upstream_base_url": catcher.url}, {"upstream_api_key": "k"}, {"api_key": "k"}):
        resp = admin(srv, "PUT", "config", json=body)
        assert resp.status_code == 403 and "allow_upstream_change" in resp.json()["error"]["message"]
    assert run_batch(client, [chat_line("a", "secret prompt")]).status == "completed"
    assert catcher.requests == []


def test_allow_upstream_change_lets_the_admin_move_the_upstream(tmp_path, listeners):
    first, second = listeners(), listeners()
    config = {**FAST, "upstream_base_url": first.url, "upstream_api_key": UP_KEY}
    with running_server(tmp_path, config=config, admin_token=ADMIN_TOKEN, allow_upstream_change=True) as srv:
        assert admin(srv, "PUT", "config", json={"upstream_base_url": second.url}).status_code == 401
        srv.set_config({"upstream_base_url": second.url, "upstream_api_key": "sk-second"})
        assert run_batch(srv.client(max_retries=0), [chat_line("a", "b")]).status == "completed"
        assert first.requests == []
        assert [r["headers"]["Authorization"] for r in second.requests] == ["Bearer sk-second"]
        for body in ({"admin_token": "another-admin-token-0123456789"}, {"allow_upstream_change": False}):
            assert admin(srv, "PUT", "config", ADMIN_TOKEN, json=body).status_code == 403


def test_admin_token_from_flag_env_or_config_file_and_bad_ones_refused(tmp_path):
    import subprocess
    import sys

    from local_batch_server.__main__ import load_settings, parse_args
    from local_batch_server.config import ADMIN_TOKEN_ENV

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"api_key": CLIENT_KEY, "admin_token": "from-the-config-file-0123"}))
    _, policy = load_settings(parse_args(["--config", str(cfg)]), {})
    assert policy.admin_token == "from-the-config-file-0123" and not policy.allow_upstream_change
    _, policy = load_settings(
        parse_args(["--config", str(cfg)]), {ADMIN_TOKEN_ENV: "from-the-environment-0123"}
    )
    assert policy.admin_token == "from-the-environment-0123"
    args = parse_args(["--config", str(cfg), "--admin-token", ADMIN_TOKEN, "--allow-upstream-change"])
    _, policy = load_settings(args, {ADMIN_TOKEN_ENV: "from-the-environment-0123"})
    assert policy.admin_token == ADMIN_TOKEN and policy.allow_upstream_change
    _, policy = load_settings(parse_args([]), {ADMIN_TOKEN_ENV: ""})  # empty variable = unset
    assert policy.admin_token is None

    def start(*argv):
        cmd = [sys.executable, "-m", "local_batch_server", "--port", str(free_port())]
        cmd += ["--data-dir", str(tmp_path), *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    for bad in ("short", "has a space in it 0123456789", ""):
        done = start("--admin-token", bad)
        assert done.returncode == 2 and "admin token" in done.stderr, done.stderr
        assert done.stderr.count("\n") <= 2  # a message, not a traceback
    done = start("--allow-upstream-change")
    assert done.returncode == 2 and "admin token" in done.stderr, done.stderr
    helped = start("--help")
    for word in ("--admin-token", ADMIN_TOKEN_ENV, "--allow-upstream-change", "/_admin"):
        assert word in helped.stdout, word


def test_models_are_forwarded_to_the_upstream(tmp_path, listeners):
    """With an upstream, /v1/models and /v1/models/{id} are the upstream's (its names, its 404), asked
    with the upstream key; the local list is not consulted."""
    up = listeners()
    config = {**FAST, "upstream_base_url": up.url, "upstream_api_key": UP_KEY, "api_key": CLIENT_KEY}
    with running_server(tmp_path, config=config) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=CLIENT_KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["up-llm"]
        assert client.models.retrieve("up-llm").owned_by == "upstream"
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("gpt-4o")  # in the local default list, unknown upstream
        assert info.value.body["code"] == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        for dots in ("%2E%2E", "%2E", "a/%2E%2E/%2E%2E"):  # never another upstream path with the key
            auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
            resp = httpx.get(f"{srv.base_url}/models/{dots}", headers=auth)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", dots
    assert [r["path"] for r in up.requests] == ["/v1/models", "/v1/models/up-llm", "/v1/models/gpt-4o"]
    assert all(r["headers"]["Authorization"] == f"Bearer {UP_KEY}" for r in up.requests)


def test_models_upstream_down_is_a_502(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/v1"
    config = {**FAST, "upstream_base_url": down, "upstream_timeout_seconds": 2}
    with running_server(tmp_path, config=config) as srv:
        resp = httpx.get(srv.base_url + "/models", timeout=10)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error"


def test_a_request_body_of_odd_shapes_fails_only_its_own_line(client):
    odd = {"custom_id": "odd", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "assistant", "content": "a", "tool_calls": 5},
                                             {"role": "user", "content": "hi"}]}}  # fmt: skip
    batch = run_batch(client, [chat_line("good", "hello"), odd])
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == 1 and batch.request_counts.failed == 1
    (bad,) = read_lines(client, batch.error_file_id)
    assert bad["custom_id"] == "odd" and bad["response"]["status_code"] == 400
    (good,) = read_lines(client, batch.output_file_id)
    assert good["custom_id"] == "good" and good["response"]["body"]["choices"][0]["message"]["content"]

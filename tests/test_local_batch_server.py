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

from local_batch_server.testing import free_port, running_server

FAST = {"validating_seconds": 0.05, "in_progress_seconds": 0.1, "finalizing_seconds": 0.05}
TERMINAL = {"completed", "failed", "expired", "cancelled"}
PNG = b"\x89PNG\r\n\x1a\nnot-really-a-png-but-bytes"


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
    lines.append(chat_line("short", "one two three four five", max_tokens=2))
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
    }
    assert r3["choices"][0]["finish_reason"] == "stop"
    assert r3["usage"]["prompt_tokens"] == 3 and r3["usage"]["completion_tokens"] == 4

    sha = hashlib.sha256(PNG).hexdigest()[:16]
    img = by_id["img"]["response"]["body"]
    expected = f"ECHO: What is\nin this image? [image image/png sha256={sha}] [image url=https://example.com/cat.jpg]"
    assert img["choices"][0]["message"]["content"] == expected
    # 3 (system) + 5 (user text) words + 2 images * 85
    assert img["usage"]["prompt_tokens"] == 3 + 5 + 170
    assert img["usage"]["completion_tokens"] == len(expected.split())

    short = by_id["short"]["response"]["body"]
    assert short["choices"][0]["message"]["content"] == "ECHO: one"
    assert short["choices"][0]["finish_reason"] == "length"

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
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert batch.usage.input_tokens == 9 and batch.usage.output_tokens == 0


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
    assert s["usage"]["input_tokens"] == 5 and s["usage"]["output_tokens"] == 4
    assert s["usage"]["total_tokens"] == 9
    parts = by_id["parts"]["output"][0]["content"][0]["text"]
    assert parts == "ECHO: describe [image url=http://img.example/x.png]"
    assert by_id["parts"]["usage"]["input_tokens"] == 1 + 85
    assert by_id["t"]["output"][0]["content"][0]["text"] == "ECHO: a b"
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


def test_api_key(srv):
    srv.set_config({"api_key": "sekrit"})
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


def test_upstream_forwarding(srv, client, upstream):
    base, seen = upstream
    srv.set_config({"upstream_base_url": base, "upstream_api_key": "up-key"})
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

"""The local batch server's other providers, over real HTTP: Anthropic's Message Batches API (with httpx:
the anthropic SDK is not installed) and Azure OpenAI's URL and key styles (with the real openai clients).

One module-scoped server with an ``api_key`` (so every call also exercises the key checks) and an admin
token (``/_admin`` then needs it; :class:`RunningServer` sends it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from batchpipe.tokens import ANTHROPIC_TEXT_MODEL, anthropic_token_breakdown, count_text_tokens
from local_batch_server.testing import running_server

FAST = {"validating_seconds": 0.05, "in_progress_seconds": 0.1, "finalizing_seconds": 0.05}
KEY = "k"
ADMIN_TOKEN = "admin-token-0123456789"
VERSION = "2023-06-01"
CLAUDE = "claude-haiku-4-5"
PNG = b"\x89PNG\r\n\x1a\nnot-really-a-png-but-bytes"
B64 = base64.b64encode(PNG).decode()
SCHEMA = json.loads(
    (Path(__file__).parent / "data" / "anthropic_batch_objects.schema.json").read_text(encoding="utf-8")
)
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = {**FAST, "api_key": KEY}
    with running_server(tmp_path_factory.mktemp("providers"), config=config, admin_token=ADMIN_TOKEN) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.reset()
    return server


@pytest.fixture
def ant(srv):
    headers = {"x-api-key": KEY, "anthropic-version": VERSION}
    with httpx.Client(base_url=srv.root_url, headers=headers, timeout=10) as client:
        yield client


@pytest.fixture
def oai(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)


@functools.cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {**SCHEMA, "$ref": f"#/$defs/{name}"}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def check(name: str, obj) -> None:
    """``obj`` validates against ``#/$defs/<name>`` of the Anthropic objects schema."""
    validator(name).validate(obj)


def check_error(resp: httpx.Response, status: int, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    check("error_response", body)
    assert body["error"]["type"] == ERROR_TYPES[status]
    assert contains in body["error"]["message"]
    return body


def params(text, model=CLAUDE, max_tokens=200, **extra):
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def create(ant, requests) -> dict:
    resp = ant.post("/v1/messages/batches", json={"requests": requests})
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    check("message_batch", batch)
    assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
    assert resp.headers["request-id"].startswith("req_")
    return batch


def wait_ended(ant, batch_id, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = ant.get(f"/v1/messages/batches/{batch_id}").json()
        check("message_batch", batch)
        if batch["processing_status"] == "ended":
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch['processing_status']}"
        time.sleep(0.03)


def results(ant, batch) -> dict[str, dict]:
    resp = ant.get(batch["results_url"])
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-jsonl")
    lines = [json.loads(x) for x in resp.text.splitlines()]
    for line in lines:
        check("individual_response", line)
    by_id = {x["custom_id"]: x["result"] for x in lines}
    assert len(by_id) == len(lines), "a custom_id came back twice"
    return by_id


def run(ant, requests) -> tuple[dict, dict[str, dict]]:
    return run_existing(ant, create(ant, requests))


def run_existing(ant, created) -> tuple[dict, dict[str, dict]]:
    batch = wait_ended(ant, created["id"])
    return batch, results(ant, batch)


def chat_answers(client, lines) -> dict[str, dict]:
    """custom_id -> chat completion body, from an OpenAI chat batch on the same server."""
    text = "".join(json.dumps(x) + "\n" for x in lines)
    file_id = client.files.create(file=("in.jsonl", text.encode()), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 10
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.03)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return {x["custom_id"]: x["response"]["body"] for x in out}


def chat_line(custom_id, content, **body):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


# ---- Anthropic: happy path -------------------------------------------------------------------------
def test_anthropic_batch_answers_match_chat(srv, ant, oai):
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["a", "b"]}, "note": {"type": "string"}},
        "required": ["label", "note"],
        "additionalProperties": False,
    }
    image_blocks = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is in this image?"},
    ]
    chat_image = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    requests = [{"custom_id": f"r-{i}", "params": params(f"hello number {i}")} for i in range(6)]
    requests.append({"custom_id": "img", "params": {**params(image_blocks), "system": "You are terse."}})
    requests.append(
        {
            "custom_id": "schema",
            "params": params(
                "classify me", output_config={"format": {"type": "json_schema", "schema": schema}}
            ),
        }
    )
    requests.append({"custom_id": "short", "params": params("one two three four five six", max_tokens=3)})
    chat = [chat_line(f"r-{i}", f"hello number {i}") for i in range(6)]
    chat.append(chat_line("img", chat_image))
    chat.append(
        chat_line(
            "schema",
            "classify me",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    )
    chat.append(chat_line("short", "one two three four five six", max_tokens=3))
    expected = {k: v["choices"][0]["message"]["content"] for k, v in chat_answers(oai, chat).items()}

    created = create(ant, requests)
    assert created["id"].startswith("msgbatch_") and len(created["id"]) == len("msgbatch_") + 24
    assert created["request_counts"] == {
        "processing": 9,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    batch, by_id = run_existing(ant, created)
    assert batch["request_counts"] == {
        "processing": 0,
        "succeeded": 9,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch["results_url"] == f"{srv.root_url}/v1/messages/batches/{batch['id']}/results"
    assert batch["ended_at"] >= batch["created_at"] and batch["cancel_initiated_at"] is None
    assert set(by_id) == {r["custom_id"] for r in requests}
    for request in requests:
        result = by_id[request["custom_id"]]
        assert result["type"] == "succeeded"
        message = result["message"]
        assert message["model"] == CLAUDE and message["role"] == "assistant"
        text = message["content"][0]["text"]
        text_tokens, image_tokens, _, _ = anthropic_token_breakdown(request["params"])
        assert message["usage"] == {
            "input_tokens": text_tokens + image_tokens,
            "output_tokens": count_text_tokens(text, ANTHROPIC_TEXT_MODEL),
        }
        assert text == expected[request["custom_id"]]
        assert message["stop_reason"] == ("max_tokens" if request["custom_id"] == "short" else "end_turn")
    digest = hashlib.sha256(PNG).hexdigest()[:16]
    assert by_id["img"]["message"]["content"][0]["text"] == (
        f"ECHO: What is in this image? [image image/png sha256={digest}] [image url=https://example.com/cat.jpg]"
    )
    assert set(json.loads(by_id["schema"]["message"]["content"][0]["text"])) == {"label", "note"}


def test_anthropic_errored_lines(srv, ant):
    requests = [
        {"custom_id": "ok", "params": params("fine")},
        {"custom_id": "rejected", "params": params("please [[reject]] this")},
        {"custom_id": "no-max", "params": {"model": CLAUDE, "messages": [{"role": "user", "content": "x"}]}},
        {
            "custom_id": "no-model",
            "params": {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        },
    ]
    batch, by_id = run(ant, requests)
    assert batch["request_counts"] == {
        "processing": 0,
        "succeeded": 1,
        "errored": 3,
        "canceled": 0,
        "expired": 0,
    }
    assert by_id["ok"]["type"] == "succeeded"
    for cid in ("rejected", "no-max", "no-model"):
        assert by_id[cid]["type"] == "errored"
        assert by_id[cid]["error"]["type"] == "error"
        assert by_id[cid]["error"]["error"]["type"] == "invalid_request_error"
    assert "reject marker" in by_id["rejected"]["error"]["error"]["message"]
    assert by_id["no-max"]["error"]["error"]["message"] == "max_tokens: Field required"
    assert by_id["no-model"]["error"]["error"]["message"] == "model: Field required"


# ---- Anthropic: failure injection ------------------------------------------------------------------
def test_anthropic_expire_half(srv, ant):
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    requests = [{"custom_id": f"r{i}", "params": params(f"row {i}")} for i in range(10)]
    batch, by_id = run(ant, requests)
    assert batch["request_counts"] == {
        "processing": 0,
        "succeeded": 5,
        "errored": 0,
        "canceled": 0,
        "expired": 5,
    }
    assert {k for k, v in by_id.items() if v["type"] == "succeeded"} == {f"r{i}" for i in range(5)}
    assert {k for k, v in by_id.items() if v == {"type": "expired"}} == {f"r{i}" for i in range(5, 10)}
    again, _ = run(ant, requests[:2])  # expire_batches: only one batch expires
    assert again["request_counts"]["succeeded"] == 2


def test_anthropic_cancel(srv, ant):
    srv.set_config({"in_progress_seconds": 1.0})
    requests = [{"custom_id": f"r{i}", "params": params(f"row {i}")} for i in range(10)]
    created = create(ant, requests)
    deadline = time.monotonic() + 5
    while ant.get(f"/v1/messages/batches/{created['id']}").json()["request_counts"]["succeeded"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    resp = ant.post(f"/v1/messages/batches/{created['id']}/cancel")
    assert resp.status_code == 200
    canceling = resp.json()
    check("message_batch", canceling)
    assert canceling["processing_status"] == "canceling" and canceling["cancel_initiated_at"]
    batch = wait_ended(ant, created["id"])
    by_id = results(ant, batch)
    counts = batch["request_counts"]
    assert counts["canceled"] > 0 and counts["succeeded"] > 0 and counts["processing"] == 0
    assert counts["succeeded"] + counts["canceled"] == 10
    assert sum(v == {"type": "canceled"} for v in by_id.values()) == counts["canceled"]
    assert batch["cancel_initiated_at"] == canceling["cancel_initiated_at"]
    check_error(ant.post(f"/v1/messages/batches/{created['id']}/cancel"), 400, "ended")


def test_anthropic_lost_create_answer(srv, ant):
    fault = {"method": "POST", "path": "^/v1/messages/batches$", "status": 500, "after": True}
    srv.set_config({"http_faults": [fault]})
    resp = ant.post("/v1/messages/batches", json={"requests": [{"custom_id": "a", "params": params("x")}]})
    check_error(resp, 500, "Injected fault")
    listed = ant.get("/v1/messages/batches").json()
    assert len(listed["data"]) == 1  # created although the answer was lost
    wait_ended(ant, listed["data"][0]["id"])


@pytest.mark.parametrize("status", [429, 529, 404])
def test_anthropic_injected_fault_shapes(srv, ant, status):
    srv.set_config({"http_faults": [{"method": "GET", "path": "^/v1/messages/batches", "status": status}]})
    check_error(ant.get("/v1/messages/batches"), status)
    assert ant.get("/v1/messages/batches").status_code == 200


def test_anthropic_result_faults(srv, ant):
    srv.set_config({"result_faults": {"garbage_line": True, "unknown_ids": 1, "downloads": 1, "batches": 1}})
    created = create(ant, [{"custom_id": f"r{i}", "params": params(f"row {i}")} for i in range(3)])
    batch = wait_ended(ant, created["id"])
    assert batch["request_counts"]["succeeded"] == 3  # the counts stay true
    broken = ant.get(batch["results_url"]).text.splitlines()
    assert broken[-1].startswith("<html>") and len(broken) == 5
    assert json.loads(broken[-2])["custom_id"] == "never-sent-0"
    assert set(results(ant, batch)) == {"r0", "r1", "r2"}  # the next download is whole


# ---- Anthropic: API surface ------------------------------------------------------------------------
def test_anthropic_list_pagination(srv, ant):
    ids = [create(ant, [{"custom_id": "a", "params": params(f"b{i}")}])["id"] for i in range(5)]
    newest = ids[::-1]
    page = ant.get("/v1/messages/batches", params={"limit": 2}).json()
    check("message_batch_list", page)
    assert [b["id"] for b in page["data"]] == newest[:2]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (newest[0], newest[1], True)
    page = ant.get("/v1/messages/batches", params={"limit": 2, "after_id": page["last_id"]}).json()
    assert [b["id"] for b in page["data"]] == newest[2:4] and page["has_more"]
    page = ant.get("/v1/messages/batches", params={"limit": 2, "after_id": page["last_id"]}).json()
    assert [b["id"] for b in page["data"]] == newest[4:] and not page["has_more"]
    page = ant.get("/v1/messages/batches", params={"limit": 2, "before_id": newest[4]}).json()
    assert [b["id"] for b in page["data"]] == newest[2:4] and page["has_more"]
    assert ant.get("/v1/messages/batches").json()["data"][0]["id"] == newest[0]
    for limit in (0, 1001):
        check_error(ant.get("/v1/messages/batches", params={"limit": limit}), 400)
    empty = ant.get("/v1/messages/batches", params={"after_id": newest[4]}).json()
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


def test_anthropic_headers_and_auth(srv, ant):
    root = srv.root_url
    resp = httpx.get(f"{root}/v1/messages/batches", headers={"x-api-key": KEY})
    check_error(resp, 400, "anthropic-version header is required")
    assert resp.headers["request-id"].startswith("req_")
    for headers in ({"x-api-key": "wrong"}, {}, {"Authorization": f"Bearer {KEY}"}):
        check_error(
            httpx.get(f"{root}/v1/messages/batches", headers={"anthropic-version": VERSION, **headers}), 401
        )
    check_error(ant.get("/v1/messages/batches/msgbatch_nope"), 404)
    check_error(ant.get("/v1/messages/batches/msgbatch_nope/results"), 404)
    check_error(ant.get("/v1/messages/nowhere"), 404)


TWO = [{"custom_id": "a", "params": params("x")}, {"custom_id": "b", "params": params("y")}]


@pytest.mark.parametrize(
    ("body", "config", "says"),
    [
        ({}, {}, "requests: Field required"),
        ({"requests": []}, {}, "at least 1 item"),
        ({"requests": "x"}, {}, "requests: Field required"),
        ({"requests": [{"custom_id": "bad id!", "params": params("x")}]}, {}, "custom_id"),
        ({"requests": [{"custom_id": "x" * 65, "params": params("x")}]}, {}, "custom_id"),
        ({"requests": [TWO[0], {**TWO[1], "custom_id": "a"}]}, {}, "duplicate custom_id"),
        ({"requests": [{"custom_id": "a", "params": "not an object"}]}, {}, "params"),
        ({"requests": TWO}, {"max_requests_per_file": 1}, "at most 1 requests"),
    ],
)
def test_anthropic_create_refusals(srv, ant, body, config, says):
    srv.set_config(config)
    check_error(ant.post("/v1/messages/batches", json=body), 400, says)
    assert ant.get("/v1/messages/batches").json()["data"] == []


def test_anthropic_too_large_and_bad_json(srv, ant):
    srv.set_config({"max_file_bytes": 200})
    big = {"requests": [{"custom_id": "a", "params": params("x" * 300)}]}
    check_error(ant.post("/v1/messages/batches", json=big), 413)
    check_error(ant.post("/v1/messages/batches", content=b"{not json"), 400)


def test_anthropic_results_and_delete_lifecycle(srv, ant):
    srv.set_config({"validating_seconds": 5.0})
    created = create(ant, [{"custom_id": "a", "params": params("x")}])
    check_error(ant.get(f"/v1/messages/batches/{created['id']}/results"), 404, "not ended")
    check_error(ant.delete(f"/v1/messages/batches/{created['id']}"), 400)
    srv.set_config({"validating_seconds": 0.0})  # read live: releases the batch
    wait_ended(ant, created["id"])
    resp = ant.delete(f"/v1/messages/batches/{created['id']}")
    assert resp.status_code == 200
    check("deleted_message_batch", resp.json())
    assert resp.json() == {"id": created["id"], "type": "message_batch_deleted"}
    check_error(ant.get(f"/v1/messages/batches/{created['id']}"), 404)
    assert ant.get("/v1/messages/batches").json()["data"] == []


def test_anthropic_and_openai_batches_stay_apart(srv, ant, oai):
    created = create(ant, [{"custom_id": "a", "params": params("x")}])
    assert oai.batches.list().data == []
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve(created["id"])
    for name in ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"):
        assert oai.models.retrieve(name).id == name
    wait_ended(ant, created["id"])


def test_anthropic_contract_every_object(srv, ant):
    """Every kind of batch object, list page and result line validates against the schema."""
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    expired, lines = run(ant, [{"custom_id": f"e{i}", "params": params(f"r{i}")} for i in range(4)])
    assert {v["type"] for v in lines.values()} == {"succeeded", "expired"}
    srv.set_config({"in_progress_seconds": 1.0})
    requests = [
        {"custom_id": f"c{i}", "params": params("[[reject]]" if i == 0 else f"r{i}")} for i in range(10)
    ]
    created = create(ant, requests)
    deadline = time.monotonic() + 5
    while ant.get(f"/v1/messages/batches/{created['id']}").json()["request_counts"]["processing"] > 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    check("message_batch", ant.post(f"/v1/messages/batches/{created['id']}/cancel").json())
    canceled = wait_ended(ant, created["id"])
    assert {v["type"] for v in results(ant, canceled).values()} == {"errored", "canceled", "succeeded"}
    check("message_batch_list", ant.get("/v1/messages/batches").json())
    check("deleted_message_batch", ant.delete(f"/v1/messages/batches/{expired['id']}").json())


# ---- Azure OpenAI ----------------------------------------------------------------------------------
def azure_batch(client) -> openai.types.Batch:
    lines = [chat_line(f"r{i}", f"azure {i}") for i in range(3)]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    file_id = client.files.create(file=("in.jsonl", text.encode()), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 10
    while batch.status != "completed":
        assert batch.status not in ("failed", "expired", "cancelled") and time.monotonic() < deadline
        time.sleep(0.03)
        batch = client.batches.retrieve(batch.id)
    out = {
        json.loads(x)["custom_id"]: json.loads(x)
        for x in client.files.content(batch.output_file_id).text.splitlines()
    }
    assert {k: v["response"]["body"]["choices"][0]["message"]["content"] for k, v in out.items()} == {
        f"r{i}": f"ECHO: azure {i}" for i in range(3)
    }
    return batch


def test_azure_v1_base_url(srv, oai):
    base_url = srv.root_url + "/openai/v1"
    client = openai.OpenAI(base_url=base_url, api_key=KEY, default_headers={"api-key": KEY}, max_retries=0)
    batch = azure_batch(client)
    assert oai.batches.retrieve(batch.id).status == "completed"  # the same batches as /v1


def test_azure_client_with_api_version(srv):
    client = openai.AzureOpenAI(
        azure_endpoint=srv.root_url, api_key=KEY, api_version="2024-10-21", max_retries=0
    )
    batch = azure_batch(client)
    assert client.batches.list().data[0].id == batch.id


def test_azure_api_key_header_and_errors(srv):
    root = srv.root_url
    assert httpx.get(f"{root}/openai/v1/models", headers={"api-key": KEY}).status_code == 200
    assert (
        httpx.get(f"{root}/openai/models?api-version=2024-10-21", headers={"api-key": KEY}).status_code == 200
    )
    assert (
        httpx.get(f"{root}/openai/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    )
    resp = httpx.get(f"{root}/openai/batches", headers={"api-key": KEY})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "api-version query parameter is required"
    for headers in ({"api-key": "wrong"}, {}):
        resp = httpx.get(f"{root}/openai/v1/batches", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{root}/v1/models", headers={"api-key": KEY}).status_code == 401  # Azure paths only

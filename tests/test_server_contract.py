"""Contract test: every JSON object the local batch server returns is valid under OpenAI's published
OpenAPI spec (the vendored subset ``tests/data/openai_openapi_subset.json``; its ``x-source`` says where
it comes from and what was left out), and its usage figures count tokens as the estimate does.

Real server over real HTTP (``running_server``); raw JSON read with httpx, so nothing is hidden by the
openai client's lenient parsing; the openai client is used where the brief asks for it (models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import test_local_batch_server as lbs
from local_batch_server.testing import running_server

FAST = lbs.FAST
server, srv = lbs.server, lbs.srv  # the fixtures: a server of this module's own, reset for each test
SPEC_PATH = Path(__file__).parent / "data" / "openai_openapi_subset.json"
SPEC_URI = "urn:openai-openapi-subset"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "questions.csv"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
PNG_1x1 = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
    "AAAABJRU5ErkJggg=="
)


# ---- the spec --------------------------------------------------------------------------------------
def to_json_schema(node):
    """OpenAPI 3.0 leftovers to JSON Schema 2020-12: ``nullable: true`` -> also ``null``; the OpenAPI
    ``discriminator`` keyword is dropped (an annotation: the ``oneOf`` branches decide)."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k != "discriminator"}
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="module")
def spec():
    doc = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    src = doc["x-source"]
    assert src["repository"] == "openai/openai-openapi" and len(src["commit"]) == 40
    return to_json_schema(doc)


@pytest.fixture(scope="module")
def check(spec):
    """``check(name, obj)``: assert ``obj`` is valid as ``#/components/schemas/<name>``."""
    registry = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    seen: dict[str, int] = {}

    def _check(name: str, obj) -> None:
        assert name in spec["components"]["schemas"], name
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=registry
        )
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        details = "\n".join(f"  at {list(e.absolute_path)}: {e.message[:300]}" for e in errors[:10])
        assert not errors, f"not a valid {name}:\n{details}\n{json.dumps(obj)[:1500]}"
        seen[name] = seen.get(name, 0) + 1

    _check.seen = seen
    return _check


def test_the_subset_rejects_what_the_spec_rejects(check):
    """The checker is not a rubber stamp: a Response without the fields the spec requires fails."""
    good = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": "gpt-4o",
        "tools": [],
        "output": [],
        "parallel_tool_calls": True,
        "metadata": {},
        "tool_choice": "auto",
        "temperature": 1,
        "top_p": 1,
    }
    check("Response", good)
    for key in ("metadata", "temperature", "top_p", "tools"):
        bad = {k: v for k, v in good.items() if k != key}
        with pytest.raises(AssertionError, match="not a valid Response"):
            check("Response", bad)
    with pytest.raises(AssertionError):
        check(
            "Batch",
            {
                "id": "b",
                "object": "batch",
                "endpoint": "/v1/chat/completions",
                "input_file_id": "f",
                "completion_window": "24h",
                "status": "completed",
                "created_at": 1,
                "output_file_id": None,
            },
        )
    with pytest.raises(AssertionError):
        check("Model", {"id": "gpt-4o", "object": "model", "created": 1})


# ---- the server (fixtures ``server`` / ``srv`` from test_local_batch_server: one per module) ----------
@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.base_url, headers={"Authorization": "Bearer x"}, timeout=10) as client:
        yield client


def ok_json(resp: httpx.Response, status: int = 200):
    assert resp.status_code == status, resp.text
    return resp.json()


def upload(http, lines, check, name="input.jsonl"):
    text = "".join(json.dumps(x) + "\n" for x in lines)
    meta = ok_json(http.post("/files", data={"purpose": "batch"}, files={"file": (name, text.encode())}))
    check("OpenAIFile", meta)
    return meta["id"]


def run_batch(http, check, lines, endpoint, wait_for=TERMINAL, **extra):
    body = {
        "input_file_id": upload(http, lines, check),
        "endpoint": endpoint,
        "completion_window": "24h",
        **extra,
    }
    batch = ok_json(http.post("/batches", json=body))
    check("Batch", batch)
    deadline = time.monotonic() + 15
    while batch["status"] not in wait_for:
        assert time.monotonic() < deadline, f"batch stuck in {batch['status']}"
        time.sleep(0.03)
        batch = ok_json(http.get(f"/batches/{batch['id']}"))
        check("Batch", batch)
    return batch


def lines_of(http, check, file_id):
    meta = ok_json(http.get(f"/files/{file_id}"))
    check("OpenAIFile", meta)
    return [json.loads(x) for x in http.get(f"/files/{file_id}/content").text.splitlines()]


BODY_SCHEMA = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/responses": "Response",
    "/v1/embeddings": "CreateEmbeddingResponse",
    "/v1/completions": "CreateCompletionResponse",
}


def check_result_files(http, check, batch):
    """Every line of the output and error files: a valid batch output line whose body is valid for the
    batch's endpoint (200) or an ErrorResponse (4xx/5xx)."""
    got = {}
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            for line in lines_of(http, check, batch[key]):
                check("BatchRequestOutput", line)
                resp = line["response"]
                if resp is not None:
                    name = BODY_SCHEMA[batch["endpoint"]] if resp["status_code"] == 200 else "ErrorResponse"
                    check(name, resp["body"])
                got[line["custom_id"]] = line
    return got


def chat(custom_id, content, model="gpt-4o-mini", **body):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def resp(custom_id, model="gpt-4.1-mini", **body):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": model, **body},
    }


def test_every_object_of_every_endpoint_is_valid(http, srv, check):
    # files: upload, list, retrieve, content, delete
    fid = upload(http, [chat("a", "hi")], check)
    check("ListFilesResponse", ok_json(http.get("/files")))
    check("ListFilesResponse", ok_json(http.get("/files", params={"purpose": "batch_output"})))  # empty
    check("OpenAIFile", ok_json(http.get(f"/files/{fid}")))
    assert http.get(f"/files/{fid}/content").status_code == 200
    check("DeleteFileResponse", ok_json(http.delete(f"/files/{fid}")))

    # chat: text, image, truncation, reject marker -> output and error files
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": PNG_1x1, "detail": "low"}},
        ],
    }
    lines = [
        chat("c1", "hello"),
        chat("c2", "one two three four five", max_tokens=2),
        chat("c3", "please [[reject]] me"),
        {
            "custom_id": "c4",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be terse."}, image]},
        },
    ]
    batch = run_batch(http, check, lines, "/v1/chat/completions", metadata={"job": "contract"})
    assert batch["status"] == "completed" and batch["output_file_id"] and batch["error_file_id"]
    got = check_result_files(http, check, batch)
    assert got["c3"]["response"]["status_code"] == 400
    assert got["c2"]["response"]["body"]["choices"][0]["finish_reason"] == "length"

    # responses: string input + instructions, parts with an image, truncated (incomplete), metadata echoed
    lines = [
        resp("r1", input="plain string input", instructions="be brief", metadata={"k": "v"}),
        resp(
            "r2",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "describe"},
                        {"type": "input_image", "image_url": PNG_1x1},
                    ],
                }
            ],
        ),
        resp("r3", input="a b c d e f g h", max_output_tokens=3, temperature=0.2),
    ]
    batch = run_batch(http, check, lines, "/v1/responses")
    got = check_result_files(http, check, batch)
    r1, r3 = got["r1"]["response"]["body"], got["r3"]["response"]["body"]
    assert r1["metadata"] == {"k": "v"} and r1["instructions"] == "be brief" and r1["status"] == "completed"
    assert r3["status"] == "incomplete" and r3["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r3["temperature"] == 0.2 and r3["usage"]["output_tokens"] <= 3

    # embeddings and completions
    emb = [
        {
            "custom_id": "e1",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["some text", "more text"]},
        }
    ]
    check_result_files(http, check, run_batch(http, check, emb, "/v1/embeddings"))
    cmp_ = [
        {
            "custom_id": "p1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "gpt-4o-mini", "prompt": ["x y", "z"], "max_tokens": 50},
        }
    ]
    check_result_files(http, check, run_batch(http, check, cmp_, "/v1/completions"))

    # failed at validation (errors list), expired (unrun lines in the error file), cancelled
    srv.set_config({"fail_validation": {"times": 1}})
    failed = run_batch(http, check, [chat("f", "x")], "/v1/chat/completions")
    assert failed["status"] == "failed" and failed["errors"]["data"]
    srv.set_config({"expire_fraction": 0.5})
    expired = run_batch(http, check, [chat(f"x{i}", "x") for i in range(4)], "/v1/chat/completions")
    assert expired["status"] == "expired"
    assert any(x["error"] for x in check_result_files(http, check, expired).values())
    srv.set_config({"expire_fraction": None, "in_progress_seconds": 30})
    running = run_batch(
        http, check, [chat(f"k{i}", "x") for i in range(4)], "/v1/chat/completions", wait_for={"in_progress"}
    )
    cancelling = ok_json(http.post(f"/batches/{running['id']}/cancel"))
    check("Batch", cancelling)
    srv.set_config({"in_progress_seconds": 0.1})
    deadline = time.monotonic() + 10
    while cancelling["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.03)
        cancelling = ok_json(http.get(f"/batches/{running['id']}"))
        check("Batch", cancelling)
    check_result_files(http, check, cancelling)

    # lists: batches (also a page and an empty page), files
    check("ListBatchesResponse", ok_json(http.get("/batches")))
    check("ListBatchesResponse", ok_json(http.get("/batches", params={"limit": 1})))
    check("ListBatchesResponse", ok_json(http.get("/batches", params={"after": "batch_unknown"})))
    check("ListFilesResponse", ok_json(http.get("/files")))

    # models
    check("ListModelsResponse", ok_json(http.get("/models")))
    check("Model", ok_json(http.get("/models/gpt-4o")))

    # errors: unknown file / batch / model / URL, bad purpose, bad JSON, bad limit
    for call, status in (
        (lambda: http.get("/files/file-nope"), 404),
        (lambda: http.get("/batches/batch_nope"), 404),
        (lambda: http.get("/models/gpt-4o-mnii"), 404),
        (lambda: http.get("/nowhere"), 404),
        (lambda: http.post("/files", data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b"{}")}), 400),
        (lambda: http.post("/batches", content=b"{not json"), 400),
        (lambda: http.get("/batches", params={"limit": 0}), 400),
    ):
        check("ErrorResponse", ok_json(call(), status))

    for name in (
        "OpenAIFile",
        "Batch",
        "BatchRequestOutput",
        "Response",
        "CreateChatCompletionResponse",
        "CreateEmbeddingResponse",
        "CreateCompletionResponse",
        "ErrorResponse",
        "ListModelsResponse",
        "Model",
        "ListBatchesResponse",
        "ListFilesResponse",
        "DeleteFileResponse",
    ):
        assert check.seen.get(name), f"{name} never checked"


def test_auth_error_is_an_error_response(tmp_path, check):
    with running_server(tmp_path, config={**FAST, "api_key": "sk-right"}) as srv:
        r = httpx.get(f"{srv.base_url}/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=10)
        check("ErrorResponse", ok_json(r, 401))


# ---- models ------------------------------------------------------------------------------------------
def test_models_list_and_retrieve_with_the_openai_client(srv):
    from batchpipe.estimate import load_prices

    client = srv.client(max_retries=0)
    model = client.models.retrieve("gpt-4o")
    assert (model.id, model.object) == ("gpt-4o", "model") and model.owned_by
    names = {m.id for m in client.models.list()}
    # every model of the shipped price table, and every name the tests and the demo send to the server
    assert set(load_prices()["models"]) <= names
    assert {"gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "gpt-5", "text-embedding-3-small", "o3-mini"} <= names
    assert "gpt-4o-mnii" not in names


def test_unknown_model_is_openais_404(srv):
    client = srv.client(max_retries=0)
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o-mnii")
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `gpt-4o-mnii` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    # hostile names: slashes, a fine-tune name, a very long one, odd characters
    r = httpx.get(f"{srv.base_url}/models/org/gpt-4o", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("The model `org/gpt-4o`")
    r = httpx.get(f"{srv.base_url}/models/ft:gpt-4o-mini:org::abc", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{srv.base_url}/models/" + "a" * 5000, timeout=10)
    assert r.status_code == 404 and len(r.text) < 1000 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{srv.base_url}/models/%3Cscript%3E", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("The model `<script>`")


def test_models_list_is_configurable_and_null_accepts_any_name(srv):
    client = srv.client(max_retries=0)
    srv.set_config({"models": ["local-llm", "acme-llm-7"]})
    assert sorted(m.id for m in client.models.list()) == ["acme-llm-7", "local-llm"]
    assert client.models.retrieve("local-llm").id == "local-llm"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    srv.set_config({"models": None})
    assert client.models.retrieve("anything-at-all").id == "anything-at-all"
    assert list(client.models.list()) == []
    srv.reset()
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    for bad in ([""], ["ok", 3], "gpt-4o", ["x" * 300]):
        r = httpx.put(f"{srv.root_url}/_admin/config", json={"models": bad}, timeout=10)
        assert r.status_code == 400, (bad, r.text)


# ---- usage counts tokens like the estimate ------------------------------------------------------------
def test_usage_counts_prompt_tokens_like_the_estimate_on_the_demo_sample(http, srv, check, tmp_path):
    from batchpipe.build import build_jsonl
    from batchpipe.estimate import estimate_build
    from batchpipe.options import BuildOptions
    from batchpipe.tokens import count_text_tokens, request_prompt_tokens

    for endpoint in ("/v1/chat/completions", "/v1/responses"):
        opts = BuildOptions(
            model="gpt-4o", image_column="image", endpoint=endpoint, system_prompt="Be brief."
        )
        build = build_jsonl(
            SAMPLE, opts, tmp_path / endpoint.strip("/").replace("/", "_"), allowed_roots=None
        )
        reported = refused = 0  # prompt tokens the server reported; those of the row it refused
        for shard in build["shards"]:
            sent = [json.loads(x) for x in Path(shard["path"]).read_text(encoding="utf-8").splitlines()]
            batch = run_batch(http, check, sent, endpoint)
            assert batch["status"] == "completed"
            got = check_result_files(http, check, batch)
            batch_reported = 0
            for line in sent:
                expected = request_prompt_tokens(line["body"], endpoint, "gpt-4o")
                if "[[reject]]" in json.dumps(line):  # the sample's row that the server refuses
                    assert got[line["custom_id"]]["response"]["status_code"] == 400
                    refused += expected
                    continue
                body = got[line["custom_id"]]["response"]["body"]
                if endpoint == "/v1/responses":
                    prompt, completion = body["usage"]["input_tokens"], body["usage"]["output_tokens"]
                    text = body["output"][0]["content"][0]["text"]
                else:
                    prompt, completion = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
                    text = body["choices"][0]["message"]["content"]
                assert (prompt, completion) == (expected, count_text_tokens(text, "gpt-4o")), line
                batch_reported += prompt
            assert batch["usage"]["input_tokens"] == batch_reported
            reported += batch_reported
        estimate = estimate_build(build["manifest"])
        assert reported + refused == estimate["prompt_tokens"]  # the demo's "actual vs estimated": 0 %
        assert estimate["image_tokens"] > 0  # the sample's image row is counted by formula on both sides


def test_truncation_counts_tokens_not_words(http, srv, check):
    from batchpipe.tokens import count_text_tokens

    text = "antidisestablishmentarianism " * 6
    batch = run_batch(
        http, check, [chat("t", text, model="gpt-4o", max_completion_tokens=5)], "/v1/chat/completions"
    )
    body = check_result_files(http, check, batch)["t"]["response"]["body"]
    content = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == count_text_tokens(content, "gpt-4o") <= 5

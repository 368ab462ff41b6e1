"""Contract test: every request line the build writes is valid under OpenAI's published OpenAPI spec.

Real lines from :func:`batchpipe.build.build_jsonl` (chat and responses, with a ``response_schema``, with
data-URL images made with Pillow, and plain), each ``body`` checked against ``CreateChatCompletionRequest``
/ ``CreateResponse`` of the vendored subset ``tests/data/openai_openapi_subset.json`` (its ``x-source``,
and ``x-source.requests`` for these schemas, say where each part was copied from), and each line's
envelope against ``BatchRequestInput``.

What is not the published spec, and why it cannot make a line pass that the spec refuses:

* ``x-pruned`` stubs (accept anything) stand only for fields our lines never set (``tools``,
  ``modalities``, ``audio``, ``prompt_cache_options``...). :func:`test_no_stub_accepts_any_part_of_our_lines`
  validates every line again with each stub replaced by ``false`` (refuse everything): they still pass,
  so no stub accepted any part of them.
* ``InputItem`` is ``x-narrowed`` to its ``EasyInputMessage`` branch (stricter than the spec). The spec's
  ``oneOf`` relies on the OpenAPI discriminator ``type``; our messages carry none (the API reference's
  own "easy" form), which under plain JSON Schema matches both ``EasyInputMessage`` and
  ``Item``/``InputMessage``: the tests check our items against both.
* ``BatchRequestInput`` is local: the spec at the vendored commit has no schema for a batch input line;
  it follows OpenAI's Batch guide (``custom_id``, ``method`` POST, ``url`` one of the batch endpoints,
  ``body``; all required), and the tests add that ``custom_id`` is unique within a file.
* ``format: uri`` (image URLs) is checked with the RFC 3986 character rules below: ``jsonschema`` has
  no ``uri`` checker without the optional ``rfc3987`` package.

The negative tests prove the checks can fail (so nothing here passes vacuously).
"""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import re
from pathlib import Path

import jsonschema
import pytest
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from batchpipe.build import build_jsonl, make_body
from batchpipe.errors import InputError
from batchpipe.options import BuildOptions
from batchpipe.schema import SCHEMA_NAME
from test_server_contract import SPEC_PATH, SPEC_URI, to_json_schema

BODY = {"/v1/chat/completions": "CreateChatCompletionRequest", "/v1/responses": "CreateResponse"}
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "data/structured/review_schema.json").read_text())
# RFC 3986: a scheme, ":", then only unreserved, reserved and percent-encoded characters
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("uri")(lambda value: not isinstance(value, str) or URI.fullmatch(value) is not None)


# ---- the spec --------------------------------------------------------------------------------------
def _load(refuse_stubs: bool = False) -> dict:
    spec = to_json_schema(json.loads(SPEC_PATH.read_text(encoding="utf-8")))
    if refuse_stubs:
        schemas = spec["components"]["schemas"]
        for name, schema in list(schemas.items()):
            if "x-pruned" in schema:
                schemas[name] = False
    return spec


class Checker:
    """``checker(name, obj)``: assert ``obj`` is valid as ``#/components/schemas/<name>``;
    ``checker.errors(name, obj)``: the messages (empty when valid)."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
        )

    def errors(self, name: str, obj) -> list[str]:
        assert name in self.spec["components"]["schemas"], name
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=self.registry, format_checker=FORMATS
        )
        found = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"at {list(e.absolute_path)}: {e.message[:300]}" for e in found]

    def __call__(self, name: str, obj) -> None:
        errors = self.errors(name, obj)
        assert not errors, f"not a valid {name}:\n" + "\n".join(errors[:10]) + f"\n{json.dumps(obj)[:1500]}"


@pytest.fixture(scope="module")
def check() -> Checker:
    return Checker(_load())


@pytest.fixture(scope="module")
def check_no_stubs() -> Checker:
    return Checker(_load(refuse_stubs=True))


def test_the_subset_has_the_request_schemas_copied_not_stubbed(check):
    schemas = check.spec["components"]["schemas"]
    copied = [
        "CreateChatCompletionRequest", "CreateModelResponseProperties", "ChatCompletionRequestMessage",
        "ChatCompletionRequestSystemMessage", "ChatCompletionRequestUserMessage",
        "ChatCompletionRequestUserMessageContentPart", "ChatCompletionRequestMessageContentPartText",
        "ChatCompletionRequestMessageContentPartImage", "ResponseFormatJsonSchema",
        "ResponseFormatJsonSchemaSchema", "CreateResponse", "ResponseProperties", "InputParam",
        "EasyInputMessage", "InputMessage", "InputMessageContentList", "InputContent", "InputTextContent",
        "InputImageContent", "ImageDetail", "ResponseTextParam", "TextResponseFormatConfiguration",
        "TextResponseFormatJsonSchema", "ModelIdsShared", "ModelIdsResponses", "ModelResponseProperties",
    ]  # fmt: skip
    for name in copied:
        assert schemas[name] is not False and "x-pruned" not in schemas[name], name
    raw = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    assert "x-narrowed" in raw["components"]["schemas"]["InputItem"]
    assert raw["components"]["schemas"]["BatchRequestInput"]["x-source"].startswith("LOCAL")
    assert "CreateResponse" in raw["x-source"]["requests"]


# ---- real lines ----------------------------------------------------------------------------------------
def png(color: str, size=(6, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def sample(tmp_path) -> Path:
    """A CSV of five rows: three with an image file beside it (a data URL in the request), two without."""
    (tmp_path / "red.png").write_bytes(png("red"))
    (tmp_path / "blue.png").write_bytes(png("blue", (3, 9)))
    rows = [
        {"id": "r1", "prompt": "Great product, arrived early.", "image": "red.png"},
        {"id": "r2", "prompt": 'Broke after a day; "support" never answered.', "image": ""},
        {"id": "r3", "prompt": "Fine, I guess. Émoji ✓ and\nnewlines.", "image": "blue.png"},
        {"id": "r4", "prompt": "What colour is this?", "image": "red.png"},
        {"id": "r5", "prompt": "No picture here.", "image": ""},
    ]
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["id", "prompt", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def built_lines(csv_path: Path, opts: BuildOptions, work: Path) -> list[dict]:
    result = build_jsonl(csv_path, opts, work, allowed_roots=None)
    assert result["invalid"] == 0 and result["valid"] == 5, result.get("first_invalid")
    return [
        json.loads(line)
        for shard in result["shards"]
        for line in Path(shard["path"]).read_text(encoding="utf-8").splitlines()
    ]


CASES = {
    "chat, schema, images": dict(
        endpoint="/v1/chat/completions", response_schema=SCHEMA, image_column="image", image_detail="low",
        system_prompt="Classify the review.", max_tokens=300, temperature=0.2,
    ),
    "chat, schema, images, reasoning model": dict(
        endpoint="/v1/chat/completions", model="gpt-5-mini", response_schema=SCHEMA, image_column="image",
        max_tokens=2000,
    ),
    "responses, schema, images": dict(
        endpoint="/v1/responses", model="gpt-4.1-mini", response_schema=SCHEMA, image_column="image",
        image_detail="high", system_prompt="Classify the review.", max_tokens=300, temperature=1,
    ),
    "chat, no schema": dict(endpoint="/v1/chat/completions", system_prompt="Be brief.", max_tokens=50),
    "chat, no schema, images": dict(endpoint="/v1/chat/completions", image_column="image"),
    "responses, no schema, images": dict(endpoint="/v1/responses", image_column="image"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_every_built_line_is_valid_under_the_spec(case, sample, tmp_path, check, check_no_stubs):
    opts = BuildOptions(id_column="id", **CASES[case])
    lines = built_lines(sample, opts, tmp_path / "work")
    assert len({line["custom_id"] for line in lines}) == len(lines) == 5  # unique within the file
    images = 0
    for line in lines:
        check("BatchRequestInput", line)
        assert line["url"] == opts.endpoint
        body = line["body"]
        check(BODY[opts.endpoint], body)
        check_no_stubs(BODY[opts.endpoint], body)  # no x-pruned stub accepted any part of it
        images += _check_parts(check, opts, body)
        _check_schema_field(opts, body)
    assert images == (3 if opts.image_column else 0)  # the image branches were really exercised


def _check_parts(check: Checker, opts: BuildOptions, body: dict) -> int:
    """The message / input parts on their own, against the spec's part schemas; the number of images."""
    images = 0
    if opts.endpoint == "/v1/chat/completions":
        for message in body["messages"]:
            check("ChatCompletionRequestMessage", message)
            for part in message["content"] if isinstance(message["content"], list) else ():
                check("ChatCompletionRequestUserMessageContentPart", part)
                if part["type"] == "image_url":
                    check("ChatCompletionRequestMessageContentPartImage", part)
                    assert part["image_url"]["url"].startswith("data:image/png;base64,")
                    assert URI.fullmatch(part["image_url"]["url"])
                    images += 1
    elif isinstance(body["input"], list):
        for item in body["input"]:
            check("EasyInputMessage", item)  # the branch InputItem is narrowed to
            check("InputMessage", item)  # and the spec's Item/InputMessage: valid under both
            for part in item["content"]:
                check("InputContent", part)
                if part["type"] == "input_image":
                    check("InputImageContent", part)
                    assert part["image_url"].startswith("data:image/png;base64,")
                    images += 1
    return images


def _check_schema_field(opts: BuildOptions, body: dict) -> None:
    """With a schema: the format names it as the spec's description asks (a-z, A-Z, 0-9, _ and -, at most
    64) and carries the schema as sent (every object closed); without: no format field at all."""
    fmt = body.get("response_format") if opts.endpoint == "/v1/chat/completions" else body.get("text")
    if opts.response_schema is None:
        assert fmt is None
        return
    if opts.endpoint == "/v1/chat/completions":
        fmt = fmt["json_schema"]
    else:
        fmt = fmt["format"]
        assert fmt["type"] == "json_schema"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fmt["name"]) and fmt["name"] == SCHEMA_NAME
    assert fmt["strict"] is True and fmt["schema"] == opts.checked_schema.schema
    assert fmt["schema"]["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(fmt["schema"])


# ---- the checks can fail ---------------------------------------------------------------------------------
def chat_body(**over) -> dict:
    opts = BuildOptions(response_schema=SCHEMA, image_column="image")
    url = "data:image/png;base64," + base64.b64encode(png("red")).decode()
    return {**make_body(opts, "hi", url), **over}


def responses_body(**over) -> dict:
    opts = BuildOptions(endpoint="/v1/responses", response_schema=SCHEMA, image_column="image")
    url = "data:image/png;base64," + base64.b64encode(png("red")).decode()
    return {**make_body(opts, "hi", url), **over}


def without(obj: dict, path: str) -> dict:
    """A deep copy of ``obj`` with the key at dotted ``path`` removed."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]
    return obj


def test_the_checks_refuse_what_the_spec_refuses(check, check_no_stubs):
    chat, resp = chat_body(), responses_body()
    check("CreateChatCompletionRequest", chat)
    check("CreateResponse", resp)
    image_part = chat["messages"][0]["content"][1]
    refused = {
        "chat: response_format json_schema without json_schema": (
            "CreateChatCompletionRequest",
            chat_body(response_format={"type": "json_schema"}),
        ),
        "chat: json_schema without name": (
            "CreateChatCompletionRequest",
            without(chat, "response_format.json_schema.name"),
        ),
        "chat: an unknown response_format type": (
            "CreateChatCompletionRequest",
            chat_body(response_format={"type": "yaml"}),
        ),
        "chat: no messages": ("CreateChatCompletionRequest", chat_body(messages=[])),
        "chat: no model": ("CreateChatCompletionRequest", without(chat, "model")),
        "chat: a message of no known role": (
            "CreateChatCompletionRequest",
            chat_body(messages=[{"role": "robot", "content": "hi"}]),
        ),
        "chat: an image part without url": (
            "CreateChatCompletionRequest",
            without(chat, "messages.0.content.1.image_url.url"),
        ),
        "chat: an image detail the spec does not list": (
            "ChatCompletionRequestMessageContentPartImage",
            {**image_part, "image_url": {**image_part["image_url"], "detail": "original"}},
        ),
        "chat: an image url that is no URI (base64 with a line break)": (
            "ChatCompletionRequestMessageContentPartImage",
            {**image_part, "image_url": {"url": "data:image/png;base64,iVBO\nRw0K"}},
        ),
        "chat: an image url that is no URI (a bare file name)": (
            "ChatCompletionRequestMessageContentPartImage",
            {**image_part, "image_url": {"url": "cat 1.png"}},
        ),
        "chat: temperature above 2": ("CreateChatCompletionRequest", chat_body(temperature=2.5)),
        "responses: text.format without name": ("CreateResponse", without(resp, "text.format.name")),
        "responses: text.format without schema": ("CreateResponse", without(resp, "text.format.schema")),
        "responses: text.format in the chat shape": (
            "CreateResponse",
            responses_body(text={"format": chat["response_format"]}),
        ),
        "responses: an input_image without detail": (
            "CreateResponse",
            without(resp, "input.0.content.1.detail"),
        ),
        "responses: a chat image part in responses input": (
            "CreateResponse",
            responses_body(input=[{"role": "user", "content": [image_part]}]),
        ),
        "responses: max_output_tokens below 16": ("CreateResponse", responses_body(max_output_tokens=8)),
        "envelope: method GET": (
            "BatchRequestInput",
            {"custom_id": "a", "method": "GET", "url": "/v1/responses", "body": resp},
        ),
        "envelope: no body": (
            "BatchRequestInput",
            {"custom_id": "a", "method": "POST", "url": "/v1/responses"},
        ),
        "envelope: url not a batch endpoint": (
            "BatchRequestInput",
            {"custom_id": "a", "method": "POST", "url": "/v1/chat", "body": chat},
        ),
    }
    for what, (name, obj) in refused.items():
        assert check.errors(name, obj), f"accepted, but the spec refuses it: {what}"
    # a field behind an x-pruned stub: the usual check accepts it, the stub-refusing one does not
    check("CreateChatCompletionRequest", chat_body(modalities=["text"]))
    assert check_no_stubs.errors("CreateChatCompletionRequest", chat_body(modalities=["text"]))


def test_responses_max_tokens_below_16_is_refused_before_anything_is_sent(sample, tmp_path, check):
    # CreateResponse takes max_output_tokens from 16 on: a smaller max_tokens fails every request
    with pytest.raises(InputError, match="max_tokens.*at least 16 for /v1/responses"):
        built_lines(
            sample, BuildOptions(endpoint="/v1/responses", id_column="id", max_tokens=15), tmp_path / "a"
        )
    lines = built_lines(
        sample, BuildOptions(endpoint="/v1/responses", id_column="id", max_tokens=16), tmp_path / "b"
    )
    for line in lines:
        assert line["body"]["max_output_tokens"] == 16
        check("CreateResponse", line["body"])

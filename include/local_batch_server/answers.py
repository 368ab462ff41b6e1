"""Deterministic answers of the local batch server (tests depend on these exact formats).

Every answer body is valid under OpenAI's published OpenAPI spec (``CreateChatCompletionResponse``,
``Response``, ``CreateEmbeddingResponse``, ``CreateCompletionResponse``; ``tests/test_server_contract.py``).

Tokens are counted the way the pipeline's estimate counts them (:mod:`batchpipe.tokens`): prompt tokens
= ``request_prompt_tokens(body, endpoint, model)`` (the model's BPE encoding, chat framing, images by
OpenAI's formula; for a model without an image rule, or an image ``detail`` the formula refuses: the
text tokens plus ``IMAGE_TOKENS`` per image); completion / output tokens = the tokens of the answer text
in the model's encoding. ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` cut the
answer to its longest whitespace-word prefix of at most that many tokens (words joined with one space).

"Text of a message": its ``content`` when a string, else the ``text`` of its text parts (types
``text``, ``input_text``, ``output_text``) joined with ``"\\n"``; ``None`` content counts as ``""``.

Images (parts of type ``image_url`` or ``input_image``; the URL is ``part["image_url"]["url"]`` or
``part["image_url"]`` when a string) produce a suffix, appended in order after the echoed text:

* ``data:`` URL -> ``" [image {mime} sha256={h}]"``, ``h`` = first 16 hex chars of the sha256 of the
  base64-decoded bytes (undecodable base64 -> a 400 ``invalid_image`` error line);
* other URL (http/https) -> ``" [image url={url}]"``; ``input_image`` with only ``file_id`` ->
  ``" [image file_id={file_id}]"``.

``/v1/chat/completions`` (body ``model``, ``messages``)::

    content = "ECHO: " + text(last message with role "user") + image suffixes of that message
    finish_reason = "length" when cut by max_completion_tokens (or max_tokens), else "stop"
    {"id": "chatcmpl-<24 hex>", "object": "chat.completion", "created": <ts>, "model": <model>,
     "choices": [{"index": 0, "message": {"role": "assistant", "content": ..., "refusal": null,
                  "annotations": []}, "logprobs": null, "finish_reason": "stop"|"length"}],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
               "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                             "accepted_prediction_tokens": 0,
                                             "rejected_prediction_tokens": 0}},
     "service_tier": "default", "system_fingerprint": "fp_local"}

``/v1/responses`` (body ``model``, ``input``: a string = one user message, or a list of messages whose
content is a string or ``input_text``/``input_image`` parts; ``instructions`` is echoed, not answered)::

    text = "ECHO: " + text(last user message) + image suffixes   (same rule as chat)
    cut by max_output_tokens -> status = "incomplete", incomplete_details = {"reason": "max_output_tokens"}
    {"id": "resp_<24 hex>", "object": "response", "created_at": <ts>, "status": "completed",
     "completed_at": <ts> (completed only), "error": null, "incomplete_details": null,
     "instructions": <echoed>, "model": <model>, "output": [{"type": "message", "id": "msg_<24 hex>",
     "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": ...,
     "annotations": [], "logprobs": []}]}], "metadata": <echoed or {}>, "temperature": <echoed or 1.0>,
     "top_p": <echoed or 1.0>, "max_output_tokens": <echoed or null>, "parallel_tool_calls": true,
     "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled",
     "reasoning": {"effort": null, "summary": null}, "previous_response_id": null, "store": true,
     "background": false, "service_tier": "default",
     "usage": {"input_tokens", "output_tokens", "total_tokens",
               "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
               "output_tokens_details": {"reasoning_tokens": 0}}}

``/v1/embeddings`` (body ``model``, ``input``: string or list of strings (or token-id lists, taken as
their ids joined with spaces))::

    digest = sha256(text.encode("utf-8")).digest()
    embedding = [round(int.from_bytes(digest[4*i:4*i+4], "big") / 2**32 * 2 - 1, 6) for i in range(8)]
    {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}, ...],
     "model": <model>, "usage": {"prompt_tokens": <tokens of input>, "total_tokens": same}}

``/v1/completions`` (body ``model``, ``prompt`` string or list)::

    text = "ECHO: " + prompt   (list -> one choice per prompt); max_tokens cuts as above
    {"id": "cmpl-<24 hex>", "object": "text_completion", "created", "model",
     "choices": [{"index", "text", "logprobs": null, "finish_reason"}],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

Structured outputs: a chat request with ``response_format: {"type": "json_schema", "json_schema":
{"schema"}}`` or a responses request with ``text: {"format": {"type": "json_schema", "schema"}}`` is
answered with compact JSON that follows the schema (:func:`schema_answer`), derived from the echo text
above: strings are the echo text (a ``format`` gets a fixed value of that format), an ``enum`` / numbers
/ integers / booleans are picked by a hash of the echo text and the property's path (numbers within
``minimum`` / ``maximum``), arrays hold ``max(1, minItems)`` items, a null union takes its other type,
``anyOf`` its first branch, ``$ref`` its definition. ``max_tokens`` cuts that JSON as it cuts text (then
it is no longer JSON, ``finish_reason`` "length"). A last user message containing :data:`NOT_JSON_MARKER`
is answered with the plain echo text instead. The responses body echoes the request's ``text`` format.

``/v1/messages`` (Anthropic Messages ``params``, used by the Message Batches API; tokens counted by
:func:`batchpipe.tokens.anthropic_token_breakdown` (input: text + image tokens) and in
:data:`~batchpipe.tokens.ANTHROPIC_TEXT_MODEL`'s encoding (output))::

    text = "ECHO: " + text(last user message) + image suffixes   (same rule and order as chat)
    content: a string or blocks {"type": "text", "text"} / {"type": "image", "source": {"type": "base64",
    "media_type", "data"}} (suffix as the data URL "data:<media_type>;base64,<data>") / {"type": "image",
    "source": {"type": "url", "url"}} (" [image url=...]"); ``system`` is not echoed
    output_config: {"format": {"type": "json_schema", "schema"}} -> the JSON answer (as response_format)
    max_tokens (required, int >= 1) cuts as above -> stop_reason "max_tokens", else "end_turn"
    {"id": "msg_<24 hex>", "type": "message", "role": "assistant", "model": <model>,
     "content": [{"type": "text", "text": ...}], "stop_reason": "end_turn"|"max_tokens",
     "stop_sequence": null, "usage": {"input_tokens", "output_tokens"}}

A missing ``model`` / ``max_tokens`` / ``messages`` raises a :class:`RequestError` whose message is
Anthropic's (``"max_tokens: Field required"``); the server turns it into an ``errored`` result.

A body without a string ``model`` gets a 400 ``missing_required_parameter`` error line. Ids are
derived from sha256(batch id + custom_id), so they are stable for a given batch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
import urllib.parse
from typing import Any

from batchpipe.tokens import (
    ANTHROPIC_TEXT_MODEL,
    UnknownModel,
    anthropic_token_breakdown,
    count_text_tokens,
    iter_request_images,
    request_prompt_tokens,
    request_text_tokens,
)

IMAGE_TOKENS = 85
#: In a structured request's prompt: answer with the plain echo text, not JSON (to test the error path).
NOT_JSON_MARKER = "[[not json]]"
FORMAT_VALUES = {
    "date-time": "2026-01-02T03:04:05Z", "time": "03:04:05", "date": "2026-01-02", "duration": "P1D",
    "email": "row@example.com", "hostname": "example.com", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}  # fmt: skip
TEXT_PART_TYPES = {"text", "input_text", "output_text"}
IMAGE_PART_TYPES = {"image_url", "input_image"}

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


class RequestError(Exception):
    """A per-request error: becomes an error-file line with this status and an OpenAI error body."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400, param=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error" if self.status < 500 else "server_error",
                "param": self.param,
                "code": self.code,
            }
        }


def prompt_tokens(body: dict[str, Any], url: str, model: str) -> int:
    """Prompt tokens of a request, as the estimate counts them (see the module docstring)."""
    try:
        try:
            return request_prompt_tokens(body, url, model)
        except (UnknownModel, ValueError):  # no image rule for the model, or an image detail it refuses
            return request_text_tokens(body, url, model) + IMAGE_TOKENS * len(iter_request_images(body, url))
    except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a body of odd shapes: that line only
        raise RequestError(f"Invalid request body: {type(exc).__name__}.", code="invalid_request") from None


def _image_url(part: dict[str, Any]) -> str | None:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def image_suffix(part: dict[str, Any]) -> str:
    url = _image_url(part)
    if url is None:
        file_id = part.get("file_id")
        if isinstance(file_id, str):
            return f" [image file_id={file_id}]"
        raise RequestError("Image part without an image URL.", code="invalid_image", param="image_url")
    match = _DATA_URL.match(url)
    if match:
        mime = match.group("mime") or "text/plain"
        data = match.group("data")
        if ";base64" in match.group("params"):
            try:
                raw = base64.b64decode(data.strip(), validate=False)
            except (binascii.Error, ValueError) as exc:
                raise RequestError(
                    "Invalid base64 data in image data URL.", code="invalid_image", param="image_url"
                ) from exc
        else:
            raw = urllib.parse.unquote_to_bytes(data)
        return f" [image {mime} sha256={hashlib.sha256(raw).hexdigest()[:16]}]"
    return f" [image url={url}]"


def message_parts(content: Any) -> tuple[str, list[dict[str, Any]]]:
    """(text, image parts) of a message content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, list):
        texts: list[str] = []
        images: list[dict[str, Any]] = []
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in IMAGE_PART_TYPES:
                images.append(part)
        return "\n".join(texts), images
    raise RequestError("Invalid message content.", param="content")


def _echo(messages: list[Any]) -> str:
    """``"ECHO: "`` + the text and image suffixes of the last user message."""
    last_user: tuple[str, list[dict[str, Any]]] | None = None
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("Each message must be an object.", param="messages")
        text, images = message_parts(message.get("content"))
        if message.get("role") == "user":
            last_user = (text, images)
    text, images = last_user or ("", [])
    return "ECHO: " + text + "".join(image_suffix(part) for part in images)


def _truncate(text: str, limit: Any, model: str) -> tuple[str, bool]:
    """``text`` cut to its longest word prefix of at most ``limit`` tokens; (text, cut?)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return text, False
    if count_text_tokens(text, model) <= limit:
        return text, False
    words = text.split()
    lo, hi = 0, len(words)  # the answer is in [lo, hi): prefixes of lo words fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_text_tokens(" ".join(words[:mid]), model) <= limit:
            lo = mid
        else:
            hi = mid
    return " ".join(words[:lo]), True


def _require_model(body: Any) -> str:
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", param="body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(
            "You must provide a model parameter.", code="missing_required_parameter", param="model"
        )
    return model


def _hex_id(seed: str, salt: str) -> str:
    return hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:24]


def chat_completion(body: dict[str, Any], seed: str = "") -> dict[str, Any]:
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array.", param="messages")
    content = _shaped(_echo(messages), _chat_schema(body))
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    content, truncated = _truncate(content, limit, model)
    prompt = prompt_tokens(body, "/v1/chat/completions", model)
    completion = count_text_tokens(content, model)
    return {
        "id": "chatcmpl-" + _hex_id(seed, "chat"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if truncated else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_local",
    }


def _chat_schema(body: dict[str, Any]) -> Any:
    fmt = body.get("response_format")
    if (
        isinstance(fmt, dict)
        and fmt.get("type") == "json_schema"
        and isinstance(fmt.get("json_schema"), dict)
    ):
        return fmt["json_schema"].get("schema")
    return None


def _responses_schema(body: dict[str, Any]) -> Any:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return fmt.get("schema")
    return None


def _shaped(echo: str, schema: Any) -> str:
    """The answer text: ``echo``, or with a schema the JSON that follows it (see the module docstring)."""
    if not isinstance(schema, dict) or NOT_JSON_MARKER in echo:
        return echo
    return json.dumps(schema_answer(schema, echo), ensure_ascii=False, separators=(",", ":"))


def schema_answer(schema: dict[str, Any], echo: str) -> Any:
    """A value that follows ``schema``, derived from ``echo`` (deterministic)."""

    def pick(path: str, n: int) -> int:
        return int(hashlib.sha256(f"{echo}\x00{path}".encode()).hexdigest()[:8], 16) % max(n, 1)

    def fill(node: Any, path: str, depth: int) -> Any:
        if not isinstance(node, dict) or depth > 12:
            return None
        if isinstance(node.get("$ref"), str):
            section, _, name = node["$ref"][2:].partition("/")
            return fill(
                (schema.get(section) or {}).get(name) if node["$ref"] != "#" else schema, path, depth + 1
            )
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return node["enum"][pick(path, len(node["enum"]))]
        if isinstance(node.get("anyOf"), list) and node["anyOf"]:
            branches = [b for b in node["anyOf"] if not (isinstance(b, dict) and b.get("type") == "null")]
            return fill((branches or node["anyOf"])[0], path, depth)
        kinds = node.get("type")
        kinds = [kinds] if isinstance(kinds, str) else [k for k in (kinds or []) if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), "null")
        if kind == "object":
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            return {name: fill(sub, f"{path}.{name}", depth + 1) for name, sub in props.items()}
        if kind == "array":
            low = node.get("minItems") if isinstance(node.get("minItems"), int) else 1
            return [fill(node.get("items"), f"{path}[{i}]", depth + 1) for i in range(max(low, 1))]
        if kind == "string":
            return FORMAT_VALUES.get(node.get("format"), echo)
        if kind in ("integer", "number"):
            return number(node, path, kind == "integer")
        if kind == "boolean":
            return pick(path, 2) == 0
        return None

    def number(node: dict[str, Any], path: str, whole: bool) -> float | int:
        low, high = node.get("minimum"), node.get("maximum")
        above, below = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        if whole:
            lo = int(low) if low is not None else (int(above) + 1 if above is not None else 0)
            hi = int(high) if high is not None else (int(below) - 1 if below is not None else lo + 99)
            return lo + pick(path, hi - lo + 1) if hi >= lo else lo
        lo = low if low is not None else (above if above is not None else 0)
        hi = high if high is not None else (below if below is not None else lo + 100)
        return round(lo + (pick(path, 999) + 1) / 1000 * (hi - lo), 3)

    return fill(schema, "$", 0)


def _number(value: Any, low: float, high: float, default: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    return value if ok else default


def _metadata(value: Any) -> dict[str, str]:
    """``metadata`` echoed when it is a valid map (at most 16 string values), else ``{}``."""
    if isinstance(value, dict) and len(value) <= 16 and all(isinstance(v, str) for v in value.values()):
        return value
    return {}


def response(body: dict[str, Any], seed: str = "") -> dict[str, Any]:
    model = _require_model(body)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        messages: list[Any] = [{"role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        messages = [item for item in raw_input if isinstance(item, dict) and "content" in item]
    else:
        raise RequestError("'input' must be a string or an array.", param="input")
    instructions = body.get("instructions")
    if not isinstance(instructions, (str, list)):
        instructions = None
    limit = body.get("max_output_tokens")
    text_format = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    text, truncated = _truncate(_shaped(_echo(messages), _responses_schema(body)), limit, model)
    input_tokens = prompt_tokens(body, "/v1/responses", model)
    output_tokens = count_text_tokens(text, model)
    status = "incomplete" if truncated else "completed"
    created = int(time.time())
    answer = {
        "id": "resp_" + _hex_id(seed, "resp"),
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": instructions,
        "max_output_tokens": limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_" + _hex_id(seed, "msg"),
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "background": False,
        "metadata": _metadata(body.get("metadata")),
        "temperature": _number(body.get("temperature"), 0, 2, 1.0),
        "top_p": _number(body.get("top_p"), 0, 1, 1.0),
        "text": text_format,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    if not truncated:
        answer["completed_at"] = created
    return answer


def embedding_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round(int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**32 * 2 - 1, 6) for i in range(8)]


def _embedding_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list) and all(isinstance(x, int) for x in item):
        return " ".join(str(x) for x in item)
    raise RequestError("'input' must be a string or an array of strings.", param="input")


def embeddings(body: dict[str, Any], seed: str = "") -> dict[str, Any]:
    model = _require_model(body)
    raw_input = body.get("input")
    if isinstance(raw_input, str) or (
        isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input)
    ):
        items = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        items = raw_input
    else:
        raise RequestError("'input' must be a non-empty string or array.", param="input")
    texts = [_embedding_text(item) for item in items]
    tokens = prompt_tokens(body, "/v1/embeddings", model)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding_vector(t)} for i, t in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def completion(body: dict[str, Any], seed: str = "") -> dict[str, Any]:
    model = _require_model(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or an array of strings.", param="prompt")
    choices = []
    completion_tokens = 0
    for index, text in enumerate(prompts):
        answer, truncated = _truncate("ECHO: " + text, body.get("max_tokens"), model)
        completion_tokens += count_text_tokens(answer, model)
        choices.append(
            {
                "index": index,
                "text": answer,
                "logprobs": None,
                "finish_reason": "length" if truncated else "stop",
            }
        )
    return {
        "id": "cmpl-" + _hex_id(seed, "cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": (prompt := prompt_tokens(body, "/v1/completions", model)),
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }


def _anthropic_part(block: Any) -> Any:
    """An Anthropic content block as the chat part that gets the same text / image suffix."""
    if not isinstance(block, dict) or block.get("type") != "image":
        return block
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    kind = source.get("type")
    if kind == "base64":
        url = f"data:{source.get('media_type') or ''};base64,{source.get('data') or ''}"
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind == "file" and isinstance(source.get("file_id"), str):
        return {"type": "input_image", "file_id": source["file_id"]}
    raise RequestError("messages: invalid image source.", code="invalid_image", param="messages")


def _anthropic_schema(params: dict[str, Any]) -> Any:
    """The schema of ``output_config.format`` (or of the older ``output_format``) when it is json_schema."""
    config = params.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else params.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return fmt.get("schema")
    return None


def message(params: Any, seed: str = "") -> dict[str, Any]:
    """The Anthropic Message answering ``params`` (see the module docstring)."""
    if not isinstance(params, dict):
        raise RequestError("params: Input should be a valid dictionary.", param="params")
    for name in ("model", "max_tokens", "messages"):
        if name not in params:
            raise RequestError(f"{name}: Field required", param=name)
    model = params["model"]
    if not isinstance(model, str) or not model:
        raise RequestError("model: Input should be a valid string", param="model")
    limit = params["max_tokens"]
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        problem = "max_tokens: Input should be an integer greater than or equal to 1"
        raise RequestError(problem, param="max_tokens")
    messages = params["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: Input should be a non-empty list", param="messages")
    chat_messages = []
    for item in messages:
        if not isinstance(item, dict):
            raise RequestError("messages: Input should be a valid dictionary", param="messages")
        content = item.get("content")
        if isinstance(content, list):
            content = [_anthropic_part(block) for block in content]
        chat_messages.append({"role": item.get("role"), "content": content})
    text, truncated = _truncate(
        _shaped(_echo(chat_messages), _anthropic_schema(params)), limit, ANTHROPIC_TEXT_MODEL
    )
    try:
        text_tokens, image_tokens, _, _ = anthropic_token_breakdown(params)
    except (TypeError, AttributeError, KeyError, ValueError):
        raise RequestError("Invalid request body.", param="params") from None
    return {
        "id": "msg_" + _hex_id(seed, "message"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if truncated else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": text_tokens + image_tokens,
            "output_tokens": count_text_tokens(text, ANTHROPIC_TEXT_MODEL),
        },
    }


HANDLERS = {
    "/v1/chat/completions": chat_completion,
    "/v1/responses": response,
    "/v1/embeddings": embeddings,
    "/v1/completions": completion,
    "/v1/messages": message,
}


def answer(url: str, body: Any, seed: str = "") -> dict[str, Any]:
    """The deterministic answer body for one request; raises RequestError for a 4xx line."""
    handler = HANDLERS.get(url)
    if handler is None:
        raise RequestError(f"Unsupported endpoint {url}.", param="url")
    return handler(body, seed)


def usage_of(body: Any) -> tuple[int, int]:
    """(input tokens, output tokens) from any answer body's usage (chat, responses, embeddings)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    inp = usage.get("input_tokens", usage.get("prompt_tokens", 0))
    out = usage.get("output_tokens", usage.get("completion_tokens", 0))
    return (inp if isinstance(inp, int) else 0), (out if isinstance(out, int) else 0)

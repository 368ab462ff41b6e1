"""Deterministic answers of the local batch server (tests depend on these exact formats).

Words: ``len(text.split())`` (whitespace-separated). "Text of a message": its ``content`` when a
string, else the ``text`` of its text parts (types ``text``, ``input_text``, ``output_text``) joined
with ``"\\n"``; ``None`` content counts as ``""``.

Images (parts of type ``image_url`` or ``input_image``; the URL is ``part["image_url"]["url"]`` or
``part["image_url"]`` when a string) produce a suffix, appended in order after the echoed text:

* ``data:`` URL -> ``" [image {mime} sha256={h}]"``, ``h`` = first 16 hex chars of the sha256 of the
  base64-decoded bytes (undecodable base64 -> a 400 ``invalid_image`` error line);
* other URL (http/https) -> ``" [image url={url}]"``; ``input_image`` with only ``file_id`` ->
  ``" [image file_id={file_id}]"``.

``/v1/chat/completions`` (body ``model``, ``messages``)::

    content = "ECHO: " + text(last message with role "user") + image suffixes of that message
    prompt_tokens = sum(words(text(m)) for m in messages) + 85 * (images in all messages)
    completion_tokens = words(content)
    if max_completion_tokens (or max_tokens) < completion_tokens:
        content = " ".join(content.split()[:limit]); finish_reason = "length"
    {"id": "chatcmpl-<24 hex>", "object": "chat.completion", "created": <ts>, "model": <model>,
     "choices": [{"index": 0, "message": {"role": "assistant", "content": ..., "refusal": null},
                  "logprobs": null, "finish_reason": "stop"|"length"}],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
               "prompt_tokens_details": {"cached_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0}},
     "system_fingerprint": "fp_local"}

``/v1/responses`` (body ``model``, ``input``: a string = one user message, or a list of messages whose
content is a string or ``input_text``/``input_image`` parts; ``instructions`` is not echoed but its
words count in ``input_tokens``)::

    text = "ECHO: " + text(last user message) + image suffixes   (same rule as chat)
    input_tokens = words(instructions) + sum(words(text(m))) + 85 * images
    output_tokens = words(text); max_output_tokens truncates like max_tokens and then
    status = "incomplete", incomplete_details = {"reason": "max_output_tokens"}
    {"id": "resp_<24 hex>", "object": "response", "created_at": <ts>, "status": "completed",
     "model": <model>, "output": [{"type": "message", "id": "msg_<24 hex>", "status": "completed",
     "role": "assistant", "content": [{"type": "output_text", "text": ..., "annotations": []}]}],
     "usage": {"input_tokens", "output_tokens", "total_tokens",
               "input_tokens_details": {"cached_tokens": 0},
               "output_tokens_details": {"reasoning_tokens": 0}}, ...}

``/v1/embeddings`` (body ``model``, ``input``: string or list of strings (or token-id lists, taken as
their ids joined with spaces))::

    digest = sha256(text.encode("utf-8")).digest()
    embedding = [round(int.from_bytes(digest[4*i:4*i+4], "big") / 2**32 * 2 - 1, 6) for i in range(8)]
    {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}, ...],
     "model": <model>, "usage": {"prompt_tokens": sum(words(input)), "total_tokens": same}}

``/v1/completions`` (body ``model``, ``prompt`` string or list)::

    text = "ECHO: " + prompt   (list -> one choice per prompt); max_tokens truncates as above
    {"id": "cmpl-<24 hex>", "object": "text_completion", "created", "model",
     "choices": [{"index", "text", "logprobs": null, "finish_reason"}],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

A body without a string ``model`` gets a 400 ``missing_required_parameter`` error line. Ids are
derived from sha256(batch id + custom_id), so they are stable for a given batch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
import urllib.parse
from typing import Any

IMAGE_TOKENS = 85
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


def words(text: str) -> int:
    return len(text.split())


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


def _echo_and_tokens(messages: list[Any], extra_prompt_words: int = 0) -> tuple[str, int]:
    prompt_tokens = extra_prompt_words
    last_user: tuple[str, list[dict[str, Any]]] | None = None
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("Each message must be an object.", param="messages")
        text, images = message_parts(message.get("content"))
        prompt_tokens += words(text) + IMAGE_TOKENS * len(images)
        if message.get("role") == "user":
            last_user = (text, images)
    text, images = last_user or ("", [])
    content = "ECHO: " + text + "".join(image_suffix(part) for part in images)
    return content, prompt_tokens


def _truncate(text: str, limit: Any) -> tuple[str, bool]:
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 and words(text) > limit:
        return " ".join(text.split()[:limit]), True
    return text, False


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
    content, prompt_tokens = _echo_and_tokens(messages)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    content, truncated = _truncate(content, limit)
    completion_tokens = words(content)
    return {
        "id": "chatcmpl-" + _hex_id(seed, "chat"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if truncated else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": "fp_local",
    }


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
    extra = words(instructions) if isinstance(instructions, str) else 0
    text, input_tokens = _echo_and_tokens(messages, extra)
    text, truncated = _truncate(text, body.get("max_output_tokens"))
    output_tokens = words(text)
    return {
        "id": "resp_" + _hex_id(seed, "resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if truncated else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": instructions,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_" + _hex_id(seed, "msg"),
                "status": "incomplete" if truncated else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


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
    tokens = sum(words(t) for t in texts)
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
    prompt_tokens = completion_tokens = 0
    for index, text in enumerate(prompts):
        answer, truncated = _truncate("ECHO: " + text, body.get("max_tokens"))
        prompt_tokens += words(text)
        completion_tokens += words(answer)
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
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


HANDLERS = {
    "/v1/chat/completions": chat_completion,
    "/v1/responses": response,
    "/v1/embeddings": embeddings,
    "/v1/completions": completion,
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

"""Parse Batch API output/error files into per-request outcomes.

OpenAI (and Azure OpenAI) output line: ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}``. Error-file line: a non-200 ``response`` or ``"response": null, "error":
{"code", "message"}``. Anthropic Message Batches result line: ``{"custom_id", "result": {"type":
"succeeded", "message": {...}}}`` (or ``errored`` with ``error``, ``expired``, ``canceled``): told apart
by its shape, whatever the endpoint. Nothing here raises on a malformed line: it becomes an Outcome with
an ``error``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

#: ``error_code`` of an answer (``error`` None) that was cut off at the token limit: the text is kept; a
#: structured run cannot parse it.
TRUNCATED = "truncated"


@dataclass
class Outcome:
    custom_id: str | None
    response: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    #: short key for report counts, e.g. "invalid_request", "batch_expired"; on an answer: TRUNCATED or None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _usage(body: dict, endpoint: str) -> tuple[int | None, int | None, int | None]:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None, None, None
    if endpoint == "/v1/responses":
        return (
            _int(usage.get("input_tokens")),
            _int(usage.get("output_tokens")),
            _int(usage.get("total_tokens")),
        )
    if endpoint == "/v1/embeddings":
        return _int(usage.get("prompt_tokens")), None, _int(usage.get("total_tokens"))
    return (
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        _int(usage.get("total_tokens")),
    )


class _Malformed(Exception):
    pass


def _chat_text(body: dict) -> str:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("no choices in the response body")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise _Malformed("no message in choices[0]")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if texts:
            return "".join(texts)
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        raise _Malformed(f"refusal: {refusal}")
    raise _Malformed("choices[0].message.content is empty")


def _responses_text(body: dict) -> str:
    output = body.get("output")
    if not isinstance(output, list):
        raise _Malformed("no output list in the response body")
    texts: list[str] = []
    refusals: list[str] = []
    for item in output:
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        content = item.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
    if texts:
        return "".join(texts)
    if refusals:
        raise _Malformed(f"refusal: {' '.join(refusals)}")
    status = body.get("status")
    raise _Malformed(f"no output_text in the response (status {status})" if status else "no output_text")


def _embedding_text(body: dict) -> str:
    data = body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise _Malformed("no data in the embeddings body")
    emb = data[0].get("embedding")
    if isinstance(emb, list) or isinstance(emb, str):  # list of floats, or base64 string
        return json.dumps(emb) if isinstance(emb, list) else emb
    raise _Malformed("no embedding in data[0]")


def _error_text(err: Any) -> tuple[str | None, str]:
    """(code, message) of an OpenAI error object."""
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        message = err.get("message")
        return (str(code) if code else None), (str(message) if message is not None else json.dumps(err))
    if isinstance(err, str):
        return None, err
    return None, json.dumps(err)


def parse_result_line(line: Any, endpoint: str) -> Outcome:
    """One output/error-file line (already JSON-decoded) → Outcome. Never raises."""
    if not isinstance(line, dict):
        return Outcome(None, error="malformed result line: not a JSON object", error_code="malformed_result")
    cid = line.get("custom_id")
    cid = cid if isinstance(cid, str) else (str(cid) if cid is not None else None)
    response = line.get("response")
    err = line.get("error")
    if response is None and isinstance(line.get("result"), dict):
        return _anthropic_outcome(cid, line["result"])
    if not isinstance(response, dict):
        if err:
            code, message = _error_text(err)
            return Outcome(cid, error=f"{code}: {message}" if code else message, error_code=code or "error")
        return Outcome(
            cid, error="malformed result line: no response and no error", error_code="malformed_result"
        )

    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        code, message = (None, "")
        if isinstance(body, dict) and "error" in body:
            code, message = _error_text(body.get("error"))
        elif body is not None:
            message = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        head = f"HTTP {status} {code}" if code else f"HTTP {status}"
        text = f"{head}: {message}" if message else head
        return Outcome(cid, error=text, error_code=code or f"http_{status}")

    if isinstance(body, str):  # some proxies return the body as a JSON string
        try:
            body = json.loads(body)
        except json.JSONDecodeError:
            body = None
    if not isinstance(body, dict):
        return Outcome(
            cid, error="malformed result: HTTP 200 without a JSON body", error_code="malformed_result"
        )
    p, c, t = _usage(body, endpoint)
    try:
        if endpoint == "/v1/responses":
            text = _responses_text(body)
        elif endpoint == "/v1/embeddings":
            text = _embedding_text(body)
        else:
            text = _chat_text(body)
    except _Malformed as exc:
        msg = str(exc)
        code = "refusal" if msg.startswith("refusal:") else "malformed_result"
        if code == "malformed_result":
            msg = f"malformed result: {msg}"
        return Outcome(cid, error=msg, prompt_tokens=p, completion_tokens=c, total_tokens=t, error_code=code)
    return Outcome(cid, response=text, prompt_tokens=p, completion_tokens=c, total_tokens=t,
                   error_code=TRUNCATED if _cut_off(body, endpoint) else None)  # fmt: skip


#: Anthropic result types of a request that never ran, and the outcome codes they become (``batch_expired``
#: is worth a resubmit, as for OpenAI).
ANTHROPIC_NOT_RUN = {
    "expired": ("batch_expired", "the batch expired before this request ran"),
    "canceled": ("batch_cancelled", "the batch was cancelled before this request ran"),
}


#: Anthropic stop reasons of an answer that was cut off (kept, marked truncated).
ANTHROPIC_CUT_OFF = ("max_tokens", "model_context_window_exceeded", "pause_turn")


def _anthropic_outcome(cid: str | None, result: dict) -> Outcome:
    """The Outcome of an Anthropic Message Batches ``result``: the message's text blocks joined (a
    ``tool_use`` block's input as JSON when there is no text, as structured output through a tool gives
    it), its usage (prompt = input + cache writes + cache reads), ``max_tokens`` as truncated, ``refusal``
    as an error; ``errored`` as ``<error type>: <message>``; ``expired`` / ``canceled`` as not run."""
    kind = result.get("type")
    kind = kind if isinstance(kind, str) else repr(kind)[:40]
    if kind in ANTHROPIC_NOT_RUN:
        code, message = ANTHROPIC_NOT_RUN[kind]
        return Outcome(cid, error=f"{code}: {message}", error_code=code)
    if kind == "errored":
        outer = result.get("error")
        inner = (
            outer.get("error") if isinstance(outer, dict) and isinstance(outer.get("error"), dict) else outer
        )
        code, message = _error_text(inner)
        return Outcome(cid, error=f"{code}: {message}" if code else message, error_code=code or "error")
    message = result.get("message")
    if kind != "succeeded" or not isinstance(message, dict):
        return Outcome(
            cid, error=f"malformed result: result type {str(kind)[:40]!r}", error_code="malformed_result"
        )
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    prompt_parts = [_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                                  "cache_read_input_tokens")]  # fmt: skip
    p = sum(x or 0 for x in prompt_parts) if any(x is not None for x in prompt_parts) else None
    c = _int(usage.get("output_tokens"))
    t = (p or 0) + (c or 0) if p is not None or c is not None else None
    content = message.get("content")
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    texts = [b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)]
    tools = [b.get("input") for b in blocks if b.get("type") == "tool_use"]
    stop = message.get("stop_reason")
    if stop == "refusal":
        said = "".join(texts).strip()
        return Outcome(cid, error=f"refusal: {said}" if said else "refusal", error_code="refusal",
                       prompt_tokens=p, completion_tokens=c, total_tokens=t)  # fmt: skip
    if texts:
        text = "".join(texts)
    elif tools:
        text = json.dumps(tools[0], ensure_ascii=False)
    else:
        return Outcome(cid, error="malformed result: the message has no text", error_code="malformed_result",
                       prompt_tokens=p, completion_tokens=c, total_tokens=t)  # fmt: skip
    return Outcome(cid, response=text, prompt_tokens=p, completion_tokens=c, total_tokens=t,
                   error_code=TRUNCATED if stop in ANTHROPIC_CUT_OFF else None)  # fmt: skip


def _cut_off(body: dict, endpoint: str) -> bool:
    """The answer stopped at the token limit: chat ``finish_reason: "length"``, responses ``status:
    "incomplete"``."""
    if endpoint == "/v1/responses":
        return body.get("status") == "incomplete"
    choices = body.get("choices")
    return endpoint != "/v1/embeddings" and bool(choices) and choices[0].get("finish_reason") == "length"


def iter_outcomes(paths: Iterable[str | os.PathLike], endpoint: str) -> Iterator[Outcome]:
    """Outcomes of every non-blank line of every file, in file order.

    A line that is not valid JSON yields an Outcome with ``custom_id=None`` and an error.
    """
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    yield Outcome(
                        None,
                        error=f"{path}: line {lineno}: not valid JSON ({exc.msg})",
                        error_code="malformed_result",
                    )
                    continue
                yield parse_result_line(obj, endpoint)


#: A JSON escape or (CESU-8) bytes of a UTF-16 surrogate: json.loads lets those through as lone surrogates
#: when they are not paired, and a lone surrogate cannot be written as UTF-8.
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def without_lone_surrogates(obj: Any) -> Any:
    """``obj`` with every lone surrogate in its strings written as its ``\\udXXX`` escape (text kept)."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, list):
        return [without_lone_surrogates(x) for x in obj]
    if isinstance(obj, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in obj.items()}
    return obj

"""FastAPI application: OpenAI-compatible Files + Batches API, admin endpoints, batch runner.

Every object answered is valid under OpenAI's published OpenAPI spec (``tests/test_server_contract.py``):
a field the spec types as non-nullable (``output_file_id``, ``*_at``, ``errors``, ``usage`` of a Batch,
``status_details`` of a File) is left out while it has no value, instead of being ``null``.

State (file metadata, batches) lives in memory; file contents live on disk under
``<data_dir>/files/<file_id>``. Each batch is driven by a background asyncio task, so it progresses
whether or not anybody polls, and every GET sees the current state.

Batch life: ``validating`` (``validating_seconds``) -> ``failed`` | ``in_progress`` (requests answered
progressively over ``in_progress_seconds``) -> ``finalizing`` (``finalizing_seconds``) -> ``completed``.
``expire_fraction`` -> ``expired`` after that fraction; cancel -> ``cancelling``
(``cancelling_seconds``) -> ``cancelled``. Unrun requests of expired / cancelled batches go to the error
file (``batch_expired`` / ``batch_cancelled``) and count as ``failed`` in ``request_counts``.

Auth: ``/v1/*`` needs ``Authorization: Bearer <api_key>`` when ``api_key`` is set; ``/_admin/*`` is
guarded by the start-up :class:`~local_batch_server.config.AdminPolicy` (admin token, locked upstream
and keys). Both secrets are compared in constant time.

Anthropic Message Batches (``/v1/messages/batches``: create, list ``?limit=&before_id=&after_id=``
newest first, retrieve, ``/cancel``, ``/results`` (JSONL, once ended), delete (once ended)): an Anthropic
batch is a batch of endpoint ``/v1/messages`` whose requests are the given ``params`` (answered by
:func:`local_batch_server.answers.message`, always locally: ``upstream_base_url`` does not apply), run
by the same runner. Calls need an ``anthropic-version`` header (else 400) and, when ``api_key`` is set,
``x-api-key: <api_key>`` (else 401); every answer carries a ``request-id`` header and errors on
``/v1/messages*`` use Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``. The
batch object maps the internal statuses: validating / in_progress / finalizing -> ``in_progress``
(``canceling`` once a cancel was asked; a cancel during finalizing lets the batch end normally),
cancelling -> ``canceling``, the terminal ones -> ``ended``. ``request_counts``: ``processing`` = not yet
answered, ``succeeded`` / ``errored`` grow while it runs (Anthropic itself shows them only at the end),
unrun requests count as ``expired`` / ``canceled`` once it ends. ``results_url`` is absolute, built from
the call's base URL. Result lines: ``{"custom_id", "result": {"type": "succeeded", "message"}}``,
``errored`` (reject marker, or a missing / invalid model / max_tokens / messages) with an Anthropic error
body, ``expired``, ``canceled``; shuffled like the OpenAI files. Failure injection: ``reject_marker``,
``expire_fraction`` / ``expire_batches``, ``http_faults`` (``after`` included), ``result_faults`` (on
the results file: ``error_after_answer`` / ``unknown_ids`` add ``errored`` lines, ``drop_lines`` drops
``succeeded`` ones) and cancel apply; ``fail_validation`` and ``status_faults`` do not. A deleted batch
leaves the creation order, so the ``batch`` index of later ``http_faults`` shifts. OpenAI's
``/v1/batches`` routes do not see Anthropic batches, and the other way round.

Azure OpenAI: ``/openai/v1/<rest>`` is served as ``/v1/<rest>``, and ``/openai/<rest>`` (the older API
the ``AzureOpenAI`` client uses: ``/openai/files``, ``/openai/batches``, ...) as ``/v1/<rest>`` when it
has an ``api-version`` query parameter (400 without). There the key may also come as ``api-key: <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import random
import re
import shutil
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import answers
from .config import START_ONLY_FIELDS, AdminPolicy, ServerConfig

log = logging.getLogger("local_batch_server")

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions")
#: Batch fields the spec types as non-nullable: left out of the answers while ``None``.
BATCH_OPTIONAL = (
    "model", "errors", "output_file_id", "error_file_id", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "usage",
)  # fmt: skip
MODEL_CREATED = 1_700_000_000
MAX_ERROR_NAME = 200
TERMINAL = {"completed", "failed", "expired", "cancelled"}
FILE_TTL = 30 * 24 * 3600
MAX_REPORTED_ERRORS = 1000
PROGRESS_STEPS = 50
POLL = 0.02

EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED_ERROR = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}

#: Anthropic Message Batches: internal endpoint of their requests, route prefix, limits, views.
MESSAGES_ENDPOINT = "/v1/messages"
ANTHROPIC_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ANTHROPIC_STATUS = {
    "validating": "in_progress", "in_progress": "in_progress", "finalizing": "in_progress",
    "cancelling": "canceling",
    "completed": "ended", "expired": "ended", "cancelled": "ended", "failed": "ended",
}  # fmt: skip
ANTHROPIC_MAX_LIST = 1000
#: ASGI scope key marking a call that came in on an Azure path (``/openai/...``).
AZURE_SCOPE_KEY = "local_batch_server.azure"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_type(status: int) -> str:
    if status == 429:
        return "requests"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def anthropic_error_type(status: int) -> str:
    return {
        401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error",
    }.get(status, "api_error" if status >= 500 else "invalid_request_error")  # fmt: skip


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def is_anthropic_path(path: str) -> bool:
    return path == MESSAGES_ENDPOINT or path.startswith(MESSAGES_ENDPOINT + "/")


def path_error_response(
    path: str, status: int, message: str, param=None, code=None, headers=None
) -> Response:
    """An error in the shape of the API of ``path``: Anthropic's on ``/v1/messages*``, else OpenAI's."""
    if is_anthropic_path(path):
        return JSONResponse(anthropic_error(status, message), status_code=status, headers=headers)
    return error_response(status, message, param, code, headers)


def rfc3339(ts: float | None) -> str | None:
    """``ts`` (epoch seconds) as ``2026-12-07T20:31:12.123456Z``; None stays None."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def public_batch(data: dict[str, Any]) -> dict[str, Any]:
    """The batch as answered: the :data:`BATCH_OPTIONAL` fields left out while ``None``."""
    return {k: v for k, v in data.items() if v is not None or k not in BATCH_OPTIONAL}


def public_file(meta: dict[str, Any]) -> dict[str, Any]:
    """The file as answered: ``status_details`` (a string in the spec) left out while ``None``."""
    return {k: v for k, v in meta.items() if v is not None or k != "status_details"}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "openai"}


def model_not_found(name: str) -> ApiError:
    shown = name if len(name) <= MAX_ERROR_NAME else name[:MAX_ERROR_NAME] + "…"
    return ApiError(
        404, f"The model `{shown}` does not exist or you do not have access to it.", None, "model_not_found"
    )


def bearer_matches(authorization: str | None, secret: str) -> bool:
    """``authorization`` is ``Bearer <secret>`` (scheme case-insensitive), compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), secret.encode())


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


@dataclass
class Parsed:
    """One valid input line."""

    line: int
    custom_id: str
    url: str
    body: Any
    raw: str


@dataclass
class Outcome:
    custom_id: str
    line: dict[str, Any]
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class BatchState:
    data: dict[str, Any]
    fail_validation: dict[str, Any] | None = None
    cancel_requested: bool = False
    requests: list[Parsed] = field(default_factory=list)
    task: asyncio.Task | None = None
    #: An Anthropic Message Batch: ``requests`` given at create (endpoint ``/v1/messages``, bodies = the
    #: ``params``), answered locally, results in one JSONL file at ``results_path``.
    anthropic: bool = False
    created: float = field(default_factory=time.time)
    cancel_initiated: float | None = None
    ended: float | None = None
    #: requests never run (expired / canceled), known once the batch ends
    unrun: int = 0
    results_path: Path | None = None


class Store:
    def __init__(self, data_dir: Path, config: ServerConfig):
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.startup_config = config.model_copy(deep=True)
        self.config = config
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, BatchState] = {}
        self.batch_order: list[str] = []
        #: result files served broken (``result_faults``): file id -> [broken bytes, downloads left or None]
        self.broken: dict[str, list] = {}

    # ---- files -------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    async def add_file_async(self, filename: str, purpose: str, content: bytes) -> str:
        file_id = new_id("file-")
        await asyncio.to_thread(self.file_path(file_id).write_bytes, content)
        return self.add_file(filename, purpose, file_id)["id"]

    def add_file(self, filename: str, purpose: str, file_id: str) -> dict[str, Any]:
        """Register a file whose content is already at ``file_path(file_id)``."""
        path = self.file_path(file_id)
        created = now()
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": path.stat().st_size if path.exists() else 0,
            "created_at": created,
            "expires_at": created + FILE_TTL,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        self.files[file_id] = meta
        return meta

    def get_file(self, file_id: str) -> dict[str, Any]:
        meta = self.files.get(file_id)
        if meta is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code=None)
        return meta

    async def reset(self) -> None:
        for state in self.batches.values():
            if state.task and not state.task.done():
                state.task.cancel()
        for state in self.batches.values():
            if state.task:
                with contextlib.suppress(BaseException):
                    await state.task
        self.batches.clear()
        self.batch_order.clear()
        self.files.clear()
        self.broken.clear()
        shutil.rmtree(self.files_dir, ignore_errors=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)


# ---- validation ----------------------------------------------------------------------------------
def validate_content(
    raw: bytes, endpoint: str, cfg: ServerConfig
) -> tuple[list[Parsed], list[dict], str | None]:
    """Parse an input file: (requests, errors, model). Errors use the Batch ``errors.data`` shape."""

    def err(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
        return {"code": code, "message": message, "param": param, "line": line}

    if len(raw) > cfg.max_file_bytes:
        return (
            [],
            [err("file_too_large", f"The input file exceeds the {cfg.max_file_bytes} bytes limit.")],
            None,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return [], [err("invalid_file_format", "The input file is not valid UTF-8.")], None
    lines = text.splitlines()
    count = sum(1 for x in lines if x.strip())
    if count == 0:
        return [], [err("empty_file", "The input file contains no requests.")], None
    if count > cfg.max_requests_per_file:
        msg = f"The input file contains {count} requests; the limit is {cfg.max_requests_per_file} per batch."
        return [], [err("too_many_requests", msg)], None

    errors: list[dict] = []
    parsed: list[Parsed] = []
    seen: set[str] = set()
    model: str | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            errors.append(err("invalid_json_line", "This line is not parseable as valid JSON.", number))
            continue
        if not isinstance(obj, dict):
            errors.append(err("invalid_request", "Each line must be a JSON object.", number))
            continue
        missing = [k for k in ("custom_id", "method", "url") if not isinstance(obj.get(k), str)]
        if missing:
            errors.append(
                err(
                    "invalid_request", f"Missing or invalid required field: {missing[0]}.", number, missing[0]
                )
            )
            continue
        if "body" in obj and not isinstance(obj["body"], dict):
            errors.append(err("invalid_request", "The 'body' field must be a JSON object.", number, "body"))
            continue
        if obj["method"].upper() != "POST":
            errors.append(err("invalid_request", "Only the POST method is supported.", number, "method"))
            continue
        if obj["url"] != endpoint:
            msg = f"The provided URL '{obj['url']}' does not match the batch endpoint '{endpoint}'."
            errors.append(err("mismatched_endpoint", msg, number, "url"))
            continue
        custom_id = obj["custom_id"]
        if custom_id in seen:
            msg = f"The custom_id '{custom_id}' is duplicated; custom_id values must be unique."
            errors.append(err("duplicate_custom_id", msg, number, "custom_id"))
            continue
        seen.add(custom_id)
        body = obj.get("body") or {}
        line_model = body.get("model")
        if isinstance(line_model, str):
            if model is None:
                model = line_model
            elif line_model != model:
                msg = f"Found model '{line_model}' but the batch uses '{model}': one model per file."
                errors.append(err("mismatched_model", msg, number, "body.model"))
                continue
        parsed.append(Parsed(number, custom_id, obj["url"], body, line))
    return parsed, errors[:MAX_REPORTED_ERRORS], model


# ---- runner --------------------------------------------------------------------------------------
class Runner:
    def __init__(self, store: Store):
        self.store = store

    @property
    def cfg(self) -> ServerConfig:
        return self.store.config

    async def wait_phase(self, state: BatchState, attr: str, allow_cancel: bool = True) -> bool:
        """Wait until ``attr`` seconds (read live) passed since the phase start. True if cancelled."""
        start = time.monotonic()
        while time.monotonic() - start < getattr(self.cfg, attr):
            if allow_cancel and state.cancel_requested:
                return True
            await asyncio.sleep(POLL)
        return allow_cancel and state.cancel_requested

    async def run(self, state: BatchState) -> None:
        try:
            await self._run(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - defensive
            log.exception("batch %s crashed", state.data["id"])
            self.fail(state, [{"code": "server_error", "message": f"Internal error: {exc}", "param": None}])
        state.ended = time.time()

    def fail(self, state: BatchState, errors: list[dict]) -> None:
        d = state.data
        d["errors"] = {"object": "list", "data": errors}
        d["status"] = "failed"
        d["failed_at"] = now()

    async def _run(self, state: BatchState) -> None:
        d = state.data
        cancelled = await self.wait_phase(state, "validating_seconds")
        if state.anthropic:  # requests given at create, already checked; fail_validation does not apply
            await self.run_requests(state, state.requests, cancelled or state.cancel_requested)
            return
        if d["input_file_id"] not in self.store.files and not cancelled:
            msg = f"The input file {d['input_file_id']} no longer exists."
            self.fail(
                state, [{"code": "file_not_found", "message": msg, "param": "input_file_id", "line": None}]
            )
            return
        path = self.store.file_path(d["input_file_id"])
        raw = await asyncio.to_thread(path.read_bytes) if path.exists() else b""
        requests, errors, model = await asyncio.to_thread(validate_content, raw, d["endpoint"], self.cfg)
        d["model"] = model
        cancelled = cancelled or state.cancel_requested
        if state.fail_validation is not None and not cancelled:
            fv = state.fail_validation
            message = fv["message"].replace("{model}", model or "unknown-model")
            self.fail(
                state,
                [{"code": fv["code"], "message": message, "param": fv.get("param"), "line": fv.get("line")}],
            )
            return
        if errors and not cancelled:
            self.fail(state, errors)
            return
        await self.run_requests(state, requests, cancelled)

    async def run_requests(self, state: BatchState, requests: list[Parsed], cancelled: bool) -> None:
        """From validated ``requests`` to the end: in_progress, finalizing, and a terminal status."""
        d = state.data
        state.requests = requests
        total = len(requests)
        d["request_counts"] = {"total": total, "completed": 0, "failed": 0}
        outcomes: list[Outcome] = []
        if not cancelled:
            d["status"] = "in_progress"
            d["in_progress_at"] = now()
            cancelled, expired = await self.process(state, outcomes)
        else:
            expired = False
        if cancelled:
            await self.wait_phase(state, "cancelling_seconds", allow_cancel=False)
            await self.finish(state, outcomes, CANCELLED_ERROR)
            d["status"] = "cancelled"
            d["cancelled_at"] = now()
            return
        if expired:
            await self.finish(state, outcomes, EXPIRED_ERROR)
            d["status"] = "expired"
            d["expired_at"] = now()
            return
        d["status"] = "finalizing"
        d["finalizing_at"] = now()
        await self.wait_phase(state, "finalizing_seconds", allow_cancel=False)
        await self.finish(state, outcomes, None)
        d["status"] = "completed"
        d["completed_at"] = now()

    async def process(self, state: BatchState, outcomes: list[Outcome]) -> tuple[bool, bool]:
        """Answer requests progressively. Returns (cancelled, expired)."""
        d = state.data
        requests = state.requests
        total = len(requests)
        steps = max(1, min(PROGRESS_STEPS, total))
        fraction = self.cfg.expire_fraction  # snapshot: decided when processing starts
        if fraction is not None and self.cfg.expire_batches is not None:
            if self.cfg.expire_batches <= 0:
                fraction = None
            else:
                self.cfg.expire_batches -= 1
        limit = total if fraction is None else math.floor(fraction * total + 1e-9)
        start = time.monotonic()
        index = 0
        client = None
        if self.cfg.upstream_base_url and not state.anthropic:
            client = httpx.AsyncClient(timeout=self.cfg.upstream_timeout_seconds)
        try:
            for step in range(1, steps + 1):
                # Wait until this step's share of in_progress_seconds has elapsed (read live).
                while time.monotonic() - start < self.cfg.in_progress_seconds * (step - 1) / steps:
                    if state.cancel_requested:
                        return True, False
                    await asyncio.sleep(POLL)
                if state.cancel_requested:
                    return True, False
                end = min(total * step // steps, limit)
                for outcome in await self.answer_chunk(state, requests[index:end], client):
                    outcomes.append(outcome)
                    d["request_counts"]["completed" if outcome.ok else "failed"] += 1
                index = max(index, end)
                if fraction is not None and index >= limit:
                    return False, True
            return state.cancel_requested, False
        finally:
            if client is not None:
                await client.aclose()

    async def answer_chunk(self, state: BatchState, chunk: list[Parsed], client) -> list[Outcome]:
        batch_id = state.data["id"]
        if state.anthropic:
            return await asyncio.to_thread(lambda: [self.answer_anthropic(batch_id, p) for p in chunk])
        if client is None:
            return await asyncio.to_thread(lambda: [self.answer_local(batch_id, p) for p in chunk])
        sem = asyncio.Semaphore(self.cfg.upstream_concurrency)

        async def one(p: Parsed) -> Outcome:
            async with sem:
                return await self.answer_upstream(batch_id, p, client)

        return list(await asyncio.gather(*(one(p) for p in chunk)))

    def rejected(self, p: Parsed) -> answers.RequestError | None:
        marker = self.cfg.reject_marker
        if marker and marker in json.dumps(p.body, ensure_ascii=False):
            return answers.RequestError("Request rejected by the local batch server (reject marker found).")
        return None

    @staticmethod
    def line(p: Parsed, status: int, body: Any) -> dict[str, Any]:
        return {
            "id": new_id("batch_req_"),
            "custom_id": p.custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
            "error": None,
        }

    def answer_local(self, batch_id: str, p: Parsed) -> Outcome:
        try:
            rejection = self.rejected(p)
            if rejection:
                raise rejection
            body = answers.answer(p.url, p.body, seed=f"{batch_id}:{p.custom_id}")
        except answers.RequestError as exc:
            return Outcome(p.custom_id, self.line(p, exc.status, exc.body()), ok=False)
        inp, out = answers.usage_of(body)
        return Outcome(p.custom_id, self.line(p, 200, body), ok=True, input_tokens=inp, output_tokens=out)

    def answer_anthropic(self, batch_id: str, p: Parsed) -> Outcome:
        """A Message Batch result line: ``succeeded`` with the Message, or ``errored``."""
        try:
            rejection = self.rejected(p)
            if rejection:
                raise rejection
            message = answers.answer(MESSAGES_ENDPOINT, p.body, seed=f"{batch_id}:{p.custom_id}")
        except answers.RequestError as exc:
            result = {"type": "errored", "error": anthropic_error(exc.status, exc.message)}
            return Outcome(p.custom_id, {"custom_id": p.custom_id, "result": result}, ok=False)
        inp, out = answers.usage_of(message)
        line = {"custom_id": p.custom_id, "result": {"type": "succeeded", "message": message}}
        return Outcome(p.custom_id, line, ok=True, input_tokens=inp, output_tokens=out)

    async def answer_upstream(self, batch_id: str, p: Parsed, client: httpx.AsyncClient) -> Outcome:
        rejection = self.rejected(p)
        if rejection:
            return Outcome(p.custom_id, self.line(p, rejection.status, rejection.body()), ok=False)
        base = (self.cfg.upstream_base_url or "").rstrip("/")
        if base.endswith("/v1") and p.url.startswith("/v1/"):
            base = base[: -len("/v1")]
        headers = {"Content-Type": "application/json"}
        if self.cfg.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.cfg.upstream_api_key}"
        try:
            resp = await client.post(base + p.url, json=p.body, headers=headers)
            try:
                body = resp.json()
            except ValueError:
                body = {
                    "error": {
                        "message": resp.text[:2000],
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            status = resp.status_code
        except httpx.HTTPError as exc:
            status = 502
            body = answers.RequestError(
                f"Upstream request failed: {type(exc).__name__}", code="upstream_error", status=502
            ).body()
        ok = 200 <= status < 300
        inp, out = answers.usage_of(body) if ok else (0, 0)
        return Outcome(p.custom_id, self.line(p, status, body), ok=ok, input_tokens=inp, output_tokens=out)

    async def finish(self, state: BatchState, outcomes: list[Outcome], unrun_error: dict | None) -> None:
        """Write output / error files (built off the event loop), usage and final counts."""
        d = state.data
        if state.anthropic:
            await self.finish_anthropic(state, outcomes, unrun_error)
            return
        good, bad, n_good, n_bad = await asyncio.to_thread(
            build_result_files, outcomes, state.requests, unrun_error, self.cfg.shuffle_seed
        )
        d["request_counts"]["completed"] = n_good
        d["request_counts"]["failed"] = n_bad
        faults = self.take_result_faults()
        broken = break_result_files(good, bad, faults) if faults is not None else None
        for kind, content in (("output", good), ("error", bad)):
            if content or (broken and broken[kind] != content):
                file_id = await self.store.add_file_async(f"{d['id']}_{kind}.jsonl", "batch_output", content)
                d[f"{kind}_file_id"] = file_id
                if broken and broken[kind] != content:
                    if faults.downloads is None:
                        await asyncio.to_thread(self.store.file_path(file_id).write_bytes, broken[kind])
                        self.store.files[file_id]["bytes"] = len(broken[kind])
                    else:
                        self.store.broken[file_id] = [broken[kind], faults.downloads]
        inp = sum(o.input_tokens for o in outcomes if o.ok)
        out = sum(o.output_tokens for o in outcomes if o.ok)
        d["usage"] = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    def take_result_faults(self) -> Any:
        """The ``result_faults`` for the batch finishing now (counting down ``batches``), or None."""
        faults = self.cfg.result_faults
        if faults is not None and faults.batches is not None:
            if faults.batches <= 0:
                return None
            faults.batches -= 1
        return faults

    async def finish_anthropic(
        self, state: BatchState, outcomes: list[Outcome], unrun_error: dict | None
    ) -> None:
        """Write the Message Batch results file (``result_faults`` apply) and the final counts."""
        d = state.data
        kind = (
            "expired"
            if unrun_error is EXPIRED_ERROR
            else "canceled"
            if unrun_error is CANCELLED_ERROR
            else None
        )
        content, unrun = await asyncio.to_thread(
            build_anthropic_results, outcomes, state.requests, kind, self.cfg.shuffle_seed
        )
        faults = self.take_result_faults()
        broken = break_anthropic_results(content, faults) if faults is not None else None
        path = self.store.files_dir / f"{d['id']}.results.jsonl"
        if broken is not None and broken != content and faults.downloads is None:
            content = broken
        elif broken is not None and broken != content:
            self.store.broken[d["id"]] = [broken, faults.downloads]
        await asyncio.to_thread(path.write_bytes, content)
        state.results_path = path
        n_good = sum(1 for o in outcomes if o.ok)
        d["request_counts"]["completed"] = n_good
        d["request_counts"]["failed"] = len(state.requests) - n_good
        state.unrun = unrun


def build_anthropic_results(
    outcomes: list[Outcome], requests: list[Parsed], unrun_kind: str | None, seed: int
) -> tuple[bytes, int]:
    """(results JSONL, number of unrun requests): one line per request, shuffled; unrun requests get
    ``{"type": unrun_kind}`` (``expired`` / ``canceled``)."""
    done = {o.custom_id for o in outcomes}
    lines = [o.line for o in outcomes]
    unrun = [p for p in requests if p.custom_id not in done] if unrun_kind else []
    lines += [{"custom_id": p.custom_id, "result": {"type": unrun_kind}} for p in unrun]
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in shuffled(lines, seed))
    return text.encode("utf-8"), len(unrun)


def break_anthropic_results(content: bytes, faults: Any) -> bytes:
    """The results file as ``faults`` (a :class:`ResultFaults`) breaks it: ``error_after_answer`` adds an
    ``errored`` line for an already ``succeeded`` custom_id, ``unknown_ids`` ``errored`` (api_error) lines
    for custom_ids never sent, ``drop_lines`` leaves out succeeded lines; garbage / truncation as OpenAI's."""
    lines = content.splitlines(keepends=True)
    succeeded = [line for line in lines if json.loads(line)["result"]["type"] == "succeeded"]
    extra = []
    for line in succeeded[: faults.error_after_answer]:
        error = anthropic_error(400, "duplicate line after an answer")
        extra.append(
            {"custom_id": json.loads(line)["custom_id"], "result": {"type": "errored", "error": error}}
        )
    for n in range(faults.unknown_ids):
        error = anthropic_error(500, "server error")
        extra.append({"custom_id": f"never-sent-{n}", "result": {"type": "errored", "error": error}})
    dropped = set(map(id, succeeded[: faults.drop_lines]))
    lines = [line for line in lines if id(line) not in dropped]
    lines += [(json.dumps(x) + "\n").encode() for x in extra]
    if faults.garbage_line:
        lines.append(b"<html><body><h1>502 Bad Gateway</h1></body></html>\n")
    if faults.truncate_last_line and lines:
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    return b"".join(lines)


def build_result_files(
    outcomes: list[Outcome], requests: list[Parsed], unrun_error: dict | None, seed: int
) -> tuple[bytes, bytes, int, int]:
    done = {o.custom_id for o in outcomes}
    good = [o.line for o in outcomes if o.ok]
    bad = [o.line for o in outcomes if not o.ok]
    if unrun_error is not None:
        for p in requests:
            if p.custom_id not in done:
                line = {"id": new_id("batch_req_"), "custom_id": p.custom_id, "response": None}
                line["error"] = dict(unrun_error)
                bad.append(line)

    def dump(lines: list[dict]) -> bytes:
        return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in shuffled(lines, seed)).encode(
            "utf-8"
        )

    return dump(good), dump(bad), len(good), len(bad)


def break_result_files(good: bytes, bad: bytes, faults: Any) -> dict[str, bytes]:
    """The output and error files as ``faults`` (a :class:`ResultFaults`) breaks them."""
    out = good.splitlines(keepends=True)
    err = bad.splitlines(keepends=True)
    answered = [json.loads(line) for line in out]
    for line in answered[: faults.error_after_answer]:
        body = {"error": {"message": "duplicate line after an answer", "type": "invalid_request_error",
                          "param": None, "code": "invalid_request"}}  # fmt: skip
        dup = {"id": new_id("batch_req_"), "custom_id": line["custom_id"], "error": None,
               "response": {"status_code": 400, "request_id": new_id("req_"), "body": body}}  # fmt: skip
        err.append((json.dumps(dup) + "\n").encode())
    for n in range(faults.unknown_ids):
        body = {"error": {"message": "server error", "type": "server_error", "param": None, "code": None}}
        unknown = {"id": new_id("batch_req_"), "custom_id": f"never-sent-{n}", "error": None,
                   "response": {"status_code": 500, "request_id": new_id("req_"), "body": body}}  # fmt: skip
        err.append((json.dumps(unknown) + "\n").encode())
    if faults.drop_lines:
        out = out[faults.drop_lines :]
    if faults.garbage_line:
        out.append(b"<html><body><h1>502 Bad Gateway</h1></body></html>\n")
    if faults.truncate_last_line and out:
        out[-1] = out[-1][: len(out[-1]) // 2]
    return {"output": b"".join(out), "error": b"".join(err)}


def shuffled(items: list, seed: int) -> list:
    """Deterministic shuffle that never keeps the input order when there are 2+ items."""
    out = list(items)
    random.Random(seed).shuffle(out)
    if len(out) >= 2 and all(a is b for a, b in zip(out, items, strict=True)):
        out = out[1:] + out[:1]
    return out


# ---- app -----------------------------------------------------------------------------------------
def create_app(
    data_dir: str | Path, config: ServerConfig | None = None, policy: AdminPolicy | None = None
) -> FastAPI:
    """The app. ``policy`` (start-up only) guards ``/_admin``; default: no admin token, upstream locked."""
    store = Store(Path(data_dir), config or ServerConfig())
    policy = policy or AdminPolicy()
    runner = Runner(store)
    app = FastAPI(title="local OpenAI-compatible batch server")
    app.state.store = store

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return path_error_response(
            request.url.path, exc.status, exc.message, exc.param, exc.code, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = first.get("loc") or ()
        param = str(loc[-1]) if loc else None
        message = f"Invalid request: {first.get('msg', 'bad request')}"
        return path_error_response(request.url.path, 400, message, param, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return path_error_response(request.url.path, exc.status_code, message, None, None)

    @app.middleware("http")
    async def _faults_and_auth(request: Request, call_next):
        path = request.url.path
        if not is_anthropic_path(path):
            return await faults_and_auth(request, call_next)
        request_id = new_id("req_")
        response = await faults_and_auth(request, call_next)
        response.headers["request-id"] = request_id
        return response

    async def faults_and_auth(request: Request, call_next):
        path = request.url.path
        lost = None  # a fault that fires after the call was handled
        if not path.startswith("/_admin"):
            cfg = store.config
            if is_anthropic_path(path):
                refused = anthropic_refusal(request, cfg)
                if refused is not None:
                    return refused
            elif cfg.api_key and path.startswith("/v1"):
                given_key = request.headers.get("api-key") if request.scope.get(AZURE_SCOPE_KEY) else None
                if not (
                    bearer_matches(request.headers.get("authorization"), cfg.api_key)
                    or (
                        given_key is not None
                        and hmac.compare_digest(given_key.encode(), cfg.api_key.encode())
                    )
                ):
                    return error_response(401, "Incorrect API key provided.", None, "invalid_api_key")
            if cfg.latency_seconds and path.startswith("/v1"):
                await asyncio.sleep(cfg.latency_seconds)
            for fault in list(cfg.http_faults):
                if fault.method not in ("*", request.method.upper()) or not re.search(fault.path, path):
                    continue
                if fault.batch is not None and (
                    fault.batch >= len(store.batch_order) or store.batch_order[fault.batch] not in path
                ):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        cfg.http_faults.remove(fault)
                headers = {}
                if fault.status == 429:
                    headers["Retry-After"] = "0"
                if fault.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(fault.retry_after_ms)
                message = fault.message or f"Injected fault: HTTP {fault.status} for {request.method} {path}"
                code = "rate_limit_exceeded" if fault.status == 429 else None
                if fault.after:
                    lost = path_error_response(path, fault.status, message, None, code, headers)
                    break
                return path_error_response(path, fault.status, message, None, code, headers)
        response = await call_next(request)
        return lost if lost is not None else response

    # ---- admin ---------------------------------------------------------------------------------
    async def admin_guard(request: Request) -> None:
        """Every ``/_admin`` route: open only on a server with no admin token and no key or upstream."""
        if not policy.admin_required(store.startup_config, store.config):
            return
        if policy.admin_token is None:
            raise ApiError(
                403,
                "The /_admin endpoints are disabled: this server has an api_key or an upstream and no "
                "admin token. Start it with --admin-token (or LOCAL_BATCH_SERVER_ADMIN_TOKEN, or "
                "admin_token in the config file) to use them.",
                code="admin_disabled",
            )
        if not bearer_matches(request.headers.get("authorization"), policy.admin_token):
            raise ApiError(
                401,
                "Missing or incorrect admin token: send 'Authorization: Bearer <admin token>'.",
                code="invalid_admin_token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    admin = APIRouter(prefix="/_admin", dependencies=[Depends(admin_guard)])

    @admin.get("/config")
    async def get_config():
        return store.config.public_dict()

    @admin.put("/config")
    async def put_config(request: Request, replace: bool = False):
        try:
            changes = await request.json()
        except ValueError as exc:
            raise ApiError(400, "Body must be JSON.") from exc
        if not isinstance(changes, dict):
            raise ApiError(400, "Body must be a JSON object.")
        start_only = sorted(set(changes) & set(START_ONLY_FIELDS))
        if start_only:
            raise ApiError(
                403,
                f"{', '.join(start_only)} can only be set when the server starts; nothing was changed.",
                code="locked_setting",
            )
        try:
            new = store.config.merged(changes, replace=replace)
        except ValidationError as exc:
            raise ApiError(400, f"Invalid config: {exc.errors()[0].get('msg')}") from exc
        refused = policy.refused_changes(store.config, new)
        if refused:
            raise ApiError(
                403,
                f"{', '.join(refused)} can only be set when the server starts (or at run time on a server "
                "started with --allow-upstream-change / allow_upstream_change); nothing was changed. "
                'Send "***" for a secret, or leave the key out without ?replace=true, to keep it.',
                code="locked_setting",
            )
        store.config = new
        return store.config.public_dict()

    @admin.post("/reset")
    async def reset(keep_config: bool = False):
        await store.reset()
        if not keep_config:
            store.config = store.startup_config.model_copy(deep=True)
        return {"ok": True}

    app.include_router(admin)

    # ---- files ---------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload_file(file: UploadFile | None = File(None), purpose: str | None = Form(None)):
        if purpose is None:
            raise ApiError(
                400, "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter"
            )
        if file is None:
            raise ApiError(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
        if purpose != "batch":
            raise ApiError(
                400, f"Invalid value for 'purpose': '{purpose}'. This server only accepts 'batch'.", "purpose"
            )
        filename = file.filename or ""
        if not filename.endswith(".jsonl"):
            raise ApiError(
                400,
                f"Invalid file format for Batch API. Must be .jsonl (got '{filename}').",
                "file",
                "invalid_file_format",
            )
        file_id = new_id("file-")
        with store.file_path(file_id).open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out, 1024 * 1024)
        return public_file(store.add_file(filename, purpose, file_id))

    @app.get("/v1/files")
    async def list_files(
        purpose: str | None = None, limit: int = 10000, order: str = "desc", after: str | None = None
    ):
        items = [f for f in store.files.values() if purpose is None or f["purpose"] == purpose]
        if order == "desc":
            items.reverse()
        page = paginate([public_file(f) for f in items], limit, after, max_limit=10000)
        # the spec requires first_id and last_id (strings) in a file list: "" for an empty page
        return {**page, "first_id": page["first_id"] or "", "last_id": page["last_id"] or ""}

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return public_file(store.get_file(file_id))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        store.get_file(file_id)
        del store.files[file_id]
        store.file_path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        meta = store.get_file(file_id)
        broken = store.broken.get(file_id)
        if broken is not None and broken[1] > 0:  # result_faults: served broken this many more times
            broken[1] -= 1
            return Response(broken[0], media_type="application/octet-stream")
        return FileResponse(
            store.file_path(file_id), media_type="application/octet-stream", filename=meta["filename"]
        )

    # ---- models --------------------------------------------------------------------------------
    async def forward_models(path: str) -> Response:
        """``GET {upstream}{path}`` with the upstream key; its status and body are answered as they are."""
        cfg = store.config
        base = (cfg.upstream_base_url or "").rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        headers = {"Authorization": f"Bearer {cfg.upstream_api_key}"} if cfg.upstream_api_key else {}
        try:
            async with httpx.AsyncClient(timeout=cfg.upstream_timeout_seconds) as client:
                resp = await client.get(base + path, headers=headers)
        except httpx.HTTPError as exc:
            message = f"Upstream request failed: {type(exc).__name__}"
            raise ApiError(502, message, code="upstream_error") from exc
        media = resp.headers.get("content-type", "application/json")
        return Response(resp.content, status_code=resp.status_code, media_type=media)

    @app.get("/v1/models")
    async def list_models():
        if store.config.upstream_base_url:
            return await forward_models("/v1/models")
        return {"object": "list", "data": [model_object(m) for m in store.config.models or ()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        if not model.strip(".") or any(part in (".", "..") for part in model.split("/")):
            raise model_not_found(model)  # a dot segment would reach another upstream path once normalised
        if store.config.upstream_base_url:
            return await forward_models("/v1/models/" + urllib.parse.quote(model, safe=":"))
        known = store.config.models
        if known is not None and model not in known:
            raise model_not_found(model)
        return model_object(model)

    # ---- batches -------------------------------------------------------------------------------
    @app.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError(400, "We could not parse the JSON body of your request.") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise ApiError(
                    400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
                )
        if body["completion_window"] != "24h":
            raise ApiError(
                400,
                f"Invalid value for 'completion_window': '{body['completion_window']}'. "
                "Supported values are: '24h'.",
                "completion_window",
                "invalid_value",
            )
        if body["endpoint"] not in ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': '{body['endpoint']}'. "
                f"Supported values are: {', '.join(ENDPOINTS)}.",
                "endpoint",
                "invalid_value",
            )
        metadata = body.get("metadata")
        check_metadata(metadata, store.config.max_metadata_pairs)
        file_meta = store.files.get(body["input_file_id"])
        if file_meta is None:
            raise ApiError(404, f"No such File object: {body['input_file_id']}", "input_file_id")
        if file_meta["purpose"] != "batch":
            raise ApiError(400, "The input file must have purpose 'batch'.", "input_file_id", "invalid_value")
        created = now()
        batch = {
            "id": new_id("batch_"),
            "object": "batch",
            "endpoint": body["endpoint"],
            "model": None,
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None,
            "metadata": metadata,
        }
        state = BatchState(batch)
        fv = store.config.fail_validation
        if fv is not None:
            state.fail_validation = fv.model_dump()
            if fv.times is not None:
                fv.times -= 1
                if fv.times <= 0:
                    store.config.fail_validation = None
        store.batches[batch["id"]] = state
        store.batch_order.append(batch["id"])
        state.task = asyncio.create_task(runner.run(state))
        return public_batch(batch)

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None):
        states = [store.batches[i] for i in reversed(store.batch_order)]
        items = [public_batch(state.data) for state in states if not state.anthropic]
        page = paginate(items, limit, after, max_limit=100)
        # first_id / last_id are optional strings in the spec: left out of an empty page
        return {k: v for k, v in page.items() if v is not None}

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str):
        shown = public_batch(get_batch(batch_id).data)
        fault = store.config.status_faults
        if fault is not None and fault.times != 0:  # status_faults: a status the client may not know
            shown = {**shown, "status": fault.status}
            if fault.times is not None:
                fault.times -= 1
        return shown

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        state = get_batch(batch_id)
        d = state.data
        if d["status"] in ("cancelling", "cancelled"):
            return public_batch(d)
        if d["status"] not in ("validating", "in_progress"):
            raise ApiError(400, f"Cannot cancel a batch with status '{d['status']}'.", None, "invalid_state")
        state.cancel_requested = True
        d["status"] = "cancelling"
        d["cancelling_at"] = now()
        return public_batch(d)

    def get_batch(batch_id: str) -> BatchState:
        state = store.batches.get(batch_id)
        if state is None or state.anthropic:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return state

    # ---- Anthropic Message Batches ---------------------------------------------------------------
    @app.post("/v1/messages/batches")
    async def create_message_batch(request: Request):
        cfg = store.config
        raw = await request.body()
        if len(raw) > cfg.max_file_bytes:
            raise ApiError(413, f"Request exceeds the maximum allowed size of {cfg.max_file_bytes} bytes.")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "The request body is not valid JSON.") from exc
        items = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ApiError(400, "requests: Field required")
        if not items:
            raise ApiError(400, "requests: List should have at least 1 item after validation, not 0")
        if len(items) > cfg.max_requests_per_file:
            raise ApiError(400, f"requests: a batch holds at most {cfg.max_requests_per_file} requests.")
        parsed: list[Parsed] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(400, f"requests.{i}: Input should be a valid dictionary")
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not ANTHROPIC_CUSTOM_ID.fullmatch(custom_id):
                raise ApiError(
                    400, f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                )
            if custom_id in seen:
                raise ApiError(400, f"requests.{i}.custom_id: duplicate custom_id '{custom_id}'.")
            seen.add(custom_id)
            if not isinstance(item.get("params"), dict):
                raise ApiError(400, f"requests.{i}.params: Input should be a valid dictionary")
            parsed.append(Parsed(i + 1, custom_id, MESSAGES_ENDPOINT, item["params"], ""))
        created = now()
        batch = {
            "id": new_id("msgbatch_"),
            "endpoint": MESSAGES_ENDPOINT,
            "model": next((p.body["model"] for p in parsed if isinstance(p.body.get("model"), str)), None),
            "status": "validating",
            "created_at": created,
            "expires_at": created + 24 * 3600,
            "request_counts": {"total": len(parsed), "completed": 0, "failed": 0},
        }
        state = BatchState(batch, requests=parsed, anthropic=True)
        store.batches[batch["id"]] = state
        store.batch_order.append(batch["id"])
        state.task = asyncio.create_task(runner.run(state))
        return anthropic_batch(state, request)

    @app.get("/v1/messages/batches")
    async def list_message_batches(
        request: Request, limit: int = 20, before_id: str | None = None, after_id: str | None = None
    ):
        if not 1 <= limit <= ANTHROPIC_MAX_LIST:
            raise ApiError(400, f"limit: Input should be between 1 and {ANTHROPIC_MAX_LIST}")
        if before_id is not None and after_id is not None:
            raise ApiError(400, "Only one of before_id and after_id may be given.")
        ids = [i for i in reversed(store.batch_order) if store.batches[i].anthropic]  # newest first
        if after_id is not None:
            rest = ids[ids.index(after_id) + 1 :] if after_id in ids else []
            page, has_more = rest[:limit], len(rest) > limit
        elif before_id is not None:
            rest = ids[: ids.index(before_id)] if before_id in ids else []
            page, has_more = rest[-limit:], len(rest) > limit
        else:
            page, has_more = ids[:limit], len(ids) > limit
        return {
            "data": [anthropic_batch(store.batches[i], request) for i in page],
            "has_more": has_more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }

    @app.get("/v1/messages/batches/{batch_id}")
    async def retrieve_message_batch(batch_id: str, request: Request):
        return anthropic_batch(get_message_batch(batch_id), request)

    @app.post("/v1/messages/batches/{batch_id}/cancel")
    async def cancel_message_batch(batch_id: str, request: Request):
        state = get_message_batch(batch_id)
        d = state.data
        if d["status"] in TERMINAL:
            raise ApiError(400, f"Message batch {batch_id} has already ended and cannot be canceled.")
        if not state.cancel_requested:
            state.cancel_requested = True
            state.cancel_initiated = time.time()
            if d["status"] in ("validating", "in_progress"):  # once finalizing, it ends without canceling
                d["status"] = "cancelling"
                d["cancelling_at"] = now()
        return anthropic_batch(state, request)

    @app.get("/v1/messages/batches/{batch_id}/results")
    async def message_batch_results(batch_id: str):
        state = get_message_batch(batch_id)
        if state.data["status"] not in TERMINAL or state.results_path is None:
            raise ApiError(404, f"Message batch {batch_id} has not ended: its results are not available yet.")
        broken = store.broken.get(batch_id)
        if broken is not None and broken[1] > 0:  # result_faults: served broken this many more times
            broken[1] -= 1
            return Response(broken[0], media_type="application/x-jsonl")
        return FileResponse(state.results_path, media_type="application/x-jsonl")

    @app.delete("/v1/messages/batches/{batch_id}")
    async def delete_message_batch(batch_id: str):
        state = get_message_batch(batch_id)
        if state.data["status"] not in TERMINAL:
            raise ApiError(
                400, f"Message batch {batch_id} has not ended; cancel it and wait until it ends to delete it."
            )
        del store.batches[batch_id]
        store.batch_order.remove(batch_id)
        store.broken.pop(batch_id, None)
        if state.results_path is not None:
            state.results_path.unlink(missing_ok=True)
        return {"id": batch_id, "type": "message_batch_deleted"}

    def get_message_batch(batch_id: str) -> BatchState:
        state = store.batches.get(batch_id)
        if state is None or not state.anthropic:
            raise ApiError(404, f"No message batch found with id '{batch_id}'.")
        return state

    app.add_middleware(AzurePaths)
    return app


def anthropic_refusal(request: Request, cfg: ServerConfig) -> Response | None:
    """The error answer of a ``/v1/messages*`` call without the right ``x-api-key`` (when the server has an
    ``api_key``) or without an ``anthropic-version`` header; None when it may go on."""
    if cfg.api_key:
        given = request.headers.get("x-api-key") or ""
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            return JSONResponse(anthropic_error(401, "invalid x-api-key"), status_code=401)
    if not request.headers.get("anthropic-version"):
        return JSONResponse(anthropic_error(400, "anthropic-version header is required"), status_code=400)
    return None


def anthropic_batch(state: BatchState, request: Request) -> dict[str, Any]:
    """The Message Batch object of ``state`` (see the module docstring); ``results_url`` is absolute,
    built from ``request``'s base URL."""
    d = state.data
    status = d["status"]
    shown = ANTHROPIC_STATUS.get(status, "in_progress")
    if shown == "in_progress" and state.cancel_requested:
        shown = "canceling"
    total = len(state.requests)
    good, bad = d["request_counts"]["completed"], d["request_counts"]["failed"]
    counts = {
        "processing": total - good - bad,
        "succeeded": good,
        "errored": bad,
        "canceled": 0,
        "expired": 0,
    }
    ended = shown == "ended"
    if ended:
        counts["processing"] = 0
        counts["errored"] = total - good - state.unrun
        counts["canceled" if status == "cancelled" else "expired"] = state.unrun
    base = str(request.base_url).rstrip("/")
    return {
        "id": d["id"],
        "type": "message_batch",
        "processing_status": shown,
        "request_counts": counts,
        "ended_at": rfc3339(state.ended or time.time()) if ended else None,
        "created_at": rfc3339(state.created),
        "expires_at": rfc3339(state.created + 24 * 3600),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(state.cancel_initiated),
        "results_url": f"{base}/v1/messages/batches/{d['id']}/results" if ended else None,
    }


class AzurePaths:
    """ASGI middleware serving Azure OpenAI URLs: ``/openai/v1/<rest>`` as ``/v1/<rest>`` (the v1 API), and
    ``/openai/<rest>`` as ``/v1/<rest>`` when it has an ``api-version`` query parameter (the older API;
    400 without it). The rewritten call is marked so that it may authenticate with ``api-key: <key>``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/openai" or path.startswith("/openai/"):
            rest = path[len("/openai") :]
            raw = scope.get("raw_path") or path.encode()
            raw_rest = raw[len(b"/openai") :] if raw.startswith(b"/openai") else rest.encode()
            if not (rest == "/v1" or rest.startswith("/v1/")):
                query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
                if not query.get("api-version"):
                    response = error_response(
                        400,
                        "api-version query parameter is required",
                        "api-version",
                        "missing_required_parameter",
                    )
                    await response(scope, receive, send)
                    return
                rest, raw_rest = "/v1" + rest, b"/v1" + raw_rest
            scope = {**scope, "path": rest, "raw_path": raw_rest, AZURE_SCOPE_KEY: True}
        await self.app(scope, receive, send)


def check_metadata(metadata: Any, max_pairs: int) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be an object.", "metadata", "invalid_type")
    if len(metadata) > max_pairs:
        raise ApiError(400, f"'metadata' can have at most {max_pairs} pairs.", "metadata", "invalid_value")
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(
                400, f"Metadata key '{key[:70]}' is longer than 64 characters.", "metadata", "invalid_value"
            )
        if not isinstance(value, str):
            raise ApiError(400, f"Metadata value for '{key}' must be a string.", "metadata", "invalid_type")
        if len(value) > 512:
            raise ApiError(
                400, f"Metadata value for '{key}' is longer than 512 characters.", "metadata", "invalid_value"
            )


def paginate(items: list[dict], limit: int, after: str | None, max_limit: int) -> dict[str, Any]:
    if limit < 1 or limit > max_limit:
        raise ApiError(400, f"Invalid 'limit': must be between 1 and {max_limit}.", "limit", "invalid_value")
    if after is not None:
        ids = [x["id"] for x in items]
        if after in ids:
            items = items[ids.index(after) + 1 :]
        else:
            items = []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }

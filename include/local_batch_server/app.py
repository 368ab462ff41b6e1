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

    def fail(self, state: BatchState, errors: list[dict]) -> None:
        d = state.data
        d["errors"] = {"object": "list", "data": errors}
        d["status"] = "failed"
        d["failed_at"] = now()

    async def _run(self, state: BatchState) -> None:
        d = state.data
        cancelled = await self.wait_phase(state, "validating_seconds")
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
        if self.cfg.upstream_base_url:
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
                for outcome in await self.answer_chunk(d["id"], requests[index:end], client):
                    outcomes.append(outcome)
                    d["request_counts"]["completed" if outcome.ok else "failed"] += 1
                index = max(index, end)
                if fraction is not None and index >= limit:
                    return False, True
            return state.cancel_requested, False
        finally:
            if client is not None:
                await client.aclose()

    async def answer_chunk(self, batch_id: str, chunk: list[Parsed], client) -> list[Outcome]:
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
        good, bad, n_good, n_bad = await asyncio.to_thread(
            build_result_files, outcomes, state.requests, unrun_error, self.cfg.shuffle_seed
        )
        d["request_counts"]["completed"] = n_good
        d["request_counts"]["failed"] = n_bad
        faults = self.cfg.result_faults
        if faults is not None and faults.batches is not None:
            if faults.batches <= 0:
                faults = None
            else:
                faults.batches -= 1
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
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = first.get("loc") or ()
        param = str(loc[-1]) if loc else None
        return error_response(400, f"Invalid request: {first.get('msg', 'bad request')}", param, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(exc.status_code, message, None, None)

    @app.middleware("http")
    async def _faults_and_auth(request: Request, call_next):
        path = request.url.path
        lost = None  # a fault that fires after the call was handled
        if not path.startswith("/_admin"):
            cfg = store.config
            if cfg.api_key and path.startswith("/v1"):
                if not bearer_matches(request.headers.get("authorization"), cfg.api_key):
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
                    lost = error_response(fault.status, message, None, code, headers)
                    break
                return error_response(fault.status, message, None, code, headers)
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
        items = [public_batch(store.batches[i].data) for i in reversed(store.batch_order)]
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
        if state is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return state

    return app


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

"""``AnthropicBatchHook``: the pipeline's batch-API calls on Anthropic's Message Batches API.

The API, as its reference gives it: ``POST /v1/messages/batches`` takes the requests themselves (no file
upload: ``{"requests": [{"custom_id", "params"}, ...]}``, at most 100,000 requests / 256 MB), ``GET
/v1/messages/batches/{id}`` polls (``processing_status`` ``in_progress`` | ``canceling`` | ``ended``,
``request_counts`` {processing, succeeded, errored, canceled, expired}), ``GET .../{id}/results`` streams
one JSONL result line per request once it ended, ``POST .../{id}/cancel`` cancels, ``GET
/v1/messages/batches`` lists newest first. Every call carries ``x-api-key`` and ``anthropic-version``.

The hook speaks it over httpx (already installed with the openai client) rather than the ``anthropic`` SDK:
the SDK takes the requests as Python objects (a 256 MB batch parsed and held in memory), where here the
shard file is streamed into the create call as it is on disk, byte for byte as the build wrote it.

Above the hook everything is the OpenAI pipeline's: a batch is handed up in the OpenAI Batch's shape
(:func:`openai_batch`), its results as the ``output_file_id`` (the batch id: :meth:`download_file` fetches
``GET .../{id}/results`` from the connection's base URL, never the absolute ``results_url`` the service
names, so the key never goes to another host), and errors as the ``openai`` client's exceptions.

Lost submissions: Anthropic batches carry no metadata and the API takes no idempotency key. Just before
each create call the newest batch's id is recorded with the task's intent; a create whose answer was lost
(a timeout, a dropped connection, a worker killed before it recorded the id) is looked for among the
batches listed above that one that hold exactly the shard's number of requests: one such batch is
re-attached; two or more fail the task naming them (never a guess, never a second batch). A batch made
before the call (another shard's of the same size) is never taken. docs/faults.md says what this cannot
guarantee. Keys are sent stripped (a key read from a file keeps its newline) and redacted from the errors
the API answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.sdk.bases.hook import BaseHook

from openai_batch_airflow.hooks import SHARED_ASYNC_CLIENTS, BatchAPI, clean_key, shared_clients_enabled
from openai_batch_airflow.submit import Intent, with_retries

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: The ``anthropic-version`` header (connection extra ``anthropic_version`` overrides it).
ANTHROPIC_VERSION = "2023-06-01"
#: Seconds of one call (a poll is also cut at the hooks' POLL_TIMEOUT_SECONDS); the create of a 256 MB
#: batch gets longer.
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CREATE_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
POLL_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
#: Tries of an idempotent call (a GET, a cancel) on a transient failure (429, 5xx, 529, a lost connection).
READ_ATTEMPTS = 3
#: Batches listed at most while looking for a lost create.
MAX_LISTED = 1000


class AmbiguousSubmission(RuntimeError):
    """More than one batch could be the one a lost create made: nothing is guessed."""


def _epoch(value: Any) -> int | None:
    """Unix seconds of an RFC 3339 timestamp (``2026-12-07T20:31:12.123Z``), None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def _count(counts: dict[str, Any], key: str) -> int:
    value = counts.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def openai_batch(data: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Message Batch in the OpenAI Batch's shape (what the rest of the pipeline reads).

    ``processing_status`` ``in_progress`` is ``in_progress``, ``canceling`` is ``cancelling``, ``ended`` is
    ``cancelled`` when a cancel was asked, else ``expired`` when requests expired (its results are kept and
    the expired ones are resubmitted, as for OpenAI), else ``completed``; any other status is passed on as
    it is (an unknown status is waited on until the deadline). ``request_counts``: total = the five
    counts, completed = succeeded, failed = errored + canceled + expired. ``output_file_id`` is the batch
    id once results exist."""
    counts = data.get("request_counts") if isinstance(data.get("request_counts"), dict) else {}
    succeeded, errored = _count(counts, "succeeded"), _count(counts, "errored")
    canceled, expired = _count(counts, "canceled"), _count(counts, "expired")
    total = _count(counts, "processing") + succeeded + errored + canceled + expired
    raw = data.get("processing_status")
    if not isinstance(raw, str):  # a status no API would send: unknown, waited on until the deadline
        raw = repr(raw)[:80]
    ended_at = _epoch(data.get("ended_at"))
    status: Any = {"in_progress": "in_progress", "canceling": "cancelling"}.get(raw, raw)
    if raw == "ended":
        if data.get("cancel_initiated_at"):
            status = "cancelled"
        elif expired:
            status = "expired"
        else:
            status = "completed"
    batch_id = data.get("id")
    return {
        "id": batch_id,
        "object": "batch",
        "status": status,
        "endpoint": "/v1/messages",
        "input_file_id": None,
        "output_file_id": batch_id if raw == "ended" and data.get("results_url") else None,
        "error_file_id": None,
        "request_counts": {"total": total, "completed": succeeded, "failed": errored + canceled + expired},
        "errors": None,
        "usage": None,
        "created_at": _epoch(data.get("created_at")),
        "in_progress_at": _epoch(data.get("created_at")),
        "finalizing_at": None,
        "completed_at": ended_at if status == "completed" else None,
        "failed_at": None,
        "expired_at": ended_at if status == "expired" else None,
        "cancelling_at": _epoch(data.get("cancel_initiated_at")),
        "cancelled_at": ended_at if status == "cancelled" else None,
        "expires_at": _epoch(data.get("expires_at")),
        "metadata": None,
    }


class Batch(dict):
    """A batch in the OpenAI Batch's shape (:func:`openai_batch`), read as a dict or by attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def model_dump(self) -> dict[str, Any]:
        return dict(self)


def _redacted(text: str, request: httpx.Request | None) -> str:
    """``text`` with the request's API key replaced by ``***`` (a gateway may quote the header it refused)."""
    key = request.headers.get("x-api-key") if request is not None else None
    return text.replace(key, "***") if key and len(key) >= 4 else text


def _status_error(response: httpx.Response) -> Exception:
    """The ``openai`` exception for an error answer (by status), its message the API's own with the key
    redacted."""
    import openai

    raw = _redacted(response.text, response.request)
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = None
    inner = body.get("error") if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    kind = inner.get("type") if isinstance(inner, dict) else None
    text = f"{kind}: {message}" if kind and message else (message or raw[:500] or response.reason_phrase)
    classes = {
        400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
        404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
        429: openai.RateLimitError,
    }  # fmt: skip
    cls = classes.get(response.status_code)
    if cls is None:
        cls = openai.InternalServerError if response.status_code >= 500 else openai.APIStatusError
    return cls(f"Error code: {response.status_code} - {text}", response=response, body=body)


def _request_of(exc: httpx.HTTPError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # raised before a request was made
        return None


def _transport_error(exc: httpx.HTTPError, request: httpx.Request | None) -> Exception:
    import openai

    text = _redacted(str(exc), request)
    request = request or httpx.Request("GET", "http://unknown")
    if isinstance(exc, httpx.TimeoutException):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(message=f"{type(exc).__name__}: {text}", request=request)


def _transient(exc: Exception) -> bool:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)


def _settings(conn: Any, extras: dict[str, Any], conn_id: str) -> dict[str, Any]:
    """The client settings of an Anthropic connection: host = base URL (default api.anthropic.com; a
    trailing ``/v1`` is dropped), password = API key, extra ``anthropic_version`` / ``anthropic_beta``."""
    key = clean_key(conn.password, conn_id)
    base = (conn.host or DEFAULT_BASE_URL).rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    if "://" not in base:
        base = "https://" + base
    headers = {
        "x-api-key": key,
        "anthropic-version": str(extras.get("anthropic_version") or ANTHROPIC_VERSION),
    }
    if extras.get("anthropic_beta"):
        headers["anthropic-beta"] = str(extras["anthropic_beta"])
    return {"base_url": base, "headers": headers}


class AsyncAnthropicBatches:
    """The async calls the trigger makes (poll, cancel), on one httpx pool; shared between the triggers of
    a connection like the OpenAI client (:class:`~openai_batch_airflow.hooks.SharedAsyncClients`)."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=POLL_TIMEOUT)

    def is_closed(self) -> bool:
        return self._http.is_closed

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, _request_of(exc)) from exc
        if response.status_code >= 400:
            raise _status_error(response)
        return _json(response)

    async def retrieve(self, batch_id: str) -> Batch:
        return Batch(openai_batch(await self._call("GET", f"/v1/messages/batches/{_safe(batch_id)}")))

    async def cancel(self, batch_id: str) -> Batch:
        return Batch(openai_batch(await self._call("POST", f"/v1/messages/batches/{_safe(batch_id)}/cancel")))


def _safe(batch_id: str) -> str:
    """A batch id as a path segment: refused when it could reach another path."""
    bad = not isinstance(batch_id, str) or batch_id in ("", ".", "..") or any(c in batch_id for c in "/?#%\\")
    if bad:
        raise ValueError(f"not a batch id: {str(batch_id)[:80]!r}")
    return batch_id


def _json(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a successful answer; an answer that is not one (an HTML page from a proxy, a
    list) is the ``openai`` client's ``APIResponseValidationError``: an API error, polled again."""
    import openai

    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise openai.APIResponseValidationError(
            response,
            None,
            message=f"the answer to {response.request.method} {response.request.url.path} "
            "is not a JSON object",
        )
    return data


class AnthropicBatchHook(BaseHook, BatchAPI):
    """The Message Batches calls of the pipeline, on connection ``conn_id`` (type ``anthropic``, default
    ``anthropic_default``): host = base URL (empty: ``https://api.anthropic.com``), password = API key,
    extra ``anthropic_version`` (default :data:`ANTHROPIC_VERSION`) and ``anthropic_beta``."""

    conn_name_attr = "conn_id"
    default_conn_name = "anthropic_default"
    conn_type = "anthropic"
    hook_name = "Anthropic (Message Batches)"
    provider = "anthropic"
    uploads_files = False
    counts_enqueued_tokens = False  # no metadata; Anthropic's limit counts requests in its queue

    def __init__(self, conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self._aconn: AsyncAnthropicBatches | None = None
        self._shared_key: tuple[int, str, str] | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"host": "Base URL", "password": "API key"},
            "placeholders": {"host": DEFAULT_BASE_URL, "extra": '{"anthropic_version": "2023-06-01"}'},
        }

    # -- clients ----------------------------------------------------------------------------------
    @cached_property
    def _settings(self) -> dict[str, Any]:
        conn = self.get_connection(self.conn_id)
        return _settings(conn, conn.extra_dejson, self.conn_id)

    @cached_property
    def conn(self) -> httpx.Client:
        """The sync HTTP client, built once per hook (base URL and headers from the connection)."""
        return httpx.Client(base_url=self._settings["base_url"], headers=self._settings["headers"],
                            timeout=TIMEOUT)  # fmt: skip

    def test_connection(self) -> tuple[bool, str]:
        try:
            self._call("GET", "/v1/messages/batches", params={"limit": 1})
            return True, "Connection established!"
        except Exception as exc:
            return False, str(exc)

    async def aconn(self) -> AsyncAnthropicBatches:
        """The async client, shared per connection settings in the running loop (see
        :meth:`OpenAIBatchHook.aconn`)."""
        if self._aconn is None:
            conn = await get_async_connection(self.conn_id, hook=self)
            settings = _settings(conn, await get_async_extra_dejson(conn), self.conn_id)
            if shared_clients_enabled():
                self._shared_key, self._aconn = SHARED_ASYNC_CLIENTS.acquire(
                    self.conn_id, settings, AsyncAnthropicBatches
                )
            else:
                self._aconn = AsyncAnthropicBatches(**settings)
        return self._aconn

    def _call(self, method: str, path: str, attempts: int = READ_ATTEMPTS, **kwargs: Any) -> Any:
        """One call, tried up to ``attempts`` times on a transient failure; the JSON answer."""
        for attempt in range(1, attempts + 1):
            try:
                try:
                    response = self.conn.request(method, path, **kwargs)
                except httpx.HTTPError as exc:
                    raise _transport_error(exc, _request_of(exc)) from exc
                if response.status_code >= 400:
                    raise _status_error(response)
                return _json(response)
            except Exception as exc:
                if attempt == attempts or not _transient(exc):
                    raise
                log.warning("%s %s failed (%s); trying again (%d of %d)", method, path, exc, attempt + 1,
                            attempts)  # fmt: skip
                time.sleep(min(2.0**attempt, 10.0))
        raise AssertionError("unreachable")

    # -- batches ----------------------------------------------------------------------------------
    def retrieve(self, batch_id: str) -> Batch:
        return Batch(openai_batch(self._call("GET", f"/v1/messages/batches/{_safe(batch_id)}")))

    async def aretrieve(self, batch_id: str) -> Batch:
        return await (await self.aconn()).retrieve(batch_id)

    def cancel(self, batch_id: str) -> Batch:
        return Batch(openai_batch(self._call("POST", f"/v1/messages/batches/{_safe(batch_id)}/cancel")))

    async def acancel_all(self, batch_ids: list[str], concurrency: int = 16) -> dict[str, Any]:
        """Cancel every batch through a client of its own (see :meth:`OpenAIBatchHook.acancel_all`)."""
        gate = asyncio.Semaphore(concurrency)
        conn = await get_async_connection(self.conn_id, hook=self)
        client = AsyncAnthropicBatches(**_settings(conn, await get_async_extra_dejson(conn), self.conn_id))

        async def one(batch_id: str) -> Any:
            async with gate:
                try:
                    return await client.cancel(batch_id)
                except Exception as exc:
                    return exc

        try:
            outcomes = await asyncio.gather(*(one(b) for b in batch_ids))
        finally:
            await client.close()
        return dict(zip(batch_ids, outcomes, strict=True))

    def enqueued_tokens(self, model: str) -> int:
        """0: Anthropic batches carry no token estimate (their limit counts requests in the queue)."""
        return 0

    def upload_once(self, path: str | Path, name: str, intent: Intent) -> Any:
        raise NotImplementedError("Anthropic Message Batches take the requests with the create call")

    def create_once(
        self,
        intent: Intent,
        metadata: dict[str, str],
        *,
        input_file_id: str | None = None,
        endpoint: str = "/v1/messages",
        completion_window: str = "24h",
        requests_path: str | Path | None = None,
        requests: int | None = None,
    ) -> Batch:
        """Create a batch of the requests in ``requests_path`` (a shard file of ``requests`` lines, each
        ``{"custom_id", "params"}``) once per task generation; return it (possibly the one an earlier try
        made: recorded, or found by :meth:`_find_batch`). ``metadata`` is logged only (the API keeps none)."""
        if requests_path is None or not requests:
            raise ValueError("an Anthropic batch needs its shard file and request count")
        saved = intent.start()
        if saved.get("batch_id"):
            batch = self.retrieve(saved["batch_id"])
            log.info("re-attaching to batch %s (%s) created by an earlier try", batch.id, batch.status)
            return batch
        found = self._find_batch(saved, requests) if intent.resumed else None
        if found is None:
            log.info("creating a Message Batch of %d requests (%s)", requests,
                     ", ".join(f"{k}={v}" for k, v in metadata.items()))  # fmt: skip

            def attempt() -> Batch:
                # recorded before the call: a lost answer is looked for only among the batches listed
                # above this one, so a batch made before the call (another shard's) is never taken
                intent.done(newest_before=self._newest_batch_id())
                return self._create(Path(requests_path))

            found = with_retries(attempt, lambda: self._find_batch(saved, requests), "batch create")
        else:
            log.info("found batch %s created by an earlier try", found.id)
        intent.done(batch_id=found.id)
        return found

    def _create(self, path: Path) -> Batch:
        """``POST /v1/messages/batches`` with the shard's lines streamed as the ``requests`` array, byte for
        byte (never parsed or held whole); no automatic retry (:func:`with_retries` looks first)."""
        try:
            response = self.conn.post(
                "/v1/messages/batches",
                content=_requests_body(path),
                headers={"content-type": "application/json", "content-length": str(_body_size(path))},
                timeout=CREATE_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc, _request_of(exc)) from exc
        if response.status_code >= 400:
            raise _status_error(response)
        return Batch(openai_batch(_json(response)))

    def _newest_batch_id(self) -> str:
        """The id of the newest batch the API lists now (``""`` when it lists none)."""
        page = self._call("GET", "/v1/messages/batches", params={"limit": 1})
        data = [b for b in page.get("data") or [] if isinstance(b, dict)]
        return str(data[0].get("id") or "") if data else ""

    def _find_batch(self, saved: dict[str, Any], requests: int) -> Batch | None:
        """The batch a lost create made: listed above ``saved["newest_before"]`` (the newest batch just
        before the call; a try that recorded none: created since ``saved["since"]``, the try's start less a
        margin for clock skew, a batch of unknown age skipped) with exactly ``requests`` requests.

        None when there is none; raises :class:`AmbiguousSubmission` when there are several (another
        client submitting as many requests at the same moment): the task fails naming them rather than
        guess or pay twice. The listing stops at the marker, at an older batch, at its end, at a cursor
        that does not move, or after :data:`MAX_LISTED` batches; a batch listed twice counts once."""
        marker = saved.get("newest_before") or None
        since = int(saved.get("since") or 0)
        found: dict[str, Batch] = {}
        after: str | None = None
        listed = 0
        while listed < MAX_LISTED:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after_id"] = after
            page = self._call("GET", "/v1/messages/batches", params=params)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            listed += len(data)
            stop = False
            for raw in data:
                if marker is not None and raw.get("id") == marker:
                    stop = True
                    break
                batch = Batch(openai_batch(raw))
                if batch.created_at is not None and batch.created_at < since:
                    stop = True
                    break
                if batch.created_at is None and marker is None:
                    continue  # of unknown age: neither taken nor a reason to stop
                if isinstance(batch.id, str) and batch.request_counts["total"] == requests:
                    found.setdefault(batch.id, batch)
            cursor = page.get("last_id") or (data[-1].get("id") if data else None)
            if stop or not page.get("has_more") or not data or not cursor or cursor == after:
                break
            after = str(cursor)
        if len(found) > 1:
            ids = ", ".join(list(found)[:10])
            raise AmbiguousSubmission(
                f"the answer to an earlier create was lost and {len(found)} batches of {requests} requests "
                f"were created since then ({ids}): which one is this shard's cannot be told (Anthropic "
                "batches carry no metadata). Nothing new was created. Check them in the Anthropic console, "
                "cancel the ones that are not this run's, and clear this task."
            )
        return next(iter(found.values()), None)

    # -- downloads --------------------------------------------------------------------------------
    def download_file(self, file_id: str, path: Path) -> Path:
        """Stream batch ``file_id``'s results (``GET /v1/messages/batches/{id}/results`` on the connection's
        base URL) to ``path`` through ``<path>.part``; transient failures are tried again."""
        part = path.with_name(path.name + ".part")
        url = f"/v1/messages/batches/{_safe(file_id)}/results"
        for attempt in range(1, 6):
            try:
                with self.conn.stream("GET", url) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _status_error(response)
                    with open(part, "wb") as out:
                        for chunk in response.iter_bytes(1024 * 1024):
                            out.write(chunk)
                break
            except httpx.HTTPError as exc:
                error = _transport_error(exc, _request_of(exc))
                if attempt == 5:
                    raise error from exc
            except Exception as exc:
                if attempt == 5 or not _transient(exc):
                    raise
            time.sleep(min(2.0**attempt, 10.0))
        os.replace(part, path)
        return path

    # -- models (the pre-flight check) ------------------------------------------------------------
    def retrieve_model(self, model: str, **options: Any) -> Any:
        if not model or any(c in model for c in "/?#%\\") or model.strip(".") == "":
            raise ValueError(f"not a model name: {model[:80]!r}")
        return self._call("GET", f"/v1/models/{model}", attempts=1 + int(options.get("max_retries") or 0),
                          timeout=options.get("timeout") or TIMEOUT)  # fmt: skip

    def list_models(self, limit: int | None = None, **options: Any) -> list[str]:
        page = self._call("GET", "/v1/models", params={"limit": min(limit or 1000, 1000)},
                          attempts=1 + int(options.get("max_retries") or 0),
                          timeout=options.get("timeout") or TIMEOUT)  # fmt: skip
        data = page.get("data") if isinstance(page, dict) else None
        ids = [m.get("id") for m in data or [] if isinstance(m, dict)]
        return ids[:limit] if limit else ids


def _requests_body(path: Path) -> Iterator[bytes]:
    """``{"requests":[<line>,<line>,...]}`` from a JSONL file, its lines as they are (blank lines skipped,
    line ends dropped)."""
    yield b'{"requests":['
    first = True
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if not first:
                yield b","
            first = False
            yield line
    yield b"]}"


def _body_size(path: Path) -> int:
    """The byte length of :func:`_requests_body` for ``path`` (a second pass over the file: a streamed
    body with a Content-Length, since some proxies refuse chunked uploads)."""
    total, lines = len(b'{"requests":[') + len(b"]}"), 0
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            total += len(line)
            lines += 1
    return total + max(lines - 1, 0)

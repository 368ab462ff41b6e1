"""The batch-API hooks: every call the pipeline makes to a batch API goes through one of them.

:class:`BatchAPI` is the small interface the tasks, the waiting operator, the trigger and the UI use (submit
once, find a lost submission, poll, fetch results, cancel, limits); :func:`batch_hook` gives the hook of a
provider: :class:`OpenAIBatchHook` (OpenAI, or any OpenAI-compatible base URL), :class:`AzureOpenAIBatchHook`
(Azure OpenAI, the same Batch API behind Azure's URLs and auth) and
:class:`~openai_batch_airflow.anthropic_batches.AnthropicBatchHook` (Anthropic Message Batches). Batches
are handed up in one shape, the OpenAI Batch's (``id``, ``status``, ``request_counts``, ``output_file_id``,
...), and errors as the ``openai`` client's exception classes, so everything above the hooks is shared.

``OpenAIBatchHook`` builds on the provider's :class:`~airflow.providers.openai.hooks.openai.OpenAIHook`
(connection type ``openai``; its host may be any OpenAI-compatible base URL, its password is the API
key). The hooks are the one place that builds API clients: tasks, the waiting operator and the trigger get
one from a ``hook`` (a cached property, or :func:`openai_batch_airflow.tasks.hook` for the task functions)
and call its methods.

Upload and create happen at most once per task generation (see :mod:`openai_batch_airflow.submit` for the
recorded :class:`~openai_batch_airflow.submit.Intent`): a retry re-attaches to what an earlier try made,
and a call whose answer was lost is looked for before it is repeated, so a batch is never paid for twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.openai.hooks.openai import OpenAIHook

from openai_batch_airflow import storage
from openai_batch_airflow.config import DEFAULT_CONN_IDS
from openai_batch_airflow.status import BatchStatus
from openai_batch_airflow.submit import Intent, with_retries

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

log = logging.getLogger(__name__)

#: Downloads of a batch's result files before a broken download is accepted as it is (and named).
DOWNLOAD_ATTEMPTS = 3
#: Seconds one poll of a batch may take (the client's default is 600): a trigger's round of polls ends
#: when its slowest poll does, so a hung call must not hold the others for long.
POLL_TIMEOUT_SECONDS = 30.0
#: How far back the listings look for this pipeline's batches: nothing older can still be running (24 h
#: completion window plus a margin).
ACTIVE_WINDOW_SECONDS = 26 * 3600


#: ``0`` (or ``false``/``no``/``off``): every hook builds an async client of its own instead of sharing one
#: per connection (the benchmark's comparison; see :class:`SharedAsyncClients`).
SHARED_CLIENT_ENV = "OPENAI_BATCH_TRIGGER_SHARED_CLIENT"


def shared_clients_enabled() -> bool:
    """Whether hooks share async clients (:data:`SHARED_CLIENT_ENV`, on unless set to a false word)."""
    return os.environ.get(SHARED_CLIENT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _Shared:
    loop: asyncio.AbstractEventLoop  # held, so the loop's id in the key cannot be reused while it is here
    client: AsyncOpenAI
    users: int = 0


class SharedAsyncClients:
    """One ``AsyncOpenAI`` client (one HTTP pool and TLS context) per connection per event loop.

    The triggerer runs all triggers of a process in one event loop; a thousand waiting batches on one
    connection then poll through one client instead of a thousand. A client is keyed by the running loop,
    the connection id and a fingerprint (a hash) of the client settings the connection resolves to, so an
    edited connection (a new key, another host) gets a new client while the triggers still on the old one
    keep it. It is built inside the running loop on first use and closed when its last user releases it.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, str], _Shared] = {}

    @staticmethod
    def fingerprint(client_kwargs: dict[str, Any]) -> str:
        text = json.dumps(client_kwargs, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def acquire(
        self, conn_id: str, client_kwargs: dict[str, Any], factory: Any = None
    ) -> tuple[tuple[int, str, str], AsyncOpenAI]:
        """The shared client for these settings in the running loop (built now by ``factory``, default
        ``AsyncOpenAI``, if there is none), counted as one more user; returns ``(key, client)``, the key for
        :meth:`release`. Synchronous on purpose: no other trigger runs between the look-up and the count.
        A client needs ``is_closed()`` and ``close()``."""
        if factory is None:
            from openai import AsyncOpenAI as factory

        loop = asyncio.get_running_loop()
        key = (id(loop), conn_id, self.fingerprint({"factory": factory.__qualname__, **client_kwargs}))
        entry = self._entries.get(key)
        if entry is None or entry.loop is not loop or entry.client.is_closed():
            entry = self._entries[key] = _Shared(loop, factory(**client_kwargs))
        entry.users += 1
        return key, entry.client

    async def release(self, key: tuple[int, str, str], client: AsyncOpenAI) -> None:
        """One user fewer; the last one out closes the client (the count drops before any await, so a
        cancelled caller still counts right; the close itself is shielded from a second cancellation)."""
        entry = self._entries.get(key)
        if entry is not None and entry.client is client:
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        await asyncio.shield(client.close())

    def users(self) -> dict[tuple[str, str], int]:
        """``{(conn_id, fingerprint): users}`` of the clients open in the running loop."""
        loop = asyncio.get_running_loop()
        return {(k[1], k[2]): e.users for k, e in self._entries.items() if e.loop is loop}


#: The process's registry: every :class:`OpenAIBatchHook` of a triggerer takes its async client here.
SHARED_ASYNC_CLIENTS = SharedAsyncClients()


class BatchAPI:
    """What the pipeline needs of a batch API; one implementation per provider.

    * **submit once**: :meth:`upload_once` (a provider without file upload, :attr:`uploads_files` False,
      has none: its requests go with the create call) and :meth:`create_once`, both recorded in an
      :class:`~openai_batch_airflow.submit.Intent`, so a retry re-attaches instead of paying twice, and a
      call whose answer was lost is **found** (``_find_batch``) before it is repeated;
    * **poll**: :meth:`retrieve` / :meth:`aretrieve` (a batch in the OpenAI Batch's shape, for
      :func:`~openai_batch_airflow.triggers.batch_summary`), with :meth:`aconn` / :meth:`aclose` around a
      trigger's polling;
    * **fetch results**: :meth:`download_file` of the ``output_file_id`` / ``error_file_id`` a batch
      names, checked whole by :meth:`download_results` (shared);
    * **cancel**: :meth:`cancel`, :meth:`acancel_all`;
    * **limits**: :meth:`enqueued_tokens` (0 where the API keeps no such count), :meth:`retrieve_model` /
      :meth:`list_models` for the pre-flight check.

    Errors are raised as the ``openai`` client's exception classes (``APIStatusError`` by status,
    ``APIConnectionError``, ``APITimeoutError``), whatever the provider: what is retried, refused or
    waited on is decided once, above the hooks.
    """

    #: The ``provider`` name (:data:`DEFAULT_CONN_IDS`).
    provider = "openai"
    #: Requests go in an uploaded file (True) or with the create call itself (False).
    uploads_files = True
    #: The pre-flight asks the API whether it knows the model.
    checks_model = True
    #: Batches carry their estimated prompt tokens (metadata), so ``max_enqueued_tokens`` can hold shards
    #: back in waves.
    counts_enqueued_tokens = True
    conn_id: str
    _aconn: Any = None
    _shared_key: tuple[int, str, str] | None = None

    # -- what each provider implements ------------------------------------------------------------
    def retrieve(self, batch_id: str) -> Any:
        """The batch now, in the OpenAI Batch's shape."""
        raise NotImplementedError

    async def aretrieve(self, batch_id: str) -> Any:
        """One poll from the trigger, through :meth:`aconn`'s client."""
        raise NotImplementedError

    async def aconn(self) -> Any:
        """The async client (shared per connection settings in the running loop)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Let go of the async client: a shared one is closed when its last user lets go, one of the hook's
        own at once. The next async call takes a client again (shared by every provider's hook)."""
        client, self._aconn = self._aconn, None
        key, self._shared_key = self._shared_key, None
        if client is None:
            return
        if key is not None:
            await SHARED_ASYNC_CLIENTS.release(key, client)
        else:
            await client.close()

    def cancel(self, batch_id: str) -> Any:
        raise NotImplementedError

    async def acancel_all(self, batch_ids: list[str], concurrency: int = 16) -> dict[str, Any]:
        """Cancel every batch at once; ``{batch_id: batch or the exception its cancel raised}``."""
        raise NotImplementedError

    def enqueued_tokens(self, model: str) -> int:
        raise NotImplementedError

    def upload_once(self, path: str | Path, name: str, intent: Intent) -> Any:
        raise NotImplementedError

    def create_once(self, intent: Intent, metadata: dict[str, str], *, input_file_id: str | None,
                    endpoint: str, completion_window: str = "24h", requests_path: str | Path | None = None,
                    requests: int | None = None) -> Any:  # fmt: skip
        """Create the batch once per task generation (re-attach to, or find, one an earlier try made)."""
        raise NotImplementedError

    def download_file(self, file_id: str, path: Path) -> Path:
        raise NotImplementedError

    def retrieve_model(self, model: str, **options: Any) -> Any:
        raise NotImplementedError

    def list_models(self, limit: int | None = None, **options: Any) -> list[str]:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def download_results(
        self, summary: dict[str, Any], folder: storage.Location, index: int, scratch: Path
    ) -> tuple[list[tuple[str, Path]], list[str]]:
        """Stream a finished batch's output and error files to ``folder`` (skipping what is already
        there) and check they are whole: every line readable, a line for every request.

        A broken download (a cut-off or non-JSON line, fewer or more lines than ``request_counts``) is
        fetched again, up to :data:`DOWNLOAD_ATTEMPTS` times; if it stays broken, what was downloaded is
        kept (never throw away answers already paid for) and the problem is returned, so the merge lands
        every readable answer, marks the rest precisely and fails the run visibly.

        Returns ``([(stored location, local file)], problems)``, output first. A remote ``folder`` is
        filled through ``scratch`` (where the local copies stay for the caller); a local one is used in
        place.
        """
        from batchpipe.resubmit import download_problem

        local_folder = storage.mirror(folder, scratch / "results")
        problem = None
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            paths: dict[str, tuple[storage.Location, Path]] = {}
            for kind in ("output", "error"):
                file_id = summary.get(f"{kind}_file_id")
                if not file_id:
                    continue
                # the batch id in the name: after a cleared run submits anew, an old download is never reused
                name = f"shard-{index:05d}.r{summary.get('round', 0)}.{summary['id']}.{kind}.jsonl"
                target, local = folder / name, local_folder / name
                storage.fetch_missing(target, local)
                if not local.exists():
                    self.download_file(file_id, local)
                    log.info("batch %s: downloaded %s file %s", summary["id"], kind, file_id)
                paths[kind] = (target, local)
            problem = download_problem(
                summary.get("request_counts"),
                paths["output"][1] if "output" in paths else None,
                paths["error"][1] if "error" in paths else None,
                summary["status"],
            )
            if problem is None:
                break
            log.warning("batch %s: broken download (%d of %d): %s", summary["id"], attempt, DOWNLOAD_ATTEMPTS,
                        problem)  # fmt: skip
            if attempt < DOWNLOAD_ATTEMPTS:
                for target, local in paths.values():  # fetched again from the service
                    local.unlink(missing_ok=True)
                    storage.discard(target)
                time.sleep(attempt)
        for target, local in paths.values():
            storage.publish(local, target)
            log.info("batch %s: %s stored", summary["id"], storage.shown(target))
        problems = []
        if problem is not None:
            problems.append(
                f"batch {summary['id']} (shard {index}): result files still broken after {DOWNLOAD_ATTEMPTS} "
                f"downloads: {problem}; every readable answer was kept"
            )
            log.error("%s", problems[-1])
        return [(storage.shown(target), local) for target, local in paths.values()], problems


class OpenAIBatchHook(OpenAIHook, BatchAPI):
    """The Batch API calls of the pipeline, on connection ``conn_id`` (default ``openai_default``).

    :param conn_id: an Airflow connection of type ``openai``.
    :param client: use this OpenAI client instead of building one from the connection (a check handed a
        client, a test).
    """

    def __init__(self, conn_id: str = OpenAIHook.default_conn_name, *args: Any, client: Any = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(conn_id, *args, **kwargs)
        if client is not None:
            self.__dict__["conn"] = client  # the cached sync client
        self._aconn: AsyncOpenAI | None = None
        self._shared_key: tuple[int, str, str] | None = None

    # -- clients ----------------------------------------------------------------------------------
    @cached_property
    def conn(self) -> OpenAI:
        """The sync client, built once per hook."""
        return self.get_conn()

    async def aconn(self) -> AsyncOpenAI:
        """The async client, taken on first use and kept until :meth:`aclose`: the one this connection's
        settings share in the running loop (:data:`SHARED_ASYNC_CLIENTS`), or, with sharing switched off
        (:data:`SHARED_CLIENT_ENV`), one of the hook's own."""
        if self._aconn is None:
            if not shared_clients_enabled():
                self._aconn = await self.aget_conn()
            else:
                conn = await get_async_connection(self.conn_id, hook=self)
                kwargs = self._client_kwargs(conn, await get_async_extra_dejson(conn))
                self._shared_key, self._aconn = SHARED_ASYNC_CLIENTS.acquire(
                    self.conn_id, kwargs, self._client_class(kwargs, asynchronous=True)
                )
        return self._aconn

    @staticmethod
    def _client_class(kwargs: dict[str, Any], asynchronous: bool = False) -> Any:
        """The client class the settings ``kwargs`` are for (here always ``OpenAI`` / ``AsyncOpenAI``)."""
        from openai import AsyncOpenAI, OpenAI

        return AsyncOpenAI if asynchronous else OpenAI

    # -- batches ----------------------------------------------------------------------------------
    def retrieve(self, batch_id: str) -> Any:
        return self.conn.batches.retrieve(batch_id, timeout=POLL_TIMEOUT_SECONDS)

    async def aretrieve(self, batch_id: str) -> Any:
        """One poll, given up after :data:`POLL_TIMEOUT_SECONDS` (a timeout is a transient poll error)."""
        return await (await self.aconn()).batches.retrieve(batch_id, timeout=POLL_TIMEOUT_SECONDS)

    def cancel(self, batch_id: str) -> Any:
        return self.conn.batches.cancel(batch_id)

    async def acancel_all(self, batch_ids: list[str], concurrency: int = 16) -> dict[str, Any]:
        """Cancel every batch of ``batch_ids`` through one client of its own (closed at the end: called when a
        waiting task is killed, after its polling may have closed the shared one), at most
        ``concurrency`` calls at a time; returns ``{batch_id: Batch or the exception its cancel raised}``."""
        gate = asyncio.Semaphore(concurrency)

        async def one(client: AsyncOpenAI, batch_id: str) -> Any:
            async with gate:
                try:
                    return await client.batches.cancel(batch_id)
                except Exception as exc:
                    return exc

        async with await self.aget_conn() as client:
            outcomes = await asyncio.gather(*(one(client, b) for b in batch_ids))
        return dict(zip(batch_ids, outcomes, strict=True))

    def enqueued_tokens(self, model: str) -> int:
        """Estimated prompt tokens (metadata ``est_prompt_tokens``) of this pipeline's batches for
        ``model`` that are still active (:attr:`BatchStatus.is_active`)."""
        total, since = 0, time.time() - ACTIVE_WINDOW_SECONDS
        for b in self.conn.batches.list(limit=100):
            if (b.created_at or 0) < since:
                break
            meta = b.metadata or {}
            status = BatchStatus.of(b.status)
            if status and status.is_active and meta.get("model") == model and meta.get("est_prompt_tokens"):
                total += int(meta["est_prompt_tokens"])
        return total

    # -- upload once, create once -----------------------------------------------------------------
    def upload_once(self, path: str | Path, name: str, intent: Intent) -> Any:
        """Upload a shard file once per task generation; return the FileObject. The file is named
        ``<name>-<submission id>.jsonl``, so a try whose answer was lost finds it by listing."""
        saved = intent.start()
        if saved.get("file_id"):
            try:
                found = self.conn.files.retrieve(saved["file_id"])
                log.info("re-attaching to file %s uploaded by an earlier try", found.id)
                return found
            except Exception as exc:  # deleted or expired: upload again
                log.warning(
                    "file %s from an earlier try is gone (%s); uploading again", saved["file_id"], exc
                )
        filename = f"{name}-{saved['submission']}.jsonl"
        found = self._find_file(filename, saved["since"]) if intent.resumed else None
        if found is not None:
            log.info("found file %s uploaded by an earlier try", found.id)
        else:

            def call():
                with open(path, "rb") as fh:
                    return self.conn.with_options(max_retries=0).files.create(
                        file=(filename, fh), purpose="batch"
                    )

            found = with_retries(call, lambda: self._find_file(filename, saved["since"]), f"upload of {path}")
        intent.done(file_id=found.id)
        return found

    def create_once(
        self,
        intent: Intent,
        metadata: dict[str, str],
        *,
        input_file_id: str | None,
        endpoint: str,
        completion_window: str = "24h",
        requests_path: str | Path | None = None,
        requests: int | None = None,
    ) -> Any:
        """Create a batch once per task generation; return the Batch (possibly one an earlier try made).
        The submission id goes into the batch's metadata, so a try whose answer was lost finds it.
        ``requests_path`` / ``requests`` (the shard file and its request count) are for APIs without file
        upload; here the uploaded ``input_file_id`` is the batch's input."""
        create_kwargs = {"input_file_id": input_file_id, "endpoint": endpoint,
                         "completion_window": completion_window}  # fmt: skip
        saved = intent.start()
        if saved.get("batch_id"):
            batch = self.retrieve(saved["batch_id"])
            log.info("re-attaching to batch %s (%s) created by an earlier try", batch.id, batch.status)
            return batch
        found = self._find_batch(saved["submission"], saved["since"]) if intent.resumed else None
        if found is None:
            metadata = {**metadata, "submission": saved["submission"]}
            found = with_retries(
                lambda: self.conn.with_options(max_retries=0).batches.create(
                    metadata=metadata, **create_kwargs
                ),
                lambda: self._find_batch(saved["submission"], saved["since"]),
                "batch create",
            )
        else:
            log.info("found batch %s created by an earlier try", found.id)
        intent.done(batch_id=found.id)
        return found

    def _find_file(self, filename: str, since: int) -> Any:
        for f in self.conn.files.list(purpose="batch", order="desc", limit=1000):
            if (f.created_at or 0) < since:
                return None
            if f.filename == filename and f.status != "error":
                return f
        return None

    def _find_batch(self, submission: str, since: int) -> Any:
        for b in self.conn.batches.list(limit=100):
            if (b.created_at or 0) < since:
                return None
            if (b.metadata or {}).get("submission") == submission:
                return b
        return None

    # -- downloads --------------------------------------------------------------------------------
    def download_file(self, file_id: str, path: Path) -> Path:
        """Stream file ``file_id`` to ``path`` (through ``<path>.part``, never held in memory; 5xx and
        resets are retried by the client). Returns ``path``."""
        part = path.with_name(path.name + ".part")
        with self.conn.with_options(max_retries=5).files.with_streaming_response.content(file_id) as r:
            r.stream_to_file(part)
        os.replace(part, path)
        return path

    # -- models (the pre-flight check) ------------------------------------------------------------
    def retrieve_model(self, model: str, **options: Any) -> Any:
        """``GET /v1/models/{model}``; ``options`` (``max_retries``, ``timeout``) for this call only."""
        return self.conn.with_options(**options).models.retrieve(model)

    def list_models(self, limit: int | None = None, **options: Any) -> list[str]:
        """The model ids ``GET /v1/models`` lists (at most ``limit``); ``options`` as in
        :meth:`retrieve_model`."""
        return [m.id for m in islice(self.conn.with_options(**options).models.list(), limit)]


class AzureOpenAIBatchHook(OpenAIBatchHook):
    """Azure OpenAI's Batch API: the OpenAI Batch API behind Azure's URLs and auth, through the same client.

    Connection (type ``azure_openai_batch``, default ``azure_openai_default``): host = the resource's
    endpoint (``https://<resource>.openai.azure.com``; a trailing ``/openai/v1`` is fine), password = the
    API key. Extra:

    * ``api_version``: absent (default): the v1 API (``<endpoint>/openai/v1/``) through the ``OpenAI``
      client, the key sent as Microsoft's v1 examples send it (``Authorization: Bearer``); set (e.g.
      ``"2024-10-21"``): the dated API (``<endpoint>/openai/...?api-version=...``) through the
      ``AzureOpenAI`` client, the key in Azure's ``api-key`` header.
    * ``auth_type``: ``api_key`` (default) or ``entra_token``: the password is then a Microsoft Entra ID
      access token, sent as ``Authorization: Bearer`` (it expires: the connection must be kept fresh).

    The ``model`` of each request is the **deployment** name (a Global Batch deployment). Azure's model
    list shows models, not deployments, so the pre-flight model check is skipped.
    """

    default_conn_name = "azure_openai_default"
    conn_type = "azure_openai_batch"
    hook_name = "Azure OpenAI (Batch)"
    provider = "azure_openai"
    checks_model = False

    def __init__(self, conn_id: str = default_conn_name, *args: Any, **kwargs: Any) -> None:
        super().__init__(conn_id, *args, **kwargs)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"host": "Endpoint", "password": "API key (or Entra token)"},
            "placeholders": {
                "host": "https://<resource>.openai.azure.com",
                "extra": '{"api_version": "2024-10-21"} for the dated API; leave empty for the v1 API',
            },
        }

    def _client_kwargs(self, conn: Any, extras: dict[str, Any]) -> dict[str, Any]:
        return azure_client_kwargs(conn.host, conn.password, extras, self.conn_id)

    @staticmethod
    def _client_class(kwargs: dict[str, Any], asynchronous: bool = False) -> Any:
        """``AzureOpenAI`` for the dated API (settings with an ``api_version``), else ``OpenAI``."""
        from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI

        if "api_version" in kwargs:
            return AsyncAzureOpenAI if asynchronous else AzureOpenAI
        return AsyncOpenAI if asynchronous else OpenAI

    def get_conn(self) -> Any:
        conn = self.get_connection(self.conn_id)
        kwargs = self._client_kwargs(conn, conn.extra_dejson)
        return self._client_class(kwargs)(**kwargs)

    async def aget_conn(self) -> Any:
        conn = await get_async_connection(self.conn_id, hook=self)
        kwargs = self._client_kwargs(conn, await get_async_extra_dejson(conn))
        return self._client_class(kwargs, asynchronous=True)(**kwargs)


def clean_key(secret: str | None, conn_id: str) -> str:
    """The connection's key without the blanks around it (a key read from a file keeps its newline); a key
    that is empty or holds a control character is refused, naming the connection and never the key."""
    key = (secret or "").strip()
    if not key:
        raise ValueError(f"connection {conn_id!r} has no API key (the connection's password)")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"connection {conn_id!r}: the API key holds a control character; paste it again")
    return key


def azure_client_kwargs(host: str | None, secret: str | None, extras: dict[str, Any], conn_id: str) -> dict:
    """The client settings of an Azure OpenAI connection (see :class:`AzureOpenAIBatchHook`): ``OpenAI``'s
    for the v1 API, ``AzureOpenAI``'s (with ``api_version``) for the dated one."""
    if not host:
        raise ValueError(f"connection {conn_id!r}: the host must be the Azure OpenAI endpoint")
    endpoint = host.rstrip("/")
    for suffix in ("/openai/v1", "/openai"):
        if endpoint.endswith(suffix):
            endpoint = endpoint[: -len(suffix)]
            break
    secret = clean_key(secret, conn_id)
    version = extras.get("api_version") or None
    auth = extras.get("auth_type") or "api_key"
    if auth not in ("api_key", "entra_token"):
        raise ValueError(f"connection {conn_id!r}: auth_type {auth!r} is not one of 'api_key', 'entra_token'")
    kwargs: dict[str, Any] = dict(extras.get("openai_client_kwargs") or {})
    if not version:  # the v1 API: the OpenAI client, the key or token as a bearer token
        return {**kwargs, "base_url": f"{endpoint}/openai/v1", "api_key": secret}
    kwargs.update(azure_endpoint=endpoint, api_version=str(version))
    if auth == "api_key":
        kwargs["api_key"] = secret  # AzureOpenAI sends it as the api-key header
    else:
        kwargs["azure_ad_token"] = secret
    return kwargs


def batch_hook(provider: str = "openai", conn_id: str | None = None) -> BatchAPI:
    """The hook of ``provider`` (:data:`DEFAULT_CONN_IDS`) on connection ``conn_id`` (None: the provider's
    default connection)."""
    if provider not in DEFAULT_CONN_IDS:
        raise ValueError(f"provider {provider!r} is not one of {', '.join(DEFAULT_CONN_IDS)}")
    conn_id = conn_id or DEFAULT_CONN_IDS[provider]
    if provider == "anthropic":
        from openai_batch_airflow.anthropic_batches import AnthropicBatchHook

        return AnthropicBatchHook(conn_id)
    if provider == "azure_openai":
        return AzureOpenAIBatchHook(conn_id)
    return OpenAIBatchHook(conn_id)

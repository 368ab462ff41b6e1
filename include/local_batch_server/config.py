"""Configuration of the local batch server (failure injection, timings, limits, upstream).

The whole object is JSON-able. It is given at start (``--config file.json``) and can be read or
changed at run time with ``GET /_admin/config`` and ``PUT /_admin/config`` (top-level keys of the PUT
body are merged into the current config; ``PUT /_admin/config?replace=true`` replaces it, missing keys
taking their defaults).

Secrets (``api_key``, ``upstream_api_key``) are never logged and are shown as ``"***"`` by
``GET /_admin/config``; sending ``"***"`` back in a PUT keeps the current value.

Who may use ``/_admin`` is decided at start by :class:`AdminPolicy` (``admin_token``,
``allow_upstream_change``), which is not part of :class:`ServerConfig` and cannot be changed at run
time. The :data:`LOCKED_FIELDS` (where traffic goes and the keys) keep their start-up values unless
the server was started with ``allow_upstream_change``: a PUT that would change one (``?replace=true``
included) is refused with 403 and changes nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SECRET_MASK = "***"
SECRET_FIELDS = ("api_key", "upstream_api_key")
LOCKED_FIELDS = ("api_key", "upstream_base_url", "upstream_api_key")
"""Settings that redirect traffic or hold secrets: fixed at start unless ``allow_upstream_change``."""
ADMIN_TOKEN_MIN_LENGTH = 16
ADMIN_TOKEN_ENV = "LOCAL_BATCH_SERVER_ADMIN_TOKEN"

DEFAULT_TOKEN_LIMIT_MESSAGE = (
    "Enqueued token limit reached for {model} in organization org-local. "
    "Limit: 90,000 enqueued tokens. Please try submitting fewer tasks at a time."
)


EXTRA_MODELS = (
    "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "o3-mini", "text-embedding-ada-002",
    "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1",
)  # fmt: skip
"""Served besides the shipped price table's models: snapshot names, models the tests use and Claude
models (for the Anthropic Message Batches API the server also serves)."""
MAX_MODEL_NAME = 256


def default_models() -> list[str]:
    """The default ``models``: every model of the shipped price table (``batchpipe/prices.json``) plus
    :data:`EXTRA_MODELS`, in that order, without duplicates."""
    from batchpipe.estimate import load_prices

    return list(dict.fromkeys([*load_prices()["models"], *EXTRA_MODELS]))


class FailValidation(BaseModel):
    """Make new batches end ``failed`` at validation with this single error.

    ``{model}`` in ``message`` is replaced by the model of the batch's input file.
    ``times``: how many batches (created from now on) get it; ``None`` = every batch.
    The decision is taken when the batch is created.
    """

    model_config = ConfigDict(extra="forbid")

    code: str = "token_limit_exceeded"
    message: str = DEFAULT_TOKEN_LIMIT_MESSAGE
    line: int | None = None
    param: str | None = None
    times: int | None = None


class HttpFault(BaseModel):
    """The next ``times`` HTTP calls matching ``method`` and ``path`` get ``status``.

    ``method``: ``"GET"``, ``"POST"``, ... or ``"*"``. ``path``: a regex searched (``re.search``) in the
    URL path, e.g. ``"^/v1/batches/[^/]+$"``. ``times``: ``None`` = forever. The count decrements as
    the fault fires; a fault whose count reaches 0 is removed. 429 answers carry ``Retry-After: 0``;
    ``retry_after_ms`` (optional) adds a ``retry-after-ms`` header, which the openai client honours.
    ``after``: handle the call for real first, then answer with the error instead of its response
    (the "created, but the response was lost" case: a retry must not create a second batch).
    ``batch``: only calls whose path names the N-th batch created since the last reset (0-based), e.g. a
    404 for one batch of a group while the others answer.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "*"
    path: str = ".*"
    status: int = Field(default=500, ge=400, le=599)
    times: int | None = 1
    message: str | None = None
    retry_after_ms: int | None = None
    after: bool = False
    batch: int | None = Field(default=None, ge=0)


class ResultFaults(BaseModel):
    """Result files that lie, while ``request_counts`` stay true: for the next ``batches`` batches that
    finish (None = every batch), and on the first ``downloads`` downloads of each such file (None = every
    download: the file itself is broken). Lines added go at the end of the file, after the shuffle.
    """

    model_config = ConfigDict(extra="forbid")

    error_after_answer: int = Field(default=0, ge=0)
    """The first N answered requests also get an HTTP 400 line in the error file (a 400 after a 200)."""
    unknown_ids: int = Field(default=0, ge=0)
    """N retryable error lines (HTTP 500) for custom_ids that were never sent."""
    drop_lines: int = Field(default=0, ge=0)
    """N answered lines left out of the output file."""
    garbage_line: bool = False
    """A line that is not JSON (an HTML error page) in the output file."""
    truncate_last_line: bool = False
    """The output file's last line cut off in the middle (no newline)."""
    batches: int | None = None
    downloads: int | None = None


class StatusFault(BaseModel):
    """``GET /v1/batches/{id}`` answers ``status`` (e.g. one the API does not document) instead of the
    batch's real one, for the next ``times`` retrievals (None = always); the batch itself runs on."""

    model_config = ConfigDict(extra="forbid")

    status: str = "paused"
    times: int | None = 3


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- failure injection -------------------------------------------------------------------
    reject_marker: str | None = "[[reject]]"
    """A request whose body JSON text contains this string gets a 400 invalid_request error line."""
    fail_validation: FailValidation | None = None
    expire_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    expire_batches: int | None = None
    """With ``expire_fraction``: only the next N batches expire (decremented as each starts); None = all."""
    """Batch ends ``expired`` after answering floor(fraction * total) requests (first in input order)."""
    http_faults: list[HttpFault] = Field(default_factory=list)
    result_faults: ResultFaults | None = None
    status_faults: StatusFault | None = None

    # --- timings (seconds; read live, so lowering one releases a batch waiting in that phase) -----
    validating_seconds: float = Field(default=0.3, ge=0)
    in_progress_seconds: float = Field(default=0.3, ge=0)
    """Requests are answered progressively over this duration (in up to 50 steps)."""
    finalizing_seconds: float = Field(default=0.3, ge=0)
    cancelling_seconds: float = Field(default=0.2, ge=0)
    latency_seconds: float = Field(default=0.0, ge=0, le=60)
    """Every ``/v1`` call is answered this much later (calls in flight overlap, as with a real service)."""

    # --- limits -----------------------------------------------------------------------------------
    max_requests_per_file: int = Field(default=50_000, ge=1)
    max_file_bytes: int = Field(default=200_000_000, ge=1)
    """200 MB taken as 200,000,000 bytes: stricter than 200 MiB, so what passes here passes there."""
    max_metadata_pairs: int = 16

    # --- output ---------------------------------------------------------------------------------
    shuffle_seed: int = 1234
    """Seed of the (deterministic) shuffle of output and error file lines."""

    # --- models -----------------------------------------------------------------------------------
    models: list[str] | None = Field(default_factory=default_models)
    """What ``GET /v1/models`` lists and ``GET /v1/models/{model}`` knows (any other name: 404
    ``model_not_found``). ``null`` = every name is known (and the list is empty). Ignored when
    ``upstream_base_url`` is set: both calls are then forwarded to the upstream."""

    # --- upstream forwarding --------------------------------------------------------------------
    upstream_base_url: str | None = None
    """When set, each request is POSTed to ``{upstream_base_url}{url}`` (a trailing ``/v1`` on the
    base is dropped when ``url`` starts with ``/v1``)."""
    upstream_api_key: str | None = None
    upstream_timeout_seconds: float = 120.0
    upstream_concurrency: int = Field(default=4, ge=1)

    # --- auth -----------------------------------------------------------------------------------
    api_key: str | None = None
    """When set, ``/v1/*`` calls need ``Authorization: Bearer <api_key>`` (else 401); ``/v1/messages*``
    (Anthropic) calls need ``x-api-key: <api_key>`` instead; Azure-style calls (``/openai/...``) take
    ``api-key: <api_key>`` or the Bearer header."""

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not name or len(name) > MAX_MODEL_NAME or not name.isprintable():
                raise ValueError(
                    f"models: each name must be 1-{MAX_MODEL_NAME} printable characters, not {name[:40]!r}"
                )
        return list(dict.fromkeys(value))

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            if data.get(name):
                data[name] = SECRET_MASK
        return data

    def merged(self, changes: dict[str, Any], replace: bool = False) -> ServerConfig:
        changes = dict(changes)
        for name in SECRET_FIELDS:
            if changes.get(name) == SECRET_MASK:
                changes[name] = getattr(self, name)
        base = {} if replace else self.model_dump(mode="python")
        base.update(changes)
        return ServerConfig.model_validate(base)


class AdminPolicy(BaseModel):
    """Start-up-only settings guarding ``/_admin`` (from ``--admin-token`` / the
    ``LOCAL_BATCH_SERVER_ADMIN_TOKEN`` variable / the config file; never changeable at run time).

    * ``admin_token``: when set, every ``/_admin/*`` call needs ``Authorization: Bearer <admin_token>``
      (else 401). When not set, ``/_admin`` stays open only while the server has none of the
      :data:`LOCKED_FIELDS` (the plain offline test server); with any of them it is refused (403).
      The admin token is not an API key: it does not open ``/v1``, and ``api_key`` does not open ``/_admin``.
    * ``allow_upstream_change``: lets ``PUT /_admin/config`` change the :data:`LOCKED_FIELDS`;
      it requires an ``admin_token``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_token: str | None = None
    allow_upstream_change: bool = False

    @model_validator(mode="after")
    def _check(self) -> AdminPolicy:
        token = self.admin_token
        if token is not None:
            if len(token) < ADMIN_TOKEN_MIN_LENGTH:
                raise ValueError(f"the admin token must have at least {ADMIN_TOKEN_MIN_LENGTH} characters")
            if not all("!" <= ch <= "~" for ch in token):
                raise ValueError("the admin token must be printable ASCII without spaces")
        if self.allow_upstream_change and token is None:
            raise ValueError("allow_upstream_change needs an admin token (--admin-token)")
        return self

    def admin_required(self, *configs: ServerConfig) -> bool:
        """Whether ``/_admin`` is guarded: a token is set, or one of ``configs`` has a locked field set."""
        return self.admin_token is not None or any(
            getattr(cfg, name) for cfg in configs for name in LOCKED_FIELDS
        )

    def refused_changes(self, old: ServerConfig, new: ServerConfig) -> list[str]:
        """The locked fields that ``new`` would change and this policy does not allow to change."""
        if self.allow_upstream_change:
            return []
        return [name for name in LOCKED_FIELDS if getattr(old, name) != getattr(new, name)]


START_ONLY_FIELDS = tuple(AdminPolicy.model_fields)
"""The :class:`AdminPolicy` keys: accepted in the ``--config`` file, refused by ``PUT /_admin/config``."""

"""Options for building batch requests from a CSV."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .paths import clip

if TYPE_CHECKING:
    from .schema import CheckedSchema

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
#: Batch APIs the requests are written for. ``anthropic``: Message Batches request lines
#: (``{"custom_id", "params"}``); the others: OpenAI's (``{"custom_id", "method", "url", "body"}``).
PROVIDERS = ("openai", "azure_openai", "anthropic")
#: Anthropic Message Batches: requests and bytes per batch, bytes per image, the custom_id pattern.
ANTHROPIC_MAX_REQUESTS = 100_000
ANTHROPIC_MAX_BYTES = 256 * 1024 * 1024
#: Anthropic's 5 MB image limit counts the base64 text: a file of at most 3/4 of it.
ANTHROPIC_MAX_IMAGE_MB = 5.0 * 3 / 4
ANTHROPIC_MAX_IMAGE_SIDE = 8000
ANTHROPIC_CUSTOM_ID = r"^[a-zA-Z0-9_-]{1,64}$"
#: Params an Anthropic request gets from the pipeline: ``extra_body`` may not set them.
ANTHROPIC_OWNED_FIELDS = ("model", "messages", "system", "max_tokens", "stream", "output_config")
#: Params Anthropic refuses (the current API version, or inside a batch), with why: refused before upload,
#: not hours later as errored results.
ANTHROPIC_REFUSED_FIELDS = {
    **{
        k: "Anthropic's API (version 2026-10-21) no longer takes it"
        for k in ("temperature", "top_p", "top_k")
    },
    **{k: "not allowed inside an Anthropic batch" for k in ("speed", "store", "cache_hint", "context_hint")},
    **{k: "an OpenAI parameter" for k in ("response_format", "max_completion_tokens", "n", "input")},
}
IMAGE_DETAILS = ("auto", "low", "high")
MAX_REQUESTS_PER_FILE = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI: at most 200 MB per batch input file

#: Request-body fields the pipeline sets itself: ``extra_body`` may not replace them (the estimate, the
#: budget check and the report price ``model``; the prompt is each row's own), with the param to use.
OWNED_BODY_FIELDS = {
    "model": "the model param (the estimate, max_cost_usd and the report price it)",
    "messages": "the prompt_column / prompt_template and system_prompt params",
    "input": "the prompt_column / prompt_template params",
    "instructions": "the system_prompt param",
    "n": "one answer per row (n > 1 bills several answers the estimate does not count)",
    "stream": "nothing: batch requests cannot stream",
}

_INT_FIELDS = ("start_row", "end_row", "max_requests_per_batch", "max_batch_bytes", "max_tokens")
_FLOAT_FIELDS = ("temperature", "max_image_mb")
_OPTIONAL_STR_FIELDS = ("prompt_template", "system_prompt", "image_column", "id_column", "image_base_dir")
#: Request-body fields a ``response_schema`` sets, by endpoint: ``extra_body`` may not set them too.
SCHEMA_BODY_FIELDS = {"/v1/chat/completions": "response_format", "/v1/responses": "text"}


@dataclass
class BuildOptions:
    prompt_column: str = "prompt"
    prompt_template: str | None = None
    system_prompt: str | None = None
    image_column: str | None = None
    image_detail: str = "auto"
    id_column: str | None = None
    model: str = "gpt-4o"
    endpoint: str = "/v1/chat/completions"
    max_tokens: int | None = None
    temperature: float | None = None
    extra_body: dict | None = field(default=None)
    start_row: int = 0
    end_row: int | None = None
    max_requests_per_batch: int = 50_000
    max_batch_bytes: int = 199_000_000
    max_image_mb: float = 20.0
    #: Folder that relative image paths resolve against; None = the CSV's own folder.
    image_base_dir: str | None = None
    #: A JSON Schema (an object with properties) every answer must follow (strict structured outputs);
    #: each top-level property becomes a results column. None = free text.
    response_schema: dict | None = field(default=None)
    #: Put before each answer column's name (``answer_`` → ``answer_sentiment``).
    output_prefix: str = ""
    #: Send each distinct request once: a row whose request (same body, images by their bytes) repeats
    #: an earlier row's is not sent and gets that row's answer. False: every row is sent.
    dedupe: bool = True
    #: The batch API the requests are written for (:data:`PROVIDERS`).
    provider: str = "openai"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BuildOptions:
        """Build options from a dict (Airflow params, JSON). Unknown keys are ignored.

        Light coercion for values that arrive as strings from forms/CLIs: int/float fields accept
        numeric strings, ``extra_body`` accepts a JSON object string, and "" means None for the
        optional text fields and for ``end_row``/``max_tokens``/``temperature``/``extra_body``.
        """
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                continue
            if key in _OPTIONAL_STR_FIELDS and value == "":
                value = None
            elif key in _INT_FIELDS or key in _FLOAT_FIELDS:
                value = _coerce_number(key, value, float if key in _FLOAT_FIELDS else int)
            elif key in ("extra_body", "response_schema") and isinstance(value, str):
                if value.strip() == "":
                    value = None
                else:
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"option {key}: not valid JSON ({exc})") from None
            elif key == "response_schema" and value == {}:
                value = None  # an empty form field
            elif key == "output_prefix" and value is None:
                value = ""  # an empty form field
            elif key == "dedupe" and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                value = _BOOL_WORDS[value.strip().lower()]
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["extra_body"] is not None:
            d["extra_body"] = dict(d["extra_body"])
        return d

    @property
    def image_limit_mb(self) -> float:
        """``max_image_mb``, and at most what the provider takes (Anthropic: 3.75 MB files, whose base64
        text is its 5 MB)."""
        if self.provider == "anthropic":
            return min(self.max_image_mb, ANTHROPIC_MAX_IMAGE_MB)
        return self.max_image_mb

    @cached_property
    def checked_schema(self) -> CheckedSchema | None:
        """``response_schema`` checked against strict structured outputs, as it is sent (None: none);
        :class:`InputError` naming the offending place. Read once: set the options before asking."""
        if self.response_schema is None:
            return None
        from .schema import check_response_schema

        return check_response_schema(self.response_schema, "option response_schema")

    def validate(self) -> BuildOptions:
        """Raise InputError for a bad value. Returns self so calls can be chained."""

        def bad(name: str, why: str) -> InputError:
            return InputError(f"option {name}={clip(repr(getattr(self, name)), 80)}: {why}")

        if self.prompt_template is None:
            if not isinstance(self.prompt_column, str) or not self.prompt_column:
                raise bad("prompt_column", "must be a non-empty column name")
        elif not isinstance(self.prompt_template, str) or not self.prompt_template.strip():
            raise bad("prompt_template", "must be a non-empty string")
        for name in ("system_prompt", "image_column", "id_column"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise bad(name, "must be a string")
        for name in ("image_column", "id_column"):
            if getattr(self, name) == "":
                raise bad(name, "must be a column name (use None for none)")
        if self.endpoint not in ENDPOINTS:
            raise bad("endpoint", f"must be one of {', '.join(ENDPOINTS)}")
        if self.image_detail not in IMAGE_DETAILS:
            raise bad("image_detail", f"must be one of {', '.join(IMAGE_DETAILS)}")
        if self.image_column and self.endpoint == "/v1/embeddings":
            raise bad("image_column", "images cannot be sent to /v1/embeddings")
        if not isinstance(self.model, str) or not self.model.strip():
            raise bad("model", "must be a non-empty model name")
        if not _is_int(self.start_row) or self.start_row < 0:
            raise bad("start_row", "must be an integer >= 0")
        if self.end_row is not None:
            if not _is_int(self.end_row):
                raise bad("end_row", "must be an integer or None")
            if self.end_row <= self.start_row:
                raise InputError(
                    f"option end_row={self.end_row} must be greater than start_row={self.start_row} "
                    "(end_row is exclusive)"
                )
        if not _is_int(self.max_requests_per_batch) or not (
            1 <= self.max_requests_per_batch <= MAX_REQUESTS_PER_FILE
        ):
            raise bad("max_requests_per_batch", f"must be an integer in 1..{MAX_REQUESTS_PER_FILE}")
        if not _is_int(self.max_batch_bytes) or not (1 <= self.max_batch_bytes <= MAX_FILE_BYTES):
            raise bad("max_batch_bytes", f"must be an integer in 1..{MAX_FILE_BYTES}")
        if not isinstance(self.dedupe, bool):
            raise bad("dedupe", "must be true or false")
        if not _is_number(self.max_image_mb) or self.max_image_mb <= 0:
            raise bad("max_image_mb", "must be a number > 0")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if self.max_tokens is not None and self.endpoint == "/v1/responses" and self.max_tokens < 16:
            # sent as max_output_tokens, which the Responses API (CreateResponse) takes from 16 on
            raise bad("max_tokens", "must be at least 16 for /v1/responses (its max_output_tokens minimum)")
        if self.temperature is not None and (
            not _is_number(self.temperature) or not (0 <= self.temperature <= 2)
        ):
            raise bad("temperature", "must be a number in 0..2 or None")
        if self.extra_body is not None and not isinstance(self.extra_body, dict):
            raise bad("extra_body", "must be a JSON object (dict) or None")
        for key in OWNED_BODY_FIELDS:
            if self.extra_body and key in self.extra_body:
                use = OWNED_BODY_FIELDS[key]
                raise InputError(f"option extra_body may not set {key!r}: the pipeline sets it; use {use}")
        if not isinstance(self.output_prefix, str) or any(
            ord(c) < 32 or ord(c) == 127 for c in self.output_prefix
        ):
            raise bad("output_prefix", "must be text without control characters")
        if self.provider not in PROVIDERS:
            raise bad("provider", f"must be one of {', '.join(PROVIDERS)}")
        if self.provider == "anthropic":
            self._validate_anthropic(bad)
        if self.response_schema is not None:
            if self.endpoint == "/v1/embeddings":
                raise bad(
                    "response_schema", "embeddings have no answer to shape; leave it empty for /v1/embeddings"
                )
            if not isinstance(self.response_schema, dict):
                raise bad("response_schema", "must be a JSON object (a JSON Schema)")
            owned = "output_config" if self.provider == "anthropic" else SCHEMA_BODY_FIELDS[self.endpoint]
            if self.extra_body and owned in self.extra_body:
                raise InputError(
                    f"option extra_body may not set {owned!r} with a response_schema: the schema sets it"
                )
            self.checked_schema  # noqa: B018 (checked now: InputError before anything is read)
        return self

    def _validate_anthropic(self, bad: Any) -> None:
        """Anthropic Message Batches take messages only, with ``max_tokens``; API version 2026-10-21 has no
        ``temperature``; at most 100,000 requests and 256 MB per batch (images: :attr:`image_limit_mb`)."""
        if self.endpoint != "/v1/chat/completions":
            raise bad("endpoint", "Anthropic batches take messages: leave the endpoint at its default")
        if self.max_tokens is None:
            raise bad("max_tokens", "Anthropic requires max_tokens on every request: set it")
        if self.temperature is not None:
            raise bad(
                "temperature", "Anthropic's API (version 2026-10-21) takes no temperature: leave it empty"
            )
        if self.max_requests_per_batch > ANTHROPIC_MAX_REQUESTS:
            raise bad(
                "max_requests_per_batch", f"Anthropic takes at most {ANTHROPIC_MAX_REQUESTS:,} per batch"
            )
        if self.max_batch_bytes > ANTHROPIC_MAX_BYTES:
            raise bad("max_batch_bytes", f"Anthropic takes at most {ANTHROPIC_MAX_BYTES:,} bytes per batch")
        for key in ANTHROPIC_OWNED_FIELDS:
            if self.extra_body and key in self.extra_body:
                raise InputError(f"option extra_body may not set {key!r}: the pipeline sets it")
        for key, why in ANTHROPIC_REFUSED_FIELDS.items():
            if self.extra_body and key in self.extra_body:
                raise InputError(f"option extra_body may not set {key!r} for Anthropic: {why}")


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce_number(name: str, value: Any, kind: type) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "" and name in ("end_row", "max_tokens", "temperature"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise InputError(f"option {name}={clip(repr(value), 80)}: not a number") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value

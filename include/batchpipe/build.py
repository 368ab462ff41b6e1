"""Validate a CSV of prompts and turn it into Batch API JSONL shards.

Public API (called by the Airflow DAG):

* ``validate_csv(csv_path, opts) -> dict`` — a small JSON-able summary; raises ``InputError`` for
  fatal problems, counts and lists row-level problems.
* ``build_jsonl(csv_path, opts, work_dir) -> dict`` — writes ``shard-00000.jsonl``..., ``invalid.jsonl``
  and ``build_manifest.json`` into ``work_dir``; returns a small dict for XCom.

Both take ``allowed_roots=`` (keyword only): a list of folders the CSV and image files must resolve
into, None for no restriction, or by default ``OPENAI_BATCH_ALLOWED_ROOTS`` read at call time (see
``paths``). A CSV outside is a fatal ``InputError``; an image outside makes only its row invalid.

Both also take ``url_fs=``: how to read images in object storage (``s3://...`` cells, or relative
cells when ``image_base_dir`` is such a URL); see :mod:`batchpipe.images`. None: such rows are invalid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, TypeVar

from . import csvio, paths
from .errors import InputError, RowError
from .images import (
    UrlFs,
    check_image_cell,
    data_url_size,
    encoded_size_hint,
    image_url_for_cell,
    is_store_url,
)
from .options import ANTHROPIC_CUSTOM_ID, BuildOptions
from .schema import SCHEMA_NAME, check_columns

T = TypeVar("T")

OUTPUT_COLUMNS = ("response", "error", "answered_from", "prompt_tokens", "completion_tokens", "total_tokens")
MAX_CUSTOM_ID_LEN = 512
MAX_EXAMPLES = 10
MANIFEST_NAME = "build_manifest.json"
DUPLICATES_NAME = "duplicates.jsonl"
CACHED_NAME = "cached.jsonl"
INVALID_NAME = "invalid.jsonl"
SHARD_GLOB = "shard-*.jsonl"
MANIFEST_VERSION = 1
IMAGE_WORKERS = min(8, max(4, os.cpu_count() or 1))  # threads reading + base64-encoding images
IMAGE_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # bound on encoded image data read ahead of the writer


def dumps_line(obj: Any) -> str:
    """Compact JSON for one JSONL line; non-ASCII text is kept as is (not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class RowDigest:
    """A SHA-256 over the selected rows' cells, taken while they stream by (:meth:`rows`).

    The build records it and the merge checks it: answers are joined by row position (or id), so a CSV
    whose rows were swapped, edited or replaced since the build (same size, same row count) must fail the
    merge instead of putting answers on the wrong rows.

    Each row goes in as its cells joined by US (``\\x1f``) and ended by RS (``\\x1e``); a row whose cells
    themselves hold US, RS or GS (``\\x1d``) goes in as GS + its JSON (which escapes every control
    character) instead. So the stream reads back one way only: moving a separator between cells or rows
    changes the digest.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def rows(self, stream: Iterator[tuple[int, Any, list[str]]]) -> Iterator[tuple[int, Any, list[str]]]:
        update = self._h.update
        for item in stream:
            cells = item[2]
            text = "\x1f".join(cells)
            if text.count("\x1f") != len(cells) - 1 or "\x1e" in text or "\x1d" in text:
                text = "\x1d" + json.dumps(cells)
            update(text.encode("utf-8", "surrogatepass") + b"\x1e")
            yield item

    def add_rows(self, rows: list[list[str]]) -> None:
        """Take a list of rows at once: the same digest as :meth:`rows` gives for them, one update when
        no cell holds a separator (each row's text has exactly its joins' US characters, the whole
        exactly its joins' RS characters, and no GS), else row by row."""
        if not rows:
            return
        text = "\x1e".join(["\x1f".join(cells) for cells in rows])
        joins = sum(map(len, rows)) - len(rows)
        if text.count("\x1f") == joins and text.count("\x1e") == len(rows) - 1 and "\x1d" not in text:
            self._h.update(text.encode("utf-8", "surrogatepass") + b"\x1e")
            return
        for _ in self.rows((0, None, cells) for cells in rows):
            pass

    def add_table(self, table: Any) -> None:
        """Take a pyarrow Table of string columns (the cells of consecutive rows): the same digest as
        :meth:`add_rows` gives for those rows, computed on Arrow's UTF-8 buffers."""
        import numpy as np
        import pyarrow.compute as pc

        if not table.num_rows:
            return
        columns = [column.combine_chunks() for column in table.columns]
        cells = pc.binary_join_element_wise(*columns, "\x1f") if len(columns) > 1 else columns[0]
        lines = pc.binary_join_element_wise(cells, "", "\x1e")  # each row's text + RS
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
        data = memoryview(lines.buffers()[2])[
            int(offsets[lines.offset]) : int(offsets[lines.offset + len(lines)])
        ]
        raw = data.tobytes()
        n = table.num_rows
        if raw.count(b"\x1f") == n * (len(columns) - 1) and raw.count(b"\x1e") == n and b"\x1d" not in raw:
            self._h.update(raw)
            return
        self.add_rows([list(row) for row in zip(*(c.to_pylist() for c in columns), strict=True)])

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# --------------------------------------------------------------------------- prompt templates


class PromptTemplate:
    """``{column}`` placeholders; ``{{`` and ``}}`` are literal braces. Values are inserted verbatim."""

    _TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

    def __init__(self, template: str):
        self.template = template
        self.parts: list[tuple[bool, str]] = []  # (is_field, text)
        literal: list[str] = []
        pos = 0
        for m in self._TOKEN.finditer(template):
            literal.append(template[pos : m.start()])
            pos = m.end()
            tok = m.group(0)
            if tok == "{{":
                literal.append("{")
            elif tok == "}}":
                literal.append("}")
            elif m.group(1) is not None:
                if m.group(1) == "":
                    raise InputError(
                        f"option prompt_template: empty placeholder '{{}}' at position {m.start()} "
                        "(write '{{}}' for literal braces)"
                    )
                self.parts.append((False, "".join(literal)))
                literal = []
                self.parts.append((True, m.group(1)))
            else:
                raise InputError(
                    f"option prompt_template: unmatched {tok!r} at position {m.start()} "
                    f"(write '{tok}{tok}' for a literal brace)"
                )
        literal.append(template[pos:])
        self.parts.append((False, "".join(literal)))
        self.fields = [text for is_field, text in self.parts if is_field]

    def render(self, row: dict[str, str]) -> str:
        return "".join(row[text] if is_field else text for is_field, text in self.parts)

    def compile(self, header: list[str]) -> Callable[[list[str]], str]:
        """A renderer for rows given as lists in ``header`` order (same result as :meth:`render`)."""
        pos = {name: i for i, name in enumerate(header)}
        parts = [(pos[text], "") if is_field else (-1, text) for is_field, text in self.parts]

        def render_list(row: list[str]) -> str:
            return "".join(row[i] if i >= 0 else text for i, text in parts)

        return render_list


# --------------------------------------------------------------------------- request bodies


def uses_max_completion_tokens(model: str) -> bool:
    """Reasoning models (o1/o3/o4*, gpt-5*) take ``max_completion_tokens`` instead of ``max_tokens``."""
    m = model.strip().lower()
    if m.startswith("ft:"):
        m = m[3:]
    return bool(re.match(r"o\d", m)) or m.startswith("gpt-5")


def make_body(opts: BuildOptions, prompt: str, image_url: str | None) -> dict[str, Any]:
    """The request body for one prompt (and optional image URL) for ``opts.endpoint``."""
    if opts.endpoint == "/v1/embeddings":
        body: dict[str, Any] = {"model": opts.model, "input": prompt}
    elif opts.endpoint == "/v1/responses":
        if image_url is None:
            content: Any = prompt
        else:
            content = [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": prompt},
                        {"type": "input_image", "image_url": image_url, "detail": opts.image_detail},
                    ],
                }
            ]
        body = {"model": opts.model, "input": content}
        if opts.system_prompt is not None:
            body["instructions"] = opts.system_prompt
        if opts.max_tokens is not None:
            body["max_output_tokens"] = opts.max_tokens
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
    else:  # /v1/chat/completions
        messages: list[dict[str, Any]] = []
        if opts.system_prompt is not None:
            messages.append({"role": "system", "content": opts.system_prompt})
        if image_url is None:
            messages.append({"role": "user", "content": prompt})
        else:
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": image_url, "detail": opts.image_detail}},
                    ],
                }
            )
        body = {"model": opts.model, "messages": messages}
        if opts.max_tokens is not None:
            key = "max_completion_tokens" if uses_max_completion_tokens(opts.model) else "max_tokens"
            body[key] = opts.max_tokens
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
    checked = opts.checked_schema if opts.response_schema is not None else None
    if checked is not None and opts.endpoint == "/v1/responses":
        body["text"] = {
            "format": {"type": "json_schema", "name": SCHEMA_NAME, "strict": True, "schema": checked.schema}
        }
    elif checked is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": checked.schema},
        }
    if opts.extra_body:
        body.update(opts.extra_body)
    return body


_ANTHROPIC_ID = re.compile(ANTHROPIC_CUSTOM_ID.strip("^$"))
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,([A-Za-z0-9+/]*={0,2})", re.I)
#: The image types Anthropic takes (the images the build reads are these already: sniffed by content).
ANTHROPIC_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def anthropic_params(opts: BuildOptions, prompt: str, image_url: str | None) -> dict[str, Any]:
    """The ``params`` of an Anthropic Message Batches request for one prompt (and optional image): the
    system prompt top-level, the image as a base64 ``image`` block (a URL as a ``url`` source) before the
    text, ``max_tokens`` (required there), a ``response_schema`` as ``output_config`` JSON schema."""
    if image_url is None:
        content: Any = prompt
    else:
        source = _anthropic_source(image_url, opts.image_column)
        content = [{"type": "image", "source": source}, {"type": "text", "text": prompt}]
    params: dict[str, Any] = {"model": opts.model, "max_tokens": opts.max_tokens}
    if opts.system_prompt is not None:
        params["system"] = opts.system_prompt
    params["messages"] = [{"role": "user", "content": content}]
    checked = opts.checked_schema if opts.response_schema is not None else None
    if checked is not None:
        params["output_config"] = {"format": {"type": "json_schema", "schema": checked.schema}}
    if opts.extra_body:
        params.update(opts.extra_body)
    return params


def _anthropic_source(image_url: str, column: str | None) -> dict[str, Any]:
    """The ``source`` of an Anthropic image block: an http(s) URL as it is; a data URL as base64 of a JPEG,
    PNG, GIF or WebP (its type read from its bytes), of at most 8,000 px a side and 5 MB of base64; any
    other image (a data URL that does not say what it holds) makes the row invalid, naming why."""
    from .images import sniff_mime
    from .options import ANTHROPIC_MAX_IMAGE_SIDE
    from .tokens import image_size_from_data_url

    if image_url[:8].lower().startswith(("http://", "https://")):
        return {"type": "url", "url": image_url}
    found = _DATA_URL.fullmatch(image_url)
    if found is None:
        raise RowError("Anthropic takes an image as a file, an http(s) URL or data:image/…;base64,…", column)
    data = found[2]
    if len(data) > 5 * 1024 * 1024:
        raise RowError(f"the image is {len(data):,} bytes of base64, Anthropic takes at most 5 MB", column)
    try:
        head = base64.b64decode(data[:16], validate=True)
    except (ValueError, binascii.Error):
        raise RowError("the image's base64 cannot be read", column) from None
    kind = sniff_mime(head)
    if kind not in ANTHROPIC_IMAGE_TYPES:
        raise RowError("Anthropic takes JPEG, PNG, GIF or WebP images (read from the bytes)", column)
    size = image_size_from_data_url(f"data:{kind};base64,{data}")
    if size is None or min(size) < 1:
        raise RowError("the image cannot be read (its header is damaged or it has no size)", column)
    if max(size) > ANTHROPIC_MAX_IMAGE_SIDE:
        raise RowError(f"the image is {size[0]}x{size[1]} px, Anthropic takes at most "
                       f"{ANTHROPIC_MAX_IMAGE_SIDE} px a side", column)  # fmt: skip
    return {"type": "base64", "media_type": kind, "data": data}


def make_request(opts: BuildOptions, custom_id: str, prompt: str, image_url: str | None) -> dict[str, Any]:
    """One request line's object: OpenAI's (and Azure's) ``{"custom_id", "method", "url", "body"}``, or
    Anthropic's ``{"custom_id", "params"}``; the custom_id always first (:func:`batchpipe.cache.request_key`
    reads what follows it)."""
    if opts.provider == "anthropic":
        return {"custom_id": custom_id, "params": anthropic_params(opts, prompt, image_url)}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": opts.endpoint,
        "body": make_body(opts, prompt, image_url),
    }


# --------------------------------------------------------------------------- per-file plan


@dataclass
class _Plan:
    path: str
    opts: BuildOptions
    header: list[str]
    template: PromptTemplate | None
    base_dir: Path | str
    roots: list[Path] | None = None
    url_fs: UrlFs | None = None

    def custom_id(self, index: int, row: dict[str, str]) -> str:
        if self.opts.id_column:
            return row[self.opts.id_column]
        return f"row-{index}"

    def check_id(self, row: dict[str, str]) -> None:
        if not self.opts.id_column:
            return
        _check_id_value(row[self.opts.id_column], self.opts.id_column, self.opts.provider)

    def prompt(self, row: dict[str, str]) -> str:
        if self.template is not None:
            text = self.template.render(row)
            column = None
        else:
            text = row[self.opts.prompt_column]
            column = self.opts.prompt_column
        if text.strip() == "":
            raise RowError("empty prompt", column)
        return text

    def image_url(self, row: dict[str, str], encode: bool) -> str | None:
        col = self.opts.image_column
        if not col:
            return None
        try:
            if encode:
                return image_url_for_cell(
                    row[col], self.base_dir, self.opts.image_limit_mb, self.roots, self.url_fs
                )
            check_image_cell(row[col], self.base_dir, self.opts.image_limit_mb, self.roots, self.url_fs)
            return None
        except RowError as exc:
            exc.column = col
            raise


def _prepare(
    csv_path: str | os.PathLike, opts: BuildOptions, allowed_roots: Any, url_fs: UrlFs | None = None
) -> _Plan:
    if not isinstance(opts, BuildOptions):
        opts = BuildOptions.from_dict(opts)
    opts.validate()
    path = str(csv_path)
    roots = paths.roots_or_env(allowed_roots)
    paths.check_input_csv(path, roots)  # before anything is read
    header = csvio.read_header(path)
    cols = csvio.column_list(header)

    def missing(column: str) -> InputError:
        return InputError(f"{path}: column {csvio.quote_value(column)} not found (columns: {cols})")

    template = None
    if opts.prompt_template is not None:
        template = PromptTemplate(opts.prompt_template)
        for name in template.fields:
            if name not in header:
                raise InputError(
                    f"{path}: prompt_template placeholder {{{paths.clip(name, 40)}}} is not a column "
                    f"(columns: {cols})"
                )
    elif opts.prompt_column not in header:
        raise missing(opts.prompt_column)
    for column in (opts.image_column, opts.id_column):
        if column and column not in header:
            raise missing(column)
    clashes = [c for c in OUTPUT_COLUMNS if c in header]
    if clashes:
        raise InputError(
            f"{path}: the input already has column(s) {', '.join(repr(c) for c in clashes)}, which the "
            f"merged results add (output columns: {', '.join(OUTPUT_COLUMNS)}); rename them first"
        )
    if opts.checked_schema is not None:
        check_columns(
            opts.checked_schema, header, OUTPUT_COLUMNS, opts.output_prefix, f"{path}: response_schema"
        )
    if is_store_url(opts.image_base_dir):
        base_dir: Path | str = opts.image_base_dir.rstrip("/")
    else:
        base_dir = Path(opts.image_base_dir or Path(path).parent).expanduser().resolve()
    return _Plan(path, opts, header, template, base_dir, roots, url_fs)


class _IdTracker:
    def __init__(self, plan: _Plan):
        self.plan = plan
        self.seen: dict[str, int] = {}  # id -> first data row (its line is looked up only for a message)

    def add(self, index: int, row: dict[str, str], line: int | None = None) -> None:
        col = self.plan.opts.id_column
        if not col:
            return
        value = row[col]
        if value.strip() == "":
            return
        first = self.seen.setdefault(value, index)
        if first != index:
            self.duplicate(value, first, index, line)

    def duplicate(self, value: str, first: int, index: int, line: int | None) -> None:
        path = self.plan.path
        raise InputError(
            f"{path}: column {self.plan.opts.id_column!r}: duplicate id {csvio.quote_value(value)} in "
            f"{csvio.row_label(first, csvio.line_of_row(path, first))} and {csvio.row_label(index, line)} "
            "(ids must be unique)"
        )


def _example(index: int, exc: RowError, line: int | None) -> dict[str, Any]:
    """A row problem as validate/build report it: ``row`` 0-based, ``line`` its first physical line."""
    return {"row": index, "line": line, "column": exc.column, "error": exc.message}


def describe_problem(example: dict[str, Any]) -> str:
    """One ``first_invalid`` entry as a message line: ``data row 7 (0-based; line 9 of the file)
    [prompt]: empty prompt``."""
    column = f" [{example['column']}]" if example.get("column") else ""
    return f"{csvio.row_label(example['row'], example.get('line'))}{column}: {example['error']}"


# --------------------------------------------------------------------------- validate


def validate_csv(
    csv_path: str | os.PathLike,
    opts: BuildOptions,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
    url_fs: UrlFs | None = None,
) -> dict[str, Any]:
    """Check the CSV and options without writing anything.

    Fatal problems raise InputError; row-level problems are counted. Images are checked cheaply (exists,
    size, magic bytes) but not encoded. ``allowed_roots``: folders the CSV and image files must be in
    (None: anywhere; default: ``OPENAI_BATCH_ALLOWED_ROOTS``, read now). Returns ``{"file", "columns",
    "rows_in_file", "rows_selected", "valid", "invalid", "first_invalid": [{"row", "line", "column",
    "error"}, ... up to 10], "answer_columns", "schema_notes"}`` (``row`` 0-based, ``line`` the row's first
    physical line of the file; ``answer_columns``: the columns a ``response_schema`` adds, ``schema_notes``:
    what was added to it, e.g. ``additionalProperties: false``).
    """
    plan = _prepare(csv_path, opts, allowed_roots, url_fs)
    o = plan.opts
    ids = _IdTracker(plan)
    rows_in_file = selected = valid = invalid = 0
    examples: list[dict[str, Any]] = []
    for index, header, cells, line in csvio._iter_lists(plan.path, with_lines=True):  # checked by _prepare
        rows_in_file += 1
        if index < o.start_row or (o.end_row is not None and index >= o.end_row):
            continue
        selected += 1
        row = dict(zip(header, cells, strict=True))
        ids.add(index, row, line)
        try:
            plan.check_id(row)
            plan.prompt(row)
            plan.image_url(row, encode=False)
        except RowError as exc:
            invalid += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(_example(index, exc, line))
            continue
        valid += 1
    if selected == 0:
        raise csvio.no_rows_error(plan.path, o.start_row, o.end_row, rows_in_file)
    checked = o.checked_schema
    return {
        "file": plan.path,
        "columns": plan.header,
        "rows_in_file": rows_in_file,
        "rows_selected": selected,
        "valid": valid,
        "invalid": invalid,
        "first_invalid": examples,
        "answer_columns": checked.columns(o.output_prefix) if checked else [],
        "schema_notes": list(checked.notes) if checked else [],
    }


# --------------------------------------------------------------------------- build


class _ShardWriter:
    """Streams request lines into shard files, cutting by request count and byte size."""

    def __init__(self, work_dir: Path, max_requests: int, max_bytes: int):
        self.work_dir = work_dir
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._fh = None
        self._cur: dict[str, Any] | None = None
        self._n = 0  # requests in the current shard
        self._b = 0  # bytes in the current shard
        self._last = -1

    def add(self, line: bytes, row_index: int) -> None:
        size = len(line)
        if self._cur is not None and (self._n >= self.max_requests or self._b + size > self.max_bytes):
            self._close_current()
        if self._cur is None:
            index = len(self.shards)
            path = self.work_dir / f"shard-{index:05d}.jsonl"
            self._cur = {"index": index, "path": str(path), "requests": 0, "bytes": 0, "first_row": row_index}
            self._n = self._b = 0
            self._fh = open(str(path) + ".tmp", "wb", buffering=1024 * 1024)
        self._fh.write(line)
        self._n += 1
        self._b += size
        self._last = row_index

    def _close_current(self) -> None:
        if self._cur is None:
            return
        self._fh.close()
        cur = self._cur
        cur["requests"] = self._n
        cur["bytes"] = self._b
        cur["last_row"] = self._last
        os.replace(cur["path"] + ".tmp", cur["path"])
        self.shards.append(cur)
        self._cur = None
        self._fh = None

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            Path(self._cur["path"] + ".tmp").unlink(missing_ok=True)


_CID_MARK = "\x00batchpipe-custom-id\x00"
_PROMPT_MARK = "\x00batchpipe-prompt\x00"


def _line_template(o: BuildOptions) -> tuple[str, str, str] | None:
    """The request line of a text-only row, pre-serialised around its two variable strings.

    Returns ``(head, middle, tail)`` such that ``head + json(custom_id) + middle + json(prompt) + tail``
    is exactly ``dumps_line(request) + "\n"``; None when the prompt does not appear exactly once in the
    body (e.g. ``extra_body`` replaces the messages), in which case the generic path is used.
    """
    text = dumps_line(make_request(o, _CID_MARK, _PROMPT_MARK, None)) + "\n"
    cid, prompt = encode_basestring(_CID_MARK), encode_basestring(_PROMPT_MARK)
    if text.count(cid) != 1 or text.count(prompt) != 1:
        return None
    head, rest = text.split(cid)
    if prompt not in rest:
        return None
    middle, tail = rest.split(prompt)
    return head, middle, tail


def _request_line(o: BuildOptions, custom_id: str, prompt: str, image_url: str | None) -> bytes:
    return (dumps_line(make_request(o, custom_id, prompt, image_url)) + "\n").encode("utf-8")


def _too_big(line: bytes, max_bytes: int) -> RowError:
    return RowError(f"request is {len(line)} bytes, larger than max_batch_bytes={max_bytes}")


def _check_id_value(value: str, column: str, provider: str = "openai") -> None:
    if value.strip() == "":
        raise RowError("empty id", column)
    if len(value) > MAX_CUSTOM_ID_LEN:
        raise RowError(f"id is {len(value)} characters, at most {MAX_CUSTOM_ID_LEN} allowed", column)
    if provider == "anthropic" and not _ANTHROPIC_ID.fullmatch(value):
        raise RowError(
            f"id {paths.clip(value, 40)!r} is not one Anthropic takes (1 to 64 letters, digits, _ or -); "
            "leave id_column empty to use row numbers",
            column,
        )


def _encode_ordered(
    items: Iterator[tuple[int, str, str | None, RowError | None, str]],
    plan: _Plan,
    workers: int | None = None,
    max_bytes_in_flight: int | None = None,
) -> Iterator[tuple[int, str, str | None, RowError | None, str | None]]:
    """Image URLs of ``(index, custom_id, prompt, error, image_cell)`` items, encoded by a thread pool.

    Yields ``(index, custom_id, prompt, error, image_url)`` in input order. Rows that already have an
    ``error`` are not encoded; an encoding ``RowError`` (with the image column set) becomes the row's
    error. At most ``max_bytes_in_flight`` bytes of (estimated) encoded image data are pending, plus
    one image, so memory stays bounded whatever the input size. An image in object storage is not
    stat'ed first (that would cost a request): it counts as the largest allowed image, and the bound
    grows to one such image per worker so that the pool still reads in parallel.
    """
    workers = workers or IMAGE_WORKERS
    if max_bytes_in_flight is None:
        max_bytes_in_flight = IMAGE_BYTES_IN_FLIGHT
    o = plan.opts
    col = o.image_column
    base_dir, max_mb, roots, url_fs = plan.base_dir, o.image_limit_mb, plan.roots, plan.url_fs
    largest = data_url_size(int((max_mb or 20) * 1024 * 1024))

    def hint(cell: str) -> int:
        nonlocal max_bytes_in_flight
        size = encoded_size_hint(cell, base_dir)
        if size is None:  # in object storage
            max_bytes_in_flight = max(max_bytes_in_flight, workers * largest)
            return largest
        return size

    def encode(cell: str) -> str | None:
        try:
            return image_url_for_cell(cell, base_dir, max_mb, roots, url_fs)
        except RowError as exc:
            exc.column = col
            raise

    pending: deque[tuple[int, str, str | None, RowError | None, Future | None, int]] = deque()
    in_flight = 0

    def pop() -> tuple[int, str, str | None, RowError | None, str | None]:
        nonlocal in_flight
        index, cid, prompt, err, fut, size = pending.popleft()
        in_flight -= size
        url = None
        if fut is not None:
            try:
                url = fut.result()
            except RowError as exc:
                err = exc
        return index, cid, prompt, err, url

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchpipe-img")
    try:
        for index, cid, prompt, err, cell in items:
            fut, size = None, 0
            if err is None:
                size = hint(cell)
                while pending and (in_flight + size > max_bytes_in_flight or len(pending) >= 4096):
                    yield pop()
                fut = pool.submit(encode, cell)
                in_flight += size
            pending.append((index, cid, prompt, err, fut, size))
            while pending and pending[0][4] is not None and pending[0][4].done():
                yield pop()
            while pending and pending[0][4] is None:
                yield pop()
        while pending:
            yield pop()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: Every file the pipeline writes into a work folder (shards, follow-up shards, downloaded result files,
#: invalid rows, the build manifest, and their temporary names while being written).
_WORK_FILE = re.compile(
    r"\.?(shard-\d{5}[^/\\]*\.jsonl|invalid\.jsonl|duplicates\.jsonl|cached\.jsonl|build_manifest\.json|keys\.sqlite)"
    r"(\.(tmp|part)(-\d+)?)?"
)


def is_work_file(name: str) -> bool:
    """Whether a file called ``name`` in a work folder (or its ``results/``) is one the pipeline wrote
    there. Clean-up removes only these, so a work folder that is (or holds) the run folder never loses
    ``results.csv``, ``report.*`` or ``estimate.*``."""
    return bool(_WORK_FILE.fullmatch(name))


#: Mapped task instances a run uses at most for its shards (Airflow refuses to map over more than
#: ``[core] max_map_length`` values, 1,024 by default): more shards than this are grouped.
SHARD_GROUPS = 64


def group_shards(shards: Sequence[T], groups: int = SHARD_GROUPS) -> list[list[T]]:
    """``shards`` in at most ``groups`` contiguous groups, in order, whose sizes differ by at most one: one
    shard per group while there are no more shards than groups (``groups`` at least 1)."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    count = min(len(shards), groups)
    if count == 0:
        return []
    size, extra = divmod(len(shards), count)
    out, start = [], 0
    for g in range(count):
        end = start + size + (1 if g < extra else 0)
        out.append(list(shards[start:end]))
        start = end
    return out


def _clean_work_dir(work_dir: Path) -> None:
    """Remove outputs of an earlier build so stale shards are never picked up."""
    for p in list(work_dir.glob(SHARD_GLOB)) + list(work_dir.glob(SHARD_GLOB + ".tmp")):
        p.unlink()
    for name in (INVALID_NAME, MANIFEST_NAME, DUPLICATES_NAME, CACHED_NAME):
        (work_dir / name).unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _SendOnce:
    """Each distinct request sent once, and none whose answer is kept in the cache.

    With ``dedupe``, a request line whose key (:func:`batchpipe.cache.request_key`) was seen on an earlier
    row is not written; the row is recorded in ``duplicates.jsonl`` (written only when a row repeats) as
    answered by that row (``{"row", "custom_id", "of_row", "of"}``). Keys live in a SQLite file in the
    work folder (indexed by their first 8 bytes, the whole key compared) and are looked up a block of
    lines at a time, so memory stays flat; lines keep their order.

    With a ``cache``, a (first) request whose key is kept there is not written either: ``cached.jsonl``
    (written only when some are) gives the row its kept result line (:func:`batchpipe.cache.cached_record`).
    """

    BLOCK_LINES = 2000
    BLOCK_BYTES = 16 << 20

    def __init__(
        self, work_dir: Path, write: Callable[[bytes, int], None], dedupe: bool = True, cache: Any = None
    ) -> None:
        from .cache import cached_record, is_answer_line, request_digest
        from .sql import select_in

        self.digest, self.select_in, self.record = request_digest, select_in, cached_record
        self.usable = is_answer_line  # an entry that is not one whole answer line is a miss
        self.write = write
        self.dedupe, self.cache = dedupe, cache
        self.db_path = work_dir / ".keys.sqlite"
        self.db_path.unlink(missing_ok=True)
        self.db = sqlite3.connect(self.db_path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE keys (k INTEGER PRIMARY KEY, key BLOB, row INTEGER, cid TEXT)")
        self.out_path = work_dir / DUPLICATES_NAME
        self.out = open(str(self.out_path) + ".tmp", "w", encoding="utf-8", newline="\n")
        self.cached_path = work_dir / CACHED_NAME
        self.cached_out = open(str(self.cached_path) + ".tmp", "wb")
        self.block: list[tuple[bytes, bytes, int, str]] = []
        self.held = 0
        self.duplicates = 0
        self.cached = 0

    def add(self, line: bytes, index: int, custom_id: str) -> None:
        self.block.append((self.digest(line), line, index, custom_id))
        self.held += len(line)
        if len(self.block) >= self.BLOCK_LINES or self.held >= self.BLOCK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.block:
            return
        first: dict[bytes, tuple[int, str]] = {}
        taken: set[int] = set()  # short keys in the table (a different key with the same 8 bytes: sent)
        if self.dedupe:
            short = list({int.from_bytes(key[:8], "big", signed=True) for key, *_ in self.block})
            for small, key, row, cid in self.select_in(
                self.db, "SELECT k, key, row, cid FROM keys WHERE k IN ({marks})", short
            ):
                taken.add(small)
                first[key] = (row, cid)
        kept: dict[str, bytes] = {}
        if self.cache is not None:
            kept = self.cache.get_many({key.hex() for key, *_ in self.block if key not in first})
        new = []
        for key, line, index, custom_id in self.block:
            seen = first.get(key) if self.dedupe else None
            if seen is None:
                if self.dedupe:
                    small = int.from_bytes(key[:8], "big", signed=True)
                    if small not in taken:
                        taken.add(small)
                        first[key] = (index, custom_id)
                        new.append((small, key, index, custom_id))
                answer = kept.get(key.hex()) if kept else None
                if answer is not None and self.usable(answer):
                    self.cached += 1
                    self.cached_out.write(self.record(index, custom_id, answer))
                else:
                    self.write(line, index)
            else:
                self.duplicates += 1
                rec = {"row": index, "custom_id": custom_id, "of_row": seen[0], "of": seen[1]}
                self.out.write(dumps_line(rec) + "\n")
        if new:
            new.sort()  # in key order: neighbouring pages of the table
            self.db.executemany("INSERT INTO keys VALUES (?,?,?,?)", new)
        self.block, self.held = [], 0

    def close(self) -> None:
        self.flush()
        self.out.close()
        self.cached_out.close()
        self.db.close()
        self.db_path.unlink(missing_ok=True)
        for count, path in ((self.duplicates, self.out_path), (self.cached, self.cached_path)):
            if count:
                os.replace(str(path) + ".tmp", path)
            else:  # none: no file
                Path(str(path) + ".tmp").unlink()

    def abort(self) -> None:
        self.out.close()
        self.cached_out.close()
        self.db.close()
        self.db_path.unlink(missing_ok=True)
        for path in (self.out_path, self.cached_path):
            Path(str(path) + ".tmp").unlink(missing_ok=True)


def build_jsonl(
    csv_path: str | os.PathLike,
    opts: BuildOptions,
    work_dir: str | os.PathLike,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
    url_fs: UrlFs | None = None,
    cache: Any = None,
) -> dict[str, Any]:
    """Write the request shards, ``invalid.jsonl`` and ``build_manifest.json`` into ``work_dir``.

    ``allowed_roots`` as for :func:`validate_csv`. ``work_dir`` is not checked against any root.

    Returns a small dict: ``{"csv", "work_dir", "manifest", "rows", "valid", "invalid", "invalid_path",
    "first_invalid", "duplicates", "shards": [{"index", "path", "requests", "bytes", "first_row",
    "last_row"}]}``. ``shards`` is ``[]`` when no row has a request to send (none valid, or every
    one answered by the cache or an earlier row).

    With ``opts.dedupe`` (the default) a valid row whose request repeats an earlier row's exactly (same
    body; images by their bytes) is not written: ``duplicates.jsonl`` names the row it is answered by
    (``duplicates`` counts them; ``valid`` counts them too, as rows with a request).

    ``cache``: an answer cache (:class:`batchpipe.cache.AnswerCache` or :class:`~batchpipe.cache.
    ObjectAnswerCache`) looked up before a request is written: a row whose request is kept there is not
    sent, ``cached.jsonl`` gives it the kept answer (``cached`` counts them; in ``refresh`` mode the cache
    finds nothing).
    """
    plan = _prepare(csv_path, opts, allowed_roots, url_fs)
    o = plan.opts
    wd = Path(work_dir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    _clean_work_dir(wd)

    ids = _IdTracker(plan)
    writer = _ShardWriter(wd, o.max_requests_per_batch, o.max_batch_bytes)
    once = _SendOnce(wd, writer.add, o.dedupe, cache) if o.dedupe or cache is not None else None
    if once is not None:
        send = once.add
    else:

        def send(line: bytes, index: int, custom_id: str) -> None:
            writer.add(line, index)

    invalid_path = wd / INVALID_NAME
    rows = valid = invalid = 0
    examples: list[dict[str, Any]] = []

    header = plan.header
    id_col = o.id_column
    id_i = header.index(id_col) if id_col else -1
    seen = ids.seen
    path = plan.path
    if plan.template is not None:
        render: Callable[[list[str]], str] | None = plan.template.compile(header)
        prompt_col, prompt_i = None, -1
    else:
        render, prompt_col, prompt_i = None, o.prompt_column, header.index(o.prompt_column)
    image_i = header.index(o.image_column) if o.image_column else -1
    max_bytes = o.max_batch_bytes
    template = _line_template(o)
    digest = RowDigest()
    stream = digest.rows(csvio._iter_lists(path, o.start_row, o.end_row, with_lines=True))
    images = None
    lines: dict[int, int] = {}  # first physical line of the rows waiting for their image

    def fail(inv, index: int, custom_id: str, exc: RowError, line: int) -> None:
        nonlocal invalid
        invalid += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(_example(index, exc, line))
        rec = {
            "row": index,
            "line": line,
            "custom_id": custom_id or f"row-{index}",
            "column": exc.column,
            "error": exc.message,
        }
        inv.write(dumps_line(rec) + "\n")

    try:
        with open(str(invalid_path) + ".tmp", "w", encoding="utf-8", newline="\n") as inv:
            if image_i < 0:
                # Text only: no pool; the line is the pre-serialised template around two JSON strings.
                enc = encode_basestring
                if template is not None:
                    head, middle, tail = template
                for index, _, row, line in stream:
                    rows += 1
                    if id_i >= 0:
                        custom_id = row[id_i]
                        if custom_id.strip() != "":
                            first = seen.setdefault(custom_id, index)
                            if first != index:
                                ids.duplicate(custom_id, first, index, line)
                    else:
                        custom_id = f"row-{index}"
                    try:
                        if id_i >= 0:
                            _check_id_value(custom_id, id_col, o.provider)
                        prompt = row[prompt_i] if render is None else render(row)
                        if prompt.strip() == "":
                            raise RowError("empty prompt", prompt_col)
                        if template is not None:
                            request = (head + enc(custom_id) + middle + enc(prompt) + tail).encode("utf-8")
                        else:
                            request = _request_line(o, custom_id, prompt, None)
                        if len(request) > max_bytes:
                            raise _too_big(request, max_bytes)
                    except RowError as exc:
                        fail(inv, index, custom_id, exc, line)
                        continue
                    send(request, index, custom_id)
                    valid += 1
            else:

                def items() -> Iterator[tuple[int, str, str | None, RowError | None, str]]:
                    nonlocal rows
                    for index, _, row, line in stream:
                        rows += 1
                        lines[index] = line
                        d = dict(zip(header, row, strict=True))
                        ids.add(index, d, line)
                        custom_id = plan.custom_id(index, d)
                        try:
                            plan.check_id(d)
                            prompt = plan.prompt(d)
                        except RowError as exc:
                            yield index, custom_id, None, exc, ""
                            continue
                        yield index, custom_id, prompt, None, row[image_i]

                images = _encode_ordered(items(), plan)
                for index, custom_id, prompt, err, url in images:
                    line = lines.pop(index)
                    try:
                        if err is not None:
                            raise err
                        request = _request_line(o, custom_id, prompt, url)
                        if len(request) > max_bytes:
                            raise _too_big(request, max_bytes)
                    except RowError as exc:
                        fail(inv, index, custom_id, exc, line)
                        continue
                    send(request, index, custom_id)
                    valid += 1
        if once is not None:
            once.close()
        shards = writer.close()
    except BaseException:
        if images is not None:
            images.close()  # stops the pool
        if once is not None:
            once.abort()
        writer.abort()
        Path(str(invalid_path) + ".tmp").unlink(missing_ok=True)
        _clean_work_dir(wd)  # never leave a partial set of shards behind
        raise
    os.replace(str(invalid_path) + ".tmp", invalid_path)

    if rows == 0:
        _clean_work_dir(wd)
        invalid_path.unlink(missing_ok=True)
        raise csvio.no_rows_error(plan.path, o.start_row, o.end_row, csvio.count_rows(plan.path))

    csv_abs = str(Path(plan.path).resolve())
    manifest_path = wd / MANIFEST_NAME
    manifest = {
        "version": MANIFEST_VERSION,
        "csv": csv_abs,
        "csv_bytes": os.path.getsize(plan.path),
        "rows_sha256": digest.hexdigest(),
        "columns": plan.header,
        "options": o.to_dict(),
        "rows": rows,
        "valid": valid,
        "invalid": invalid,
        "invalid_path": str(invalid_path),
        "duplicates": once.duplicates if once is not None else 0,
        "cached": once.cached if once is not None else 0,
        "shards": shards,
    }
    _write_json_atomic(manifest_path, manifest)
    return {
        "csv": csv_abs,
        "work_dir": str(wd),
        "manifest": str(manifest_path),
        "rows": rows,
        "valid": valid,
        "invalid": invalid,
        "invalid_path": str(invalid_path),
        "first_invalid": examples,
        "duplicates": once.duplicates if once is not None else 0,
        "cached": once.cached if once is not None else 0,
        "shards": shards,
    }

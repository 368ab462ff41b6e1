"""Validate a CSV of prompts and turn it into Batch API JSONL shards.

Public API (called by the Airflow DAG):

* ``validate_csv(csv_path, opts) -> dict`` — a small JSON-able summary; raises ``InputError`` for
  fatal problems, counts and lists row-level problems.
* ``build_jsonl(csv_path, opts, work_dir) -> dict`` — writes ``shard-00000.jsonl``..., ``invalid.jsonl``
  and ``build_manifest.json`` into ``work_dir``; returns a small dict for XCom.

Both take ``allowed_roots=`` (keyword only): a list of folders the CSV and image files must resolve
into, None for no restriction, or by default ``OPENAI_BATCH_ALLOWED_ROOTS`` read at call time (see
``paths``). A CSV outside is a fatal ``InputError``; an image outside makes only its row invalid.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import csvio, paths
from .errors import InputError, RowError
from .images import check_image_cell, image_url_for_cell
from .options import BuildOptions

OUTPUT_COLUMNS = ("response", "error", "prompt_tokens", "completion_tokens", "total_tokens")
MAX_CUSTOM_ID_LEN = 512
MAX_EXAMPLES = 10
MANIFEST_NAME = "build_manifest.json"
INVALID_NAME = "invalid.jsonl"
SHARD_GLOB = "shard-*.jsonl"
MANIFEST_VERSION = 1


def dumps_line(obj: Any) -> str:
    """Compact JSON for one JSONL line; non-ASCII text is kept as is (not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


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
    if opts.extra_body:
        body.update(opts.extra_body)
    return body


# --------------------------------------------------------------------------- per-file plan


@dataclass
class _Plan:
    path: str
    opts: BuildOptions
    header: list[str]
    template: PromptTemplate | None
    base_dir: Path
    roots: list[Path] | None = None

    def custom_id(self, index: int, row: dict[str, str]) -> str:
        if self.opts.id_column:
            return row[self.opts.id_column]
        return f"row-{index}"

    def check_id(self, row: dict[str, str]) -> None:
        if not self.opts.id_column:
            return
        value = row[self.opts.id_column]
        if value.strip() == "":
            raise RowError("empty id", self.opts.id_column)
        if len(value) > MAX_CUSTOM_ID_LEN:
            raise RowError(
                f"id is {len(value)} characters, at most {MAX_CUSTOM_ID_LEN} allowed", self.opts.id_column
            )

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
                return image_url_for_cell(row[col], self.base_dir, self.opts.max_image_mb, self.roots)
            check_image_cell(row[col], self.base_dir, self.opts.max_image_mb, self.roots)
            return None
        except RowError as exc:
            exc.column = col
            raise


def _prepare(csv_path: str | os.PathLike, opts: BuildOptions, allowed_roots: Any) -> _Plan:
    if not isinstance(opts, BuildOptions):
        opts = BuildOptions.from_dict(opts)
    opts.validate()
    path = str(csv_path)
    roots = paths.roots_or_env(allowed_roots)
    paths.check_input_csv(path, roots)  # before anything is read
    header = csvio.read_header(path)
    cols = ", ".join(header)

    def missing(column: str) -> InputError:
        return InputError(f"{path}: column {column!r} not found (columns: {cols})")

    template = None
    if opts.prompt_template is not None:
        template = PromptTemplate(opts.prompt_template)
        for name in template.fields:
            if name not in header:
                raise InputError(
                    f"{path}: prompt_template placeholder {{{name}}} is not a column (columns: {cols})"
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
    base_dir = Path(opts.image_base_dir or Path(path).parent).expanduser().resolve()
    return _Plan(path, opts, header, template, base_dir, roots)


class _IdTracker:
    def __init__(self, plan: _Plan):
        self.plan = plan
        self.seen: dict[str, int] = {}

    def add(self, index: int, row: dict[str, str]) -> None:
        col = self.plan.opts.id_column
        if not col:
            return
        value = row[col]
        if value.strip() == "":
            return
        first = self.seen.setdefault(value, index)
        if first != index:
            raise InputError(
                f"{self.plan.path}: column {col!r}: duplicate id {value!r} in rows {first} and {index} "
                "(ids must be unique)"
            )


def _example(index: int, exc: RowError) -> dict[str, Any]:
    return {"row": index, "column": exc.column, "error": exc.message}


# --------------------------------------------------------------------------- validate


def validate_csv(
    csv_path: str | os.PathLike,
    opts: BuildOptions,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
) -> dict[str, Any]:
    """Check the CSV and options without writing anything.

    Fatal problems raise InputError; row-level problems are counted. Images are checked cheaply (exists,
    size, magic bytes) but not encoded. ``allowed_roots``: folders the CSV and image files must be in
    (None: anywhere; default: ``OPENAI_BATCH_ALLOWED_ROOTS``, read now). Returns ``{"file", "columns",
    "rows_in_file", "rows_selected", "valid", "invalid", "first_invalid": [{"row", "column", "error"},
    ... up to 10]}``.
    """
    plan = _prepare(csv_path, opts, allowed_roots)
    o = plan.opts
    ids = _IdTracker(plan)
    rows_in_file = selected = valid = invalid = 0
    examples: list[dict[str, Any]] = []
    for index, row in csvio.iter_rows(plan.path, 0, None, allowed_roots=None):
        rows_in_file += 1
        if index < o.start_row or (o.end_row is not None and index >= o.end_row):
            continue
        selected += 1
        ids.add(index, row)
        try:
            plan.check_id(row)
            plan.prompt(row)
            plan.image_url(row, encode=False)
        except RowError as exc:
            invalid += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(_example(index, exc))
            continue
        valid += 1
    if selected == 0:
        raise csvio.no_rows_error(plan.path, o.start_row, o.end_row, rows_in_file)
    return {
        "file": plan.path,
        "columns": plan.header,
        "rows_in_file": rows_in_file,
        "rows_selected": selected,
        "valid": valid,
        "invalid": invalid,
        "first_invalid": examples,
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

    def add(self, line: bytes, row_index: int) -> None:
        cur = self._cur
        if cur is not None and (
            cur["requests"] + 1 > self.max_requests or cur["bytes"] + len(line) > self.max_bytes
        ):
            self._close_current()
            cur = None
        if cur is None:
            index = len(self.shards)
            path = self.work_dir / f"shard-{index:05d}.jsonl"
            cur = {"index": index, "path": str(path), "requests": 0, "bytes": 0, "first_row": row_index}
            self._cur = cur
            self._fh = open(str(path) + ".tmp", "wb")
        self._fh.write(line)
        cur["requests"] += 1
        cur["bytes"] += len(line)
        cur["last_row"] = row_index

    def _close_current(self) -> None:
        if self._cur is None:
            return
        self._fh.close()
        os.replace(self._cur["path"] + ".tmp", self._cur["path"])
        self.shards.append(self._cur)
        self._cur = None
        self._fh = None

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            Path(self._cur["path"] + ".tmp").unlink(missing_ok=True)


def _clean_work_dir(work_dir: Path) -> None:
    """Remove outputs of an earlier build so stale shards are never picked up."""
    for p in list(work_dir.glob(SHARD_GLOB)) + list(work_dir.glob(SHARD_GLOB + ".tmp")):
        p.unlink()
    for name in (INVALID_NAME, MANIFEST_NAME):
        (work_dir / name).unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_jsonl(
    csv_path: str | os.PathLike,
    opts: BuildOptions,
    work_dir: str | os.PathLike,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
) -> dict[str, Any]:
    """Write the request shards, ``invalid.jsonl`` and ``build_manifest.json`` into ``work_dir``.

    ``allowed_roots`` as for :func:`validate_csv`. ``work_dir`` is not checked against any root.

    Returns a small dict: ``{"csv", "work_dir", "manifest", "rows", "valid", "invalid", "invalid_path",
    "first_invalid", "shards": [{"index", "path", "requests", "bytes", "first_row", "last_row"}]}``.
    ``shards`` is ``[]`` when no row is valid.
    """
    plan = _prepare(csv_path, opts, allowed_roots)
    o = plan.opts
    wd = Path(work_dir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    _clean_work_dir(wd)

    ids = _IdTracker(plan)
    writer = _ShardWriter(wd, o.max_requests_per_batch, o.max_batch_bytes)
    invalid_path = wd / INVALID_NAME
    rows = valid = invalid = 0
    examples: list[dict[str, Any]] = []
    try:
        with open(str(invalid_path) + ".tmp", "w", encoding="utf-8", newline="\n") as inv:
            for index, row in csvio.iter_rows(plan.path, o.start_row, o.end_row, allowed_roots=None):
                rows += 1
                ids.add(index, row)
                custom_id = plan.custom_id(index, row)
                try:
                    plan.check_id(row)
                    prompt = plan.prompt(row)
                    image_url = plan.image_url(row, encode=True)
                    request = {
                        "custom_id": custom_id,
                        "method": "POST",
                        "url": o.endpoint,
                        "body": make_body(o, prompt, image_url),
                    }
                    line = (dumps_line(request) + "\n").encode("utf-8")
                    if len(line) > o.max_batch_bytes:
                        raise RowError(
                            f"request is {len(line)} bytes, larger than max_batch_bytes={o.max_batch_bytes}"
                        )
                except RowError as exc:
                    invalid += 1
                    if len(examples) < MAX_EXAMPLES:
                        examples.append(_example(index, exc))
                    rec = {
                        "row": index,
                        "custom_id": custom_id or f"row-{index}",
                        "column": exc.column,
                        "error": exc.message,
                    }
                    inv.write(dumps_line(rec) + "\n")
                    continue
                writer.add(line, index)
                valid += 1
        shards = writer.close()
    except BaseException:
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
        "columns": plan.header,
        "options": o.to_dict(),
        "rows": rows,
        "valid": valid,
        "invalid": invalid,
        "invalid_path": str(invalid_path),
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
        "shards": shards,
    }

"""Pick the requests of a finished batch that deserve a second try, and write them to a follow-up shard.

A batch that expires keeps what completed and lists the rest in its error file with
``"error": {"code": "batch_expired"}``; single requests can also fail for a transient reason (HTTP 429,
5xx). Those are resubmitted in a follow-up batch. Permanent failures (HTTP 400/401/403/404/422,
``invalid_request``, ...) would fail again and are not. ``batch_cancelled`` is not retried either: a
cancel is the user's decision.

Also here: a check that a downloaded output/error file is complete (``check_download``), because a
truncated download (e.g. after a 502 on a large file) would otherwise silently drop results.

No Airflow import: the DAG calls these functions with plain paths and dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FINAL_STATUSES",
    "RETRYABLE_CODES",
    "DownloadMismatch",
    "check_download",
    "count_result_lines",
    "download_problem",
    "scan_result_file",
    "is_retryable",
    "select_retryable",
    "write_followup",
    "write_unfinished",
]

#: ``error.code`` values (on lines without an HTTP response) that are worth a resubmit.
RETRYABLE_CODES: frozenset[str] = frozenset(
    {
        "batch_expired",  # not run before the 24 h window closed
        "rate_limit_exceeded",
        "server_error",
        "internal_error",
        "service_unavailable",
        "timeout",
        # Anthropic Message Batches error types of a request worth sending again
        "api_error",
        "overloaded_error",
        "rate_limit_error",
        "timeout_error",
    }
)

#: Batch statuses after which the output/error files are final and ``check_download`` applies.
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "expired", "cancelled"})

_MAX_NAMED = 20  # ids named in an error message


def _status_code(line: Mapping[str, Any]) -> int | None:
    response = line.get("response")
    if not isinstance(response, dict):
        return None
    code = response.get("status_code")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    return code


def _anthropic_result(line: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(result type, error type)`` of an Anthropic Message Batches result line, ``(None, None)`` for any
    other line."""
    result = line.get("result")
    if not isinstance(result, dict) or line.get("response") is not None:  # as the merge tells them apart
        return None, None
    kind = result.get("type")
    outer = result.get("error")
    inner = outer.get("error") if isinstance(outer, dict) and isinstance(outer.get("error"), dict) else outer
    code = inner.get("type") if isinstance(inner, dict) else None
    return (kind if isinstance(kind, str) else None), (code if isinstance(code, str) else None)


def _succeeded(line: Mapping[str, Any]) -> bool:
    """The line is an answer: HTTP 200 (OpenAI, Azure), result type ``succeeded`` (Anthropic)."""
    return _status_code(line) == 200 or _anthropic_result(line)[0] == "succeeded"


def is_retryable(line: Any) -> bool:
    """Whether one (JSON-decoded) output/error-file line failed for a transient reason.

    * A line with an HTTP response is judged by its ``status_code`` alone: 429 or >= 500 is retryable,
      200 and every other code (400, 401, 404, 422, ...) is not.
    * A line without an HTTP response is judged by ``error.code``: retryable when it is in
      ``RETRYABLE_CODES`` (``batch_expired``, ``rate_limit_exceeded``, ``server_error``, ...);
      ``batch_cancelled`` and unknown codes are permanent.
    * An Anthropic result line: ``expired`` is retryable, ``errored`` when its error type is in
      ``RETRYABLE_CODES`` (``api_error``, ``overloaded_error``, ...); ``canceled`` and ``succeeded`` are not.
    * Anything else (not an object, neither response nor error) is not retryable.
    """
    if not isinstance(line, dict):
        return False
    kind, code = _anthropic_result(line)
    if kind is not None:
        return kind == "expired" or (kind == "errored" and code in RETRYABLE_CODES)
    status = _status_code(line)
    if status is not None:
        return status == 429 or status >= 500
    error = line.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return isinstance(code, str) and code in RETRYABLE_CODES
    return False


def _iter_json_lines(path: str | os.PathLike) -> Iterable[Any]:
    """JSON-decoded non-blank lines of ``path``, streaming; lines that are not JSON are skipped."""
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue


def select_retryable(result_paths: Iterable[str | os.PathLike]) -> list[str]:
    """custom_ids to resubmit, from a batch's output and error files (read line by line).

    An id is selected when one of its lines ``is_retryable``, and never when any line of the files
    shows it succeeded (HTTP 200, or an Anthropic ``succeeded`` result): a resubmit must not bill a
    request twice. Lines that are not JSON,
    or carry no string ``custom_id``, are ignored. Order: first appearance; no duplicates.
    """
    retry: dict[str, None] = {}  # ordered set
    succeeded: set[str] = set()
    for path in result_paths:
        for line in _iter_json_lines(path):
            if not isinstance(line, dict):
                continue
            cid = line.get("custom_id")
            if not isinstance(cid, str):
                continue
            if _succeeded(line):
                succeeded.add(cid)
            elif is_retryable(line):
                retry.setdefault(cid)
    return [cid for cid in retry if cid not in succeeded]


def _line_custom_id(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def _name_ids(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    more = f" and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else ""
    return shown + more


def write_followup(
    shard_path: str | os.PathLike, custom_ids: Iterable[str], out_path: str | os.PathLike
) -> dict[str, Any]:
    """Copy the request lines of ``shard_path`` whose custom_id is in ``custom_ids`` to ``out_path``.

    Lines are copied byte for byte (not re-serialised), in shard order; a final line without a newline
    gets one, so the output is always newline-terminated JSONL. A custom_id present twice in the shard
    is written once (the API requires unique ids per file). The file is written to a temporary name in
    the same directory, flushed to disk and renamed, so ``out_path`` is either complete or absent.

    Returns ``{"path": str, "requests": int, "bytes": int, "unknown": int, "unknown_ids": str}``:
    ids not found in the shard (a service that reports a custom_id it was never sent) are skipped and
    counted, ``unknown_ids`` names the first of them. When no id is found, nothing is written
    (``requests`` 0). Raises ``ValueError`` when ``custom_ids`` is empty.
    """
    wanted = set(custom_ids)
    if not wanted:
        raise ValueError(f"{shard_path}: no custom_ids to resubmit")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    found: set[str] = set()
    written = 0
    try:
        with open(shard_path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                if not raw.strip():
                    continue
                cid = _line_custom_id(raw)
                if cid is None or cid not in wanted or cid in found:
                    continue
                found.add(cid)
                if not raw.endswith(b"\n"):
                    raw += b"\n"
                dst.write(raw)
                written += len(raw)
            dst.flush()
            os.fsync(dst.fileno())
        if found:
            os.replace(tmp, out)
        else:
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    missing = wanted - found
    return {
        "path": str(out),
        "requests": len(found),
        "bytes": written,
        "unknown": len(missing),
        "unknown_ids": _name_ids(missing),
    }


def write_unfinished(
    shard_path: str | os.PathLike,
    out_path: str | os.PathLike,
    code: str,
    message: str,
    by_line: Mapping[int, str] | None = None,
) -> int:
    """Write an error-file line for every request of ``shard_path`` (a request file whose batch never gave
    an outcome: it failed validation, was refused, or could no longer be followed), so the merge gives
    each of its rows a precise error instead of "no result".

    Each line is ``{"id", "custom_id", "response": null, "error": {"code": code, "message": ...}}``, the
    shape of the service's own error file; the merge reads it like one (a later line wins, an error never
    replaces an answer, so rows answered by an earlier round keep their answer). ``by_line`` gives the
    message for some 1-based lines of ``shard_path`` (the service named them); the others get
    ``message``. Written to a temporary name and renamed: ``out_path`` is whole or absent. Returns the
    number of lines written (a custom_id twice in the shard is written once).
    """
    by_line = dict(by_line or {})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    seen: set[str] = set()
    try:
        with open(shard_path, "rb") as src, open(tmp, "w", encoding="utf-8") as dst:
            for number, raw in enumerate(src, start=1):
                cid = _line_custom_id(raw) if raw.strip() else None
                if cid is None or cid in seen:
                    continue
                seen.add(cid)
                error = {"code": code, "message": by_line.get(number, message)}
                line = {"id": f"unfinished-{len(seen)}", "custom_id": cid, "response": None, "error": error}
                dst.write(json.dumps(line, ensure_ascii=False) + "\n")
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(seen)


def count_result_lines(path: str | os.PathLike | None) -> int:
    """Non-blank lines of a downloaded output/error file (streaming). ``None`` (no such file) → 0."""
    if path is None:
        return 0
    n = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                n += 1
    return n


def scan_result_file(path: str | os.PathLike | None, ids: set[str] | None = None) -> tuple[int, int]:
    """``(lines, unreadable)`` of a downloaded output/error file (streaming): non-blank lines, and those
    that are not a JSON object with a string ``custom_id`` (cut off, an HTML error page, binary junk).
    The custom_ids read are added to ``ids`` when given. ``None`` (no such file) → ``(0, 0)``."""
    if path is None:
        return 0, 0
    lines = unreadable = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            lines += 1
            cid = _line_custom_id(raw)
            if cid is None:
                unreadable += 1
            elif ids is not None:
                ids.add(cid)
    return lines, unreadable


def download_problem(
    counts: Mapping[str, Any] | None,
    output: str | os.PathLike | None,
    error: str | os.PathLike | None,
    status: str,
) -> str | None:
    """What is wrong with a batch's downloaded output/error files, or None when they look whole.

    Broken: a line that cannot be read (a line that does not parse means the download is broken), or, for
    a batch in a final status, fewer distinct custom_ids than ``request_counts.total`` (answers missing).
    More lines than requests (a duplicated line, an id that was never sent) is not a broken download:
    the merge counts and reports those lines.
    """
    ids: set[str] = set()
    out_lines, out_bad = scan_result_file(output, ids)
    err_lines, err_bad = scan_result_file(error, ids)
    problems = [
        f"{bad} unreadable line(s) in the {kind} file (cut off or not JSON)"
        for kind, bad in (("output", out_bad), ("error", err_bad))
        if bad
    ]
    total = _count(counts, "total") if isinstance(counts, Mapping) else None
    if status in FINAL_STATUSES and total and len(ids) < total:
        problems.append(
            f"batch {status}: downloaded results are short: {out_lines} output + {err_lines} error lines "
            f"name {len(ids)} requests, but request_counts.total is {total}"
        )
    return "; ".join(problems) or None


class DownloadMismatch(ValueError):
    """A downloaded output/error file holds fewer (or more) lines than the batch's request_counts."""

    def __init__(self, message: str, *, expected: int, got: int, status: str):
        super().__init__(message)
        self.expected = expected
        self.got = got
        self.status = status


def _count(counts: Mapping[str, Any], key: str) -> int | None:
    v = counts.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def check_download(
    counts: Mapping[str, Any] | None, output_lines: int, error_lines: int, status: str
) -> None:
    """Raise ``DownloadMismatch`` when the downloaded files do not account for every request.

    Rule: for a batch in a final status (``completed``, ``expired``, ``cancelled``) whose
    ``request_counts.total`` is > 0, every request has exactly one line in either the output file or
    the error file (expired/cancelled batches list the requests that never ran in the error file), so
    ``output_lines + error_lines`` must equal ``total``. Fewer means a truncated download (or a file
    not downloaded); more means duplicated lines. Nothing is checked how lines split between the two
    files: a non-200 response may sit in either, so ``completed``/``failed`` are not compared with the
    per-file figures. Other statuses, a ``total`` of 0 and missing counts are not checked.
    """
    if status not in FINAL_STATUSES or not isinstance(counts, Mapping):
        return
    total = _count(counts, "total")
    if total is None or total <= 0:
        return
    got = output_lines + error_lines
    if got == total:
        return
    what = "short" if got < total else "too long"
    detail = ", ".join(f"{k} {v}" for k in ("completed", "failed") if (v := _count(counts, k)) is not None)
    raise DownloadMismatch(
        f"batch {status}: downloaded results are {what}: {output_lines} output + {error_lines} error "
        f"= {got} lines, but request_counts.total is {total}" + (f" ({detail})" if detail else ""),
        expected=total,
        got=got,
        status=status,
    )

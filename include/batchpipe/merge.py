"""Merge Batch API results back into the input CSV.

Results are staged in a temporary SQLite file keyed by ``custom_id`` so memory stays flat for large
runs; the CSV is then re-read in input order and every row written exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import csvio, paths
from .build import INVALID_NAME, MANIFEST_NAME, OUTPUT_COLUMNS
from .errors import InputError
from .options import BuildOptions
from .results import parse_result_line

NO_RESULT = "no result returned for this request"
REPORT_NAME = "report.json"
CHUNK_ROWS = 5000  # CSV rows looked up and written per step
INSERT_BATCH = 20_000  # result records per executemany
OUTCOME_FIELDS = "response, error, code, p, c, t"


def load_manifest(manifest_path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Path and content of a build manifest; ``manifest_path`` may be the build directory."""
    p = Path(manifest_path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        return p, json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: build manifest not found (run the build step first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: cannot read the build manifest ({exc})") from None


def _fmt(v: int | None) -> str:
    return "" if v is None else str(v)


def merge_results(
    manifest_path: str | os.PathLike,
    result_paths: list[str | os.PathLike],
    out_csv: str | os.PathLike,
    batch_ids: list[str] | None = None,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
) -> dict[str, Any]:
    """Write ``out_csv`` (input columns + response, error, prompt/completion/total_tokens) and
    ``report.json`` beside it. Returns the report: ``{"rows", "answered", "failed", "invalid",
    "errors_by_code", "tokens": {"prompt", "completion", "total"}, "batch_ids", "results_csv", "report",
    "unmatched_results", "malformed_lines"}``.

    Later result files win over earlier ones for the same custom_id (resubmissions come later).

    ``allowed_roots``: folders the input CSV named in the manifest must resolve into (None: anywhere;
    default: ``OPENAI_BATCH_ALLOWED_ROOTS``, read now); outside → InputError before it is read.
    ``out_csv`` and the result files are not checked against any root.
    """
    mpath, manifest = load_manifest(manifest_path)
    opts = BuildOptions.from_dict(manifest.get("options") or {})
    csv_path = manifest.get("csv")
    if not csv_path:
        raise InputError(f"{mpath}: manifest has no 'csv' entry")
    paths.check_input_csv(csv_path, paths.roots_or_env(allowed_roots))
    for rp in result_paths:
        if not Path(rp).is_file():
            raise InputError(f"{rp}: result file not found")
    header = csvio.read_header(csv_path)
    if manifest.get("columns") is not None and header != manifest["columns"]:
        raise InputError(f"{csv_path}: the CSV's columns changed since the build ({mpath})")
    size = manifest.get("csv_bytes")
    if size is not None and os.path.getsize(csv_path) != size:
        raise InputError(
            f"{csv_path}: the file changed since the build ({os.path.getsize(csv_path)} bytes now, {size} "
            "at build time); results are matched to rows by position/id, so restore the original file"
        )
    clashes = [c for c in OUTPUT_COLUMNS if c in header]
    if clashes:
        raise InputError(f"{csv_path}: the input already has column(s) {', '.join(clashes)}")

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, dbfile = tempfile.mkstemp(prefix=".merge-", suffix=".sqlite", dir=out.parent)
    os.close(fd)
    tmp_csv = out.with_name(f".{out.name}.tmp")
    db = sqlite3.connect(dbfile)
    id_column = opts.id_column
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA temp_store=FILE")
        # Outcomes whose custom_id is the default ``row-N`` of row N (no id column) are keyed by N, so
        # each chunk of the CSV is one range scan; any other custom_id goes to the text-keyed table.
        db.execute(
            "CREATE TABLE by_row (row INTEGER PRIMARY KEY, response TEXT, error TEXT, code TEXT, p, c, t)"
        )
        db.execute(
            "CREATE TABLE outcome (custom_id TEXT PRIMARY KEY, response TEXT, error TEXT, code TEXT,"
            " p INTEGER, c INTEGER, t INTEGER)"
        )
        db.execute("CREATE TABLE invalid (row INTEGER PRIMARY KEY, error TEXT)")
        malformed_lines = 0
        by_row: list[tuple] = []
        by_id: list[tuple] = []
        insert_row = "INSERT OR REPLACE INTO by_row VALUES (?,?,?,?,?,?,?)"
        insert_id = "INSERT OR REPLACE INTO outcome VALUES (?,?,?,?,?,?,?)"
        for cid, rec in _iter_records(result_paths, opts.endpoint):
            if cid is None:
                malformed_lines += 1
                continue
            n = _row_number(cid) if id_column is None else None
            if n is None:
                by_id.append((cid, *rec))
                if len(by_id) >= INSERT_BATCH:
                    db.executemany(insert_id, by_id)
                    by_id.clear()
            else:
                by_row.append((n, *rec))
                if len(by_row) >= INSERT_BATCH:
                    db.executemany(insert_row, by_row)
                    by_row.clear()
        db.executemany(insert_row, by_row)
        db.executemany(insert_id, by_id)
        del by_row, by_id

        inv_path = mpath.parent / INVALID_NAME
        if inv_path.is_file():
            with open(inv_path, encoding="utf-8") as fh:
                recs = (json.loads(raw) for raw in fh if raw.strip())
                db.executemany(
                    "INSERT OR REPLACE INTO invalid VALUES (?,?)",
                    ((int(r["row"]), _not_sent(r)) for r in recs),
                )
        db.commit()

        counts = Counter()
        codes: Counter[str] = Counter()
        tokens = {"prompt": 0, "completion": 0, "total": 0}
        matched = 0
        id_i = header.index(id_column) if id_column else -1

        with open(tmp_csv, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            w.writerow(header + list(OUTPUT_COLUMNS))
            chunk: list[tuple[int, list[str]]] = []

            def flush() -> None:
                nonlocal matched
                if not chunk:
                    return
                lo, hi = chunk[0][0], chunk[-1][0]
                invalid = dict(
                    db.execute("SELECT row, error FROM invalid WHERE row BETWEEN ? AND ?", (lo, hi))
                )
                if id_i < 0:
                    sql = f"SELECT row, {OUTCOME_FIELDS} FROM by_row WHERE row BETWEEN ? AND ?"
                    found = {rec[0]: rec[1:] for rec in db.execute(sql, (lo, hi))}
                    keys = [index for index, _ in chunk]
                else:
                    keys = [row[id_i] for _, row in chunk]
                    found = {}
                    for k in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                        part = keys[k : k + 500]
                        marks = ",".join("?" * len(part))
                        sql = f"SELECT custom_id, {OUTCOME_FIELDS} FROM outcome WHERE custom_id IN ({marks})"
                        for rec in db.execute(sql, part):
                            found[rec[0]] = rec[1:]
                out_rows = []
                append = out_rows.append
                n_invalid = n_missing = n_answered = n_failed = 0
                sum_p = sum_c = sum_t = 0
                for (index, row), key in zip(chunk, keys, strict=True):
                    if invalid and index in invalid:
                        n_invalid += 1
                        append(row + ["", invalid[index], "", "", ""])
                        continue
                    rec = found.get(key)
                    if rec is None:
                        n_missing += 1
                        append(row + ["", NO_RESULT, "", "", ""])
                        continue
                    response, error, code, p, c, t = rec
                    sum_p += p or 0
                    sum_c += c or 0
                    sum_t += t or 0
                    if error is None:
                        n_answered += 1
                        append(row + [response or "", "", _fmt(p), _fmt(c), _fmt(t)])
                    else:
                        n_failed += 1
                        codes[code or "error"] += 1
                        append(row + ["", error, _fmt(p), _fmt(c), _fmt(t)])
                w.writerows(out_rows)
                counts["rows"] += len(chunk)
                counts["invalid"] += n_invalid
                counts["answered"] += n_answered
                counts["failed"] += n_failed + n_missing
                if n_invalid:
                    codes["invalid_input"] += n_invalid
                if n_missing:
                    codes["no_result"] += n_missing
                matched += len(chunk) - n_invalid - n_missing
                tokens["prompt"] += sum_p
                tokens["completion"] += sum_c
                tokens["total"] += sum_t
                chunk.clear()

            for index, _, row in csvio._iter_lists(csv_path, opts.start_row, opts.end_row):
                chunk.append((index, row))
                if len(chunk) >= CHUNK_ROWS:
                    flush()
            flush()
        if manifest.get("rows") is not None and counts["rows"] != manifest["rows"]:
            raise InputError(
                f"{csv_path}: has {counts['rows']} rows in range now, {manifest['rows']} at build time; "
                "the file changed since the build"
            )
        total_outcomes = sum(
            db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("by_row", "outcome")
        )
        os.replace(tmp_csv, out)
    finally:
        db.close()
        Path(dbfile).unlink(missing_ok=True)
        tmp_csv.unlink(missing_ok=True)

    report = {
        "rows": counts["rows"],
        "answered": counts["answered"],
        "failed": counts["failed"],
        "invalid": counts["invalid"],
        "errors_by_code": dict(sorted(codes.items())),
        "tokens": tokens,
        "batch_ids": list(batch_ids or []),
        "results_csv": str(out.resolve()),
        "report": str((out.parent / REPORT_NAME).resolve()),
        "unmatched_results": total_outcomes - matched,
        "malformed_lines": malformed_lines,
    }
    report_path = out.parent / REPORT_NAME
    tmp_report = report_path.with_name(f".{REPORT_NAME}.tmp")
    tmp_report.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_report, report_path)
    return report


def _row_number(custom_id: str) -> int | None:
    """N when ``custom_id`` is exactly ``row-N`` as the build writes it (no leading zeros), else None."""
    if custom_id.startswith("row-"):
        digits = custom_id[4:]
        if (
            0 < len(digits) <= 18  # fits SQLite's 64-bit INTEGER
            and digits.isdigit()
            and digits.isascii()
            and (digits == "0" or digits[0] != "0")
        ):
            return int(digits)
    return None


def _iter_records(paths: list, endpoint: str) -> Iterator[tuple[str | None, tuple]]:
    """``(custom_id, (response, error, code, p, c, t))`` per result line, in file order.

    Same values as :func:`results.iter_outcomes`; the common case (a 200 chat completion with text
    content) is decoded inline, everything else goes through :func:`results.parse_result_line`.
    """
    loads = json.loads
    chat = endpoint not in ("/v1/responses", "/v1/embeddings")
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    obj = loads(raw)
                except json.JSONDecodeError:
                    yield None, ()
                    continue
                # Fast path, same result as parse_result_line: HTTP 200 chat completion with text.
                if chat and type(obj) is dict:
                    cid = obj.get("custom_id")
                    response = obj.get("response")
                    if type(cid) is str and type(response) is dict and response.get("status_code") == 200:
                        body = response.get("body")
                        try:
                            content = body["choices"][0]["message"]["content"]
                        except (TypeError, KeyError, IndexError):
                            content = None
                        if type(content) is str and type(body) is dict:
                            usage = body.get("usage")
                            if type(usage) is dict:
                                p = usage.get("prompt_tokens")
                                c = usage.get("completion_tokens")
                                t = usage.get("total_tokens")
                                yield (
                                    cid,
                                    (
                                        content,
                                        None,
                                        None,
                                        p if type(p) is int else None,
                                        c if type(c) is int else None,
                                        t if type(t) is int else None,
                                    ),
                                )
                            else:
                                yield cid, (content, None, None, None, None, None)
                            continue
                o = parse_result_line(obj, endpoint)
                yield (
                    o.custom_id,
                    (o.response, o.error, o.error_code, o.prompt_tokens, o.completion_tokens, o.total_tokens),
                )


def _not_sent(record: dict) -> str:
    """The ``error`` cell of a row that failed validation: why, and in which column."""
    column = record.get("column")
    return f"not sent: {record['error']}" + (f" (column '{column}')" if column else "")

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
from pathlib import Path
from typing import Any

from . import csvio, paths
from .build import INVALID_NAME, MANIFEST_NAME, OUTPUT_COLUMNS
from .errors import InputError
from .options import BuildOptions
from .results import iter_outcomes

NO_RESULT = "no result returned for this request"
REPORT_NAME = "report.json"
CHUNK_ROWS = 5000
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
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(
            "CREATE TABLE outcome (custom_id TEXT PRIMARY KEY, response TEXT, error TEXT, code TEXT,"
            " p INTEGER, c INTEGER, t INTEGER)"
        )
        db.execute("CREATE TABLE invalid (row INTEGER PRIMARY KEY, error TEXT)")
        malformed_lines = 0
        batch = []
        for o in iter_outcomes(result_paths, opts.endpoint):
            if o.custom_id is None:
                malformed_lines += 1
                continue
            batch.append(
                (
                    o.custom_id,
                    o.response,
                    o.error,
                    o.error_code,
                    o.prompt_tokens,
                    o.completion_tokens,
                    o.total_tokens,
                )
            )
            if len(batch) >= 5000:
                db.executemany("INSERT OR REPLACE INTO outcome VALUES (?,?,?,?,?,?,?)", batch)
                batch = []
        db.executemany("INSERT OR REPLACE INTO outcome VALUES (?,?,?,?,?,?,?)", batch)

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
        id_column = opts.id_column

        def cid_of(index: int, row: dict[str, str]) -> str:
            return row[id_column] if id_column else f"row-{index}"

        with open(tmp_csv, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            w.writerow(header + list(OUTPUT_COLUMNS))
            chunk: list[tuple[int, dict[str, str]]] = []

            def flush() -> None:
                nonlocal matched
                if not chunk:
                    return
                lo, hi = chunk[0][0], chunk[-1][0]
                invalid = dict(
                    db.execute("SELECT row, error FROM invalid WHERE row BETWEEN ? AND ?", (lo, hi))
                )
                cids = [cid_of(i, r) for i, r in chunk]
                found: dict[str, tuple] = {}
                for k in range(0, len(cids), 500):  # stay below SQLite's bound-parameter limit
                    part = cids[k : k + 500]
                    marks = ",".join("?" * len(part))
                    sql = f"SELECT custom_id, {OUTCOME_FIELDS} FROM outcome WHERE custom_id IN ({marks})"
                    for rec in db.execute(sql, part):
                        found[rec[0]] = rec[1:]
                for (index, row), cid in zip(chunk, cids, strict=True):
                    counts["rows"] += 1
                    values = [row[c] for c in header]
                    if index in invalid:
                        counts["invalid"] += 1
                        codes["invalid_input"] += 1
                        w.writerow(values + ["", invalid[index], "", "", ""])
                        continue
                    rec = found.get(cid)
                    if rec is None:
                        counts["failed"] += 1
                        codes["no_result"] += 1
                        w.writerow(values + ["", NO_RESULT, "", "", ""])
                        continue
                    matched += 1
                    response, error, code, p, c, t = rec
                    for key, v in (("prompt", p), ("completion", c), ("total", t)):
                        tokens[key] += v or 0
                    if error is None:
                        counts["answered"] += 1
                        w.writerow(values + [response or "", "", _fmt(p), _fmt(c), _fmt(t)])
                    else:
                        counts["failed"] += 1
                        codes[code or "error"] += 1
                        w.writerow(values + ["", error, _fmt(p), _fmt(c), _fmt(t)])
                chunk.clear()

            for item in csvio.iter_rows(csv_path, opts.start_row, opts.end_row, allowed_roots=None):
                chunk.append(item)
                if len(chunk) >= CHUNK_ROWS:
                    flush()
            flush()
        if manifest.get("rows") is not None and counts["rows"] != manifest["rows"]:
            raise InputError(
                f"{csv_path}: has {counts['rows']} rows in range now, {manifest['rows']} at build time; "
                "the file changed since the build"
            )
        total_outcomes = db.execute("SELECT COUNT(*) FROM outcome").fetchone()[0]
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


def _not_sent(record: dict) -> str:
    """The ``error`` cell of a row that failed validation: why, and in which column."""
    column = record.get("column")
    return f"not sent: {record['error']}" + (f" (column '{column}')" if column else "")

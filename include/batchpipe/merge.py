"""Merge Batch API results back into the input CSV.

Result lines are decoded once (msgspec; the standard library for the rare line msgspec refuses) and
staged on disk so memory stays flat for large runs: outcomes for the build's own ``row-N`` ids go to one
file per range of rows (:class:`_RowRanges`), any other custom_id (an id column's values) to a temporary
SQLite table. The CSV is then re-read in input order, one range of rows at a time, and every row written
exactly once to ``results.csv`` and ``results.parquet``.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from . import csvio, paths
from .build import CACHED_NAME, DUPLICATES_NAME, INVALID_NAME, MANIFEST_NAME, OUTPUT_COLUMNS, RowDigest
from .errors import InputError
from .options import BuildOptions
from .parquet import ResultFiles
from .results import LONE_SURROGATE, TRUNCATED, parse_result_line, without_lone_surrogates
from .schema import AnswerColumns
from .sql import select_in

NO_RESULT = "no result returned for this request"
REPORT_NAME = "report.json"
CHUNK_ROWS = 20_000  # at most this many CSV rows looked up and written per step (one range of rows)
CHUNK_BYTES = 16 << 20  # ... and about this many bytes of CSV and result lines per range
INSERT_BATCH = 20_000  # result records held (at most CHUNK_BYTES of answers) before they are written out
HIST_BINS = 20  # bins of the tokens-per-row histogram
OUTCOME_FIELDS = "response, error, code, p, c, t"
MAX_NAMED = 20  # ids / lines named in the report

BROKEN_LINE = "broken_result_line"
_CUSTOM_ID_IN_TEXT = re.compile(r'"custom_id"\s*:\s*"((?:[^"\\]|\\.){1,512})"')


def _upsert(table: str, key: str) -> str:
    """Insert a result record. For a key seen before, the later line wins (a resubmission's outcome comes
    in a later file) except that an error never replaces an answer. ``d`` counts the key's duplicates:
    lines after an answer, or repeating the key within one file (``f`` is the file's index)."""
    keep = f"{table}.error IS NULL AND excluded.error IS NOT NULL"
    cols = ("response", "error", "code", "p", "c", "t", "f")
    sets = ", ".join(f"{c} = CASE WHEN {keep} THEN {table}.{c} ELSE excluded.{c} END" for c in cols)
    # a broken line is counted as broken (malformed_lines), not as a duplicate
    dup = (
        f"({table}.error IS NULL OR {table}.f = excluded.f) AND excluded.code IS NOT '{BROKEN_LINE}' "
        f"AND {table}.code IS NOT '{BROKEN_LINE}'"
    )
    return (
        f"INSERT INTO {table} VALUES (?,?,?,?,?,?,?,?,0) ON CONFLICT({key}) DO UPDATE SET {sets}, "
        f"d = {table}.d + (CASE WHEN {dup} THEN 1 ELSE 0 END)"
    )


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


def merge_results(
    manifest_path: str | os.PathLike,
    result_paths: list[str | os.PathLike],
    out_csv: str | os.PathLike,
    batch_ids: list[str] | None = None,
    *,
    allowed_roots: list[Path] | None = paths.FROM_ENV,
    formula_escape: bool = True,
    write_report: bool = True,
    parquet: bool = True,
    answered: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """Write ``out_csv`` (input columns, answer columns, response, error, answered_from,
    prompt/completion/total_tokens) and ``report.json`` beside it (``write_report=False``: not written;
    the caller finishes it with :func:`batchpipe.report.finish_report`, as the pipeline and ``batchpipe
    merge`` do). Returns the report: ``{"rows", "answered", "failed", "invalid", "errors_by_code",
    "tokens": {"prompt", "completion", "total"}, "rows_with_usage", "tokens_per_row": {"min", "max"},
    "tokens_histogram", "batch_ids", "results_csv", "results_parquet", "report", "unmatched_results",
    "malformed_lines", "broken_lines", "answered_from_rows", "duplicate_results", "duplicate_ids",
    "csv_formula_escape", "formula_cells_escaped", "problems"}``. ``problems`` names what does not add
    up for the rows themselves: requests sent without a result line. Tokens count the rows with usage;
    a row's total is ``total_tokens``, or prompt + completion where the service gave no total;
    ``tokens_histogram`` (:func:`token_histogram`) is what report.html draws.

    Several lines for one custom_id: the later line wins (resubmissions come in later files), except that
    an error never replaces an answer (HTTP 200). A line for an id that already had an answer, or that
    repeats an id within one file, counts in ``duplicate_results`` (ids named in ``duplicate_ids``).
    A line that is not JSON, or has no custom_id, counts in ``malformed_lines`` and is named in
    ``broken_lines`` (file, line, and the custom_id when it can still be read from the text: that row
    then gets a ``broken_result_line`` error rather than "no result").

    With a ``response_schema`` (in the manifest's options), each answer is parsed and checked against it
    (:class:`batchpipe.schema.AnswerColumns`): its top-level properties fill the answer columns (named after
    them, with ``output_prefix``; :func:`batchpipe.schema.cell`), the raw text stays in ``response``. An
    answer that is not JSON, does not follow the schema or was cut off at the token limit leaves them
    empty and says why in ``error`` (``schema_mismatch: …`` / ``truncated: …``); the report's
    ``structured`` counts ``parsed`` and ``not_parsed`` answers.

    A row the build did not send because it repeats an earlier row's request (``duplicates.jsonl``) gets
    that row's outcome, its ``answered_from`` says ``row N`` (others: ``batch``; a row not sent: empty)
    and its token cells stay empty: the request was billed once, on the row that sent it
    (``answered_from_rows`` counts them).

    A row answered from the answer cache (the build's ``cached.jsonl``) gets the kept answer, its
    ``answered_from`` says ``cache`` and its token cells stay empty (not billed by this run;
    ``answered_from_cache`` counts them). ``saved`` says what both did not cost: ``{"from_duplicates",
    "from_cache"}``, each ``{"rows", "prompt", "completion"}`` (the tokens of the answers they reuse).

    ``answered``: called with the custom_ids of the rows answered by their own result line in this run
    (lists, as the pass goes): what may be kept in the cache (:class:`batchpipe.cache.NewAnswers`).

    The selected rows must be those the build read: their digest (``rows_sha256`` in the manifest) is
    checked while they are merged, and a CSV whose rows changed since the build fails with InputError
    (nothing is written), never merged by position into other rows.

    ``formula_escape``: a ``response`` or ``error`` cell starting with ``=``, ``+``, ``-``, ``@``, tab or
    CR gets a leading ``'`` (OWASP's advice against CSV injection); the input's own columns are never
    changed.

    ``allowed_roots``: folders the input CSV named in the manifest must resolve into (None: anywhere;
    default: ``OPENAI_BATCH_ALLOWED_ROOTS``, read now); outside → InputError before it is read.
    ``out_csv`` and the result files are not checked against any root.
    """
    # The merge holds a range of rows and their records at a time, and makes no reference cycles: the
    # cyclic garbage collector would only walk those objects over and over (about a fifth of the time).
    paused = gc.isenabled()
    gc.disable()
    try:
        return _merge(
            manifest_path,
            result_paths,
            out_csv,
            batch_ids,
            allowed_roots=allowed_roots,
            formula_escape=formula_escape,
            write_report=write_report,
            parquet=parquet,
            answered=answered,
        )
    finally:
        if paused:
            gc.enable()


def _merge(
    manifest_path: str | os.PathLike,
    result_paths: list[str | os.PathLike],
    out_csv: str | os.PathLike,
    batch_ids: list[str] | None,
    *,
    allowed_roots: list[Path] | None,
    formula_escape: bool,
    write_report: bool,
    parquet: bool,
    answered: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
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
    checked = opts.checked_schema
    answers = AnswerColumns(checked) if checked is not None else None
    answer_columns = checked.columns(opts.output_prefix) if checked is not None else []
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    tmp_csv = out.with_name(f".{out.name}.tmp")
    out_parquet = out.with_suffix(".parquet")
    tmp_parquet = out_parquet.with_name(f".{out_parquet.name}.tmp")
    files = None
    db = sqlite3.connect(work / "outcomes.sqlite")
    id_column = opts.id_column
    start = opts.start_row
    selected = manifest.get("rows")
    span = _span(csv_path, selected, result_paths)
    ranges = _RowRanges(work, start, start + selected if selected is not None else opts.end_row, span)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA temp_store=FILE")
        # A custom_id that is the build's ``row-N`` for a selected row N (no id column) goes to its range
        # of rows; any other (an id column's values, or ids no row has) to this text-keyed table.
        db.execute(
            "CREATE TABLE outcome (custom_id TEXT PRIMARY KEY, response TEXT, error TEXT, code TEXT,"
            " p INTEGER, c INTEGER, t INTEGER, f INTEGER, d INTEGER)"
        )
        db.execute("CREATE TABLE invalid (row INTEGER PRIMARY KEY, error TEXT)")
        broken = _Broken()
        by_id: list[tuple] = []
        held = 0  # characters of the answers in by_id
        insert_id = _upsert("outcome", "custom_id")
        add_row = ranges.add
        for cid, rec in _iter_records(result_paths, opts.endpoint, broken):
            if id_column is None:
                n = _row_number(cid)
                if n is not None and add_row(n, rec):
                    continue
            by_id.append((cid, *rec))
            held += len(rec[0]) if rec[0] is not None else 0
            if len(by_id) >= INSERT_BATCH or held >= CHUNK_BYTES:
                db.executemany(insert_id, by_id)
                by_id.clear()
                held = 0
        ranges.spill()
        db.executemany(insert_id, by_id)
        del by_id

        _load_records(db, mpath.parent / INVALID_NAME, "invalid", 2, lambda r: (int(r["row"]), _not_sent(r)))
        # rows not sent because an earlier row sends the same request: answered by that row
        db.execute("CREATE TABLE dup (row INTEGER PRIMARY KEY, of_row INTEGER, of_cid TEXT)")
        db.execute("CREATE INDEX dup_of ON dup (of_row)")
        _load_records(
            db,
            mpath.parent / DUPLICATES_NAME,
            "dup",
            3,
            lambda r: (int(r["row"]), int(r["of_row"]), r.get("of")),
            expected=int(manifest.get("duplicates") or 0),
        )
        # rows answered from the answer cache: the kept result line
        db.execute(f"CREATE TABLE cache (row INTEGER PRIMARY KEY, {OUTCOME_FIELDS})")
        _load_records(db, mpath.parent / CACHED_NAME, "cache", 7, lambda r: _cached_outcome(r, opts.endpoint),
                      expected=int(manifest.get("cached") or 0))  # fmt: skip
        # the outcome of each row answering later rows, kept as the pass goes (per pass)
        db.execute(
            "CREATE TABLE src (row INTEGER PRIMARY KEY, found INTEGER, response TEXT, error TEXT, code TEXT,"
            " p INTEGER, c INTEGER, t INTEGER)"
        )
        db.commit()

        id_i = header.index(id_column) if id_column else -1
        no_result = NO_RESULT
        if broken.anonymous:
            no_result += (
                f" ({broken.anonymous} result line(s) could not be read: this row's answer may be among them)"
            )
        expected = manifest.get("rows_sha256")

        def write_rows(arrow: bool) -> dict[str, Any]:
            """One pass over the selected rows, writing them merged; the pass's counts. ``arrow``: read the
            CSV with Arrow's reader (each chunk's cells stay Arrow arrays), else with the csv module."""
            tally: dict[str, Any] = {
                "counts": Counter(),
                "codes": Counter(),
                "tokens": {"prompt": 0, "completion": 0, "total": 0},
                "row_totals": {},  # total tokens of a row -> rows (the report's histogram)
                "structured": Counter(),
                "matched": 0,
                "copied": 0,  # rows answered by an earlier row's request
                "from_cache": 0,  # rows answered from the answer cache
                "saved": {k: Counter() for k in ("from_duplicates", "from_cache")},
                "digest": RowDigest(),
            }
            files = tally["files"] = ResultFiles(
                tmp_csv, tmp_parquet if parquet else None, header, checked, answer_columns, opts.endpoint,
                formula_escape=formula_escape,
            )  # fmt: skip
            try:
                return _rows(tally, files, arrow)
            except BaseException:
                files.abort()
                raise

        def _rows(tally: dict[str, Any], files: ResultFiles, arrow: bool) -> dict[str, Any]:
            counts, codes, tokens, row_totals = (
                tally[k] for k in ("counts", "codes", "tokens", "row_totals")
            )
            structured, digest = tally["structured"], tally["digest"]
            ranges.reset()
            db.execute("DELETE FROM src")
            lo = start
            if arrow:
                chunks: Any = csvio.arrow_chunks(csv_path, header, opts.start_row, opts.end_row, span)
            else:
                chunks = csvio.iter_chunks(csv_path, opts.start_row, opts.end_row, span)
            for chunk in chunks:
                if arrow:
                    n = chunk.num_rows
                    digest.add_table(chunk)
                    ids = chunk.column(id_i).to_pylist() if id_i >= 0 else None
                else:
                    n = len(chunk)
                    digest.add_rows(chunk)
                    ids = [row[id_i] for row in chunk] if id_i >= 0 else None
                hi = lo + n - 1
                invalid = dict(
                    db.execute("SELECT row, error FROM invalid WHERE row BETWEEN ? AND ?", (lo, hi))
                )
                if ids is None:
                    found = ranges.load((lo - start) // span)
                    keys: Any = range(lo, hi + 1)
                else:
                    keys = ids
                    sql = f"SELECT custom_id, {OUTCOME_FIELDS} FROM outcome WHERE custom_id IN ({{marks}})"
                    found = {rec[0]: rec[1:] for rec in select_in(db, sql, keys)}
                dups = {
                    row: (of_row, of_cid)
                    for row, of_row, of_cid in db.execute(
                        "SELECT row, of_row, of_cid FROM dup WHERE row BETWEEN ? AND ?", (lo, hi)
                    )
                }
                cached = {
                    row: tuple(rec)
                    for row, *rec in db.execute(
                        f"SELECT row, {OUTCOME_FIELDS} FROM cache WHERE row BETWEEN ? AND ?", (lo, hi)
                    )
                }
                earlier: dict[int, Any] = {}
                if dups:
                    before = sorted({of_row for of_row, _ in dups.values() if of_row < lo})
                    sql = f"SELECT row, found, {OUTCOME_FIELDS} FROM src WHERE row IN ({{marks}})"
                    for row, was_found, *rec in select_in(db, sql, before):
                        earlier[row] = tuple(rec) if was_found else None
                sources = [
                    r
                    for (r,) in db.execute(
                        "SELECT DISTINCT of_row FROM dup WHERE of_row BETWEEN ? AND ?", (lo, hi)
                    )
                ]
                # the chunk's columns, as answered (results.csv escapes formulas when it writes them)
                answered_from: list[str | None] = ["batch"] * n
                responses: list[str | None] = [None] * n
                errors = [""] * n
                ps: list[int | None] = [None] * n
                cs: list[int | None] = [None] * n
                ts: list[int | None] = [None] * n
                values: list[Any] | None = [None] * n if answers is not None else None
                n_invalid = n_missing = n_answered = n_not_parsed = 0
                sum_p = sum_c = sum_t = 0
                n_copied = n_own = n_cached = 0  # rows answered by another row's request; by a line of
                # their own; from the cache
                saved_dup, saved_cache = tally["saved"]["from_duplicates"], tally["saved"]["from_cache"]
                own_answers: list[str] = []
                for i, key in enumerate(keys):
                    if invalid and lo + i in invalid:
                        n_invalid += 1
                        errors[i] = invalid[lo + i]
                        answered_from[i] = None
                        continue
                    copied = dups.get(lo + i) if dups else None
                    if copied is None:
                        rec = cached.get(lo + i) if cached else None
                        if rec is None:
                            rec = found.get(key)
                            n_own += rec is not None
                        else:  # a kept answer: not billed by this run
                            n_cached += 1
                            answered_from[i] = "cache"
                            saved_cache["rows"] += 1
                            saved_cache["prompt"] += rec[3] or 0
                            saved_cache["completion"] += rec[4] or 0
                            rec = (*rec[:3], None, None, None)
                    else:  # the answer of the row that sent this request: not billed again
                        of_row, of_cid = copied
                        n_copied += 1
                        answered_from[i] = f"row {of_row}"
                        if of_row >= lo:
                            rec = cached.get(of_row) if cached else None
                            if rec is None:
                                rec = found.get(of_row if ids is None else of_cid)
                        else:
                            rec = earlier.get(of_row)
                        saved_dup["rows"] += 1
                        if rec is not None:
                            saved_dup["prompt"] += rec[3] or 0
                            saved_dup["completion"] += rec[4] or 0
                            rec = (*rec[:3], None, None, None)
                    if rec is None:
                        n_missing += 1
                        errors[i] = no_result
                        continue
                    response, error, code, p, c, t = rec[:6]
                    responses[i] = response
                    if p is not None or c is not None or t is not None:
                        total = t if t is not None else (p or 0) + (c or 0)  # as the CSV's reader
                        sum_p += p or 0
                        sum_c += c or 0
                        sum_t += total
                        row_totals[total] = row_totals.get(total, 0) + 1
                        ps[i], cs[i], ts[i] = p, c, t
                    if error is None and values is not None:
                        parsed, code, error = answers.values(response, code)
                        if parsed is None:
                            n_not_parsed += 1
                        else:
                            values[i] = parsed
                            error = None
                    if error is None:
                        n_answered += 1
                        if answered is not None and answered_from[i] == "batch":
                            own_answers.append(f"row-{key}" if ids is None else key)
                    else:
                        codes[code or "error"] += 1
                        errors[i] = error
                if sources:
                    kept = []
                    for row in sources:
                        rec = cached.get(row) if cached else None
                        if rec is None:
                            rec = found.get(row if ids is None else ids[row - lo])
                        kept.append(
                            (row, 0, None, None, None, None, None, None)
                            if rec is None
                            else (row, 1, *rec[:6])
                        )
                    db.executemany("INSERT OR REPLACE INTO src VALUES (?,?,?,?,?,?,?,?)", kept)
                inputs = chunk.columns if arrow else chunk
                files.write(inputs, n, values, responses, errors, answered_from, (ps, cs, ts), arrays=arrow)
                tally["copied"] += n_copied
                tally["from_cache"] += n_cached
                if own_answers:
                    answered(own_answers)
                if values is not None:
                    structured["not_parsed"] += n_not_parsed
                    structured["parsed"] += n_answered  # with a schema, answered means parsed
                counts["rows"] += n
                counts["invalid"] += n_invalid
                counts["answered"] += n_answered
                counts["failed"] += n - n_invalid - n_answered
                if n_invalid:
                    codes["invalid_input"] += n_invalid
                if n_missing:
                    codes["no_result"] += n_missing
                tally["matched"] += n_own
                tokens["prompt"] += sum_p
                tokens["completion"] += sum_c
                tokens["total"] += sum_t
                lo += n
            return tally

        tally = None
        if expected:  # Arrow's reader, where the rows' digest can prove it read what the build read
            import pyarrow as pa

            try:
                tally = write_rows(arrow=True)
            except pa.ArrowException:  # a CSV Arrow reads otherwise than the csv module: that one decides
                tally = None
            else:
                if tally["digest"].hexdigest() != expected or _rows_differ(tally, manifest):
                    tally["files"].abort()
                    tally = None  # the csv module's reading decides (and names what changed)
        if tally is None:
            tally = write_rows(arrow=False)
        files = tally["files"]
        counts, codes, tokens = tally["counts"], tally["codes"], tally["tokens"]
        row_totals, structured, matched = tally["row_totals"], tally["structured"], tally["matched"]
        if _rows_differ(tally, manifest):
            raise InputError(
                f"{csv_path}: has {counts['rows']} rows in range now, {manifest['rows']} at build time; "
                "the file changed since the build"
            )
        if expected not in (None, tally["digest"].hexdigest()):
            raise InputError(
                f"{csv_path}: the selected rows changed since the build (same size and row count, other "
                "content: rows edited, swapped or replaced); answers are joined to rows by position or id, "
                "so nothing was merged. Restore the file the build read, or run the pipeline again"
            )
        ranges.load_rest()
        total_outcomes = ranges.distinct + db.execute("SELECT COUNT(*) FROM outcome").fetchone()[0]
        duplicates = ranges.duplicates + db.execute("SELECT COALESCE(SUM(d), 0) FROM outcome").fetchone()[0]
        duplicate_ids = [f"row-{n}" for n in sorted(ranges.duplicate_rows)[:MAX_NAMED]]
        duplicate_ids += [
            cid
            for (cid,) in db.execute(
                f"SELECT custom_id FROM outcome WHERE d > 0 ORDER BY 1 LIMIT {MAX_NAMED}"
            )
        ]
        files.close()
        if parquet:
            os.replace(tmp_parquet, out_parquet)
        os.replace(tmp_csv, out)
    except BaseException:
        if files is not None:
            files.abort()
        raise
    finally:
        db.close()
        shutil.rmtree(work, ignore_errors=True)
        tmp_csv.unlink(missing_ok=True)
        tmp_parquet.unlink(missing_ok=True)

    report = {
        "rows": counts["rows"],
        "answered": counts["answered"],
        "failed": counts["failed"],
        "invalid": counts["invalid"],
        "errors_by_code": dict(sorted(codes.items())),
        "tokens": tokens,
        "rows_with_usage": sum(row_totals.values()),
        "tokens_per_row": {"min": min(row_totals, default=None), "max": max(row_totals, default=None)},
        "tokens_histogram": token_histogram(row_totals),
        "batch_ids": list(batch_ids or []),
        "results_csv": str(out.resolve()),
        "results_parquet": str(out_parquet.resolve()) if parquet else None,
        "report": str((out.parent / REPORT_NAME).resolve()),
        "unmatched_results": total_outcomes - matched,
        "malformed_lines": broken.count,
        "broken_lines": broken.examples,
        "answered_from_rows": tally["copied"],
        "answered_from_cache": tally["from_cache"],
        "saved": {k: dict({"rows": 0, "prompt": 0, "completion": 0}, **v) for k, v in tally["saved"].items()},
        "duplicate_results": duplicates,
        "duplicate_ids": duplicate_ids[:MAX_NAMED],
        "csv_formula_escape": formula_escape,
        "formula_cells_escaped": files.escaped,
        "problems": [],
    }
    if checked is not None:
        report["structured"] = {
            "columns": answer_columns,
            "parsed": structured["parsed"],
            "not_parsed": structured["not_parsed"],
        }
    if codes.get("no_result"):  # sent, paid for perhaps, and no line came back: never a quiet success
        report["problems"].append(
            f"{codes['no_result']} request(s) were sent but no result line came back for them (rows marked "
            f"'{NO_RESULT}')"
        )
    if write_report:
        report_path = out.parent / REPORT_NAME
        tmp_report = report_path.with_name(f".{REPORT_NAME}.tmp")
        tmp_report.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_report, report_path)
    return report


def token_histogram(row_totals: Counter[int] | dict[int, int], nbins: int = HIST_BINS) -> list[list[int]]:
    """``[[low, high, rows], ...]``: rows per range of total tokens, ``nbins`` integer ranges over the
    smallest to the largest total (fewer when that span is narrower); ``[]`` without usage."""
    if not row_totals:
        return []
    lo, hi = min(row_totals), max(row_totals)
    width = max(1, -(-(hi - lo + 1) // nbins))
    n = -(-(hi - lo + 1) // width)
    counts = [0] * n
    for total, rows in row_totals.items():
        counts[min((total - lo) // width, n - 1)] += rows
    return [[lo + i * width, min(lo + (i + 1) * width - 1, hi), k] for i, k in enumerate(counts)]


def _span(csv_path: str | os.PathLike, selected: int | None, result_paths: list) -> int:
    """Rows per range: :data:`CHUNK_ROWS`, fewer when the CSV's and the results' bytes per row would make
    one range hold much more than :data:`CHUNK_BYTES` (long prompts, embeddings)."""
    size = os.path.getsize(csv_path) + sum(os.path.getsize(rp) for rp in result_paths)
    per_row = size // max(1, selected or 0) if selected else 0
    return max(1, min(CHUNK_ROWS, max(256, CHUNK_BYTES // max(1, per_row))))


class _RowRanges:
    """Outcomes of the ``row-N`` custom_ids of the selected rows ``[start, stop)`` (``stop`` None: no end),
    kept on disk in one file per range of ``span`` rows: :meth:`add` buffers a record in its range and
    :meth:`spill` appends the buffers (pickled lists, in arrival order) to the range files; :meth:`load`
    reads one range back and settles repeated ids as the text-keyed table does (see :func:`_upsert`)."""

    def __init__(self, folder: Path, start: int, stop: int | None, span: int) -> None:
        self.folder, self.start, self.stop, self.span = folder, start, stop, span
        self.pending: dict[int, list[tuple]] = {}
        self.held = self.held_bytes = 0  # records and characters of answers not yet spilled
        self.on_disk: set[int] = set()
        self.reset()

    def reset(self) -> None:
        """Forget what was loaded (a new pass over the rows)."""
        self.loaded: set[int] = set()
        self.distinct = 0  # ids loaded so far
        self.duplicates = 0
        self.duplicate_rows: list[int] = []  # the first MAX_NAMED, in row order

    def add(self, n: int, rec: tuple) -> bool:
        """Hold ``rec`` (``(response, error, code, p, c, t, file index)``) for row ``n``; False when ``n``
        is not a selected row (the caller keeps it with the other ids)."""
        if n < self.start or (self.stop is not None and n >= self.stop):
            return False
        key = (n - self.start) // self.span
        held = self.pending.get(key)
        if held is None:
            self.pending[key] = held = []
        held.append((n, *rec))
        self.held += 1
        if rec[0] is not None:
            self.held_bytes += len(rec[0])
        if self.held >= INSERT_BATCH or self.held_bytes >= CHUNK_BYTES:  # embeddings are large
            self.spill()
        return True

    def _file(self, key: int) -> Path:
        return self.folder / f"rows-{key}.pickle"

    def spill(self) -> None:
        for key, held in self.pending.items():
            with open(self._file(key), "ab") as fh:
                pickle.dump(held, fh, protocol=pickle.HIGHEST_PROTOCOL)
            self.on_disk.add(key)
        self.pending.clear()
        self.held = self.held_bytes = 0

    def load(self, key: int) -> dict[int, tuple]:
        """Row number → ``(response, error, code, p, c, t, file index)`` of range ``key`` (empty when it
        was loaded already in this pass). For a row with several lines the later one wins, except that an
        error never replaces an answer; a line after an answer, or repeating the id within one file, is a
        duplicate (broken lines are not)."""
        found: dict[int, tuple] = {}
        if key not in self.on_disk or key in self.loaded:
            return found
        self.loaded.add(key)
        path = self._file(key)
        dups: list[int] = []
        get = found.get
        with open(path, "rb") as fh:
            while True:
                try:
                    part = pickle.load(fh)
                except EOFError:
                    break
                for n, *rec in part:
                    old = get(n)
                    if old is None:
                        found[n] = rec
                        continue
                    if (
                        (old[1] is None or old[6] == rec[6])
                        and rec[2] != BROKEN_LINE
                        and old[2] != BROKEN_LINE
                    ):
                        dups.append(n)
                    if not (old[1] is None and rec[1] is not None):
                        found[n] = rec
        self.distinct += len(found)
        self.duplicates += len(dups)
        if dups and len(self.duplicate_rows) < MAX_NAMED:
            self.duplicate_rows = sorted(set(self.duplicate_rows) | set(dups))[:MAX_NAMED]
        return found

    def load_rest(self) -> None:
        """Load (to count them) the ranges the CSV pass did not reach: ids of rows past the file's end."""
        for key in sorted(self.on_disk - self.loaded):
            self.load(key)


def _load_records(
    db: sqlite3.Connection, path: Path, table: str, width: int, values: Any, expected: int | None = None
) -> None:
    """The JSON lines of the build's ``path`` into ``table`` (``width`` columns), ``values(record)`` per
    line. ``expected``: how many records the manifest says the build wrote (None: the file is optional
    and read when there). The build writes ``duplicates.jsonl`` and ``cached.jsonl`` only when it has
    records for them, and a work folder in object storage keeps what an earlier build stored: a file
    from another build is never read (0 expected), and one that does not hold the records expected
    fails the merge instead of answering rows from it."""
    if expected == 0 or (expected is None and not path.is_file()):
        return
    try:
        with open(path, encoding="utf-8", newline="\n") as fh:
            recs = [values(json.loads(raw)) for raw in fh if raw.strip()]
    except FileNotFoundError:
        recs = []
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: cannot read the build's records ({exc}); build again") from None
    if expected is not None and len(recs) != expected:
        raise InputError(
            f"{path}: {len(recs)} records, the build manifest says {expected}: it is not this build's "
            "file; build again"
        )
    marks = ",".join("?" * width)
    db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", recs)


def _rows_differ(tally: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """The pass read another number of selected rows than the build did."""
    return manifest.get("rows") is not None and tally["counts"]["rows"] != manifest["rows"]


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


class _Broken:
    """Result lines that could not be read: how many, and the first few (file, line, custom_id)."""

    def __init__(self) -> None:
        self.count = 0
        self.anonymous = 0  # of which no custom_id could be read: any row without a result may be theirs
        self.examples: list[dict[str, Any]] = []

    def add(self, path: Any, line: int, custom_id: str | None) -> str:
        self.count += 1
        self.anonymous += custom_id is None
        name = Path(path).name
        if len(self.examples) < MAX_NAMED:
            self.examples.append({"file": name, "line": line, "custom_id": custom_id})
        return (
            f"result line unreadable (truncated or not JSON): {name} line {line}; the answer may have been "
            "lost in the download"
        )


def _custom_id_in_text(raw: str) -> str | None:
    """The custom_id still legible in a line that is not JSON (e.g. cut off mid-way), else None."""
    m = _CUSTOM_ID_IN_TEXT.search(raw)
    if m is None:
        return None
    try:
        cid = json.loads(f'"{m[1]}"')
    except json.JSONDecodeError:
        return None
    return cid if isinstance(cid, str) and cid.strip() else None


class _Message(msgspec.Struct):
    content: Any = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: Any = None


class _Usage(msgspec.Struct):
    prompt_tokens: Any = None
    completion_tokens: Any = None
    total_tokens: Any = None


class _Body(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None


class _Response(msgspec.Struct):
    status_code: Any = None
    body: _Body | None = None


class _ChatLine(msgspec.Struct):
    """The parts of a chat completion's output line the merge reads; msgspec skips the rest unread."""

    custom_id: Any = None
    response: _Response | None = None


_decode_chat = msgspec.json.Decoder(_ChatLine).decode
_decode_any = msgspec.json.Decoder().decode


def _iter_records(paths: list, endpoint: str, broken: _Broken) -> Iterator[tuple[str, tuple]]:
    """``(custom_id, (response, error, code, p, c, t, file index))`` per result line, in file order.

    Same values as :func:`results.iter_outcomes`. Lines are decoded with msgspec: the common case (a 200
    chat completion with text content) straight into :class:`_ChatLine`, anything else as plain JSON into
    :func:`results.parse_result_line`. A line msgspec refuses goes to the standard library's decoder,
    which the reference reader uses (it also takes ``NaN``, numbers out of range and lone UTF-16
    surrogates; those are kept as their ``\\udXXX`` escape). A line that is not JSON, or has no custom_id,
    is added to ``broken``; when its custom_id can still be read from the text, that id gets a
    ``broken_result_line`` error record.
    """
    chat = endpoint not in ("/v1/responses", "/v1/embeddings")
    decode_chat, decode_any, refused = _decode_chat, _decode_any, msgspec.MsgspecError
    for f, path in enumerate(paths):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                if chat:
                    try:
                        line = decode_chat(raw)
                    except refused:
                        line = None
                    if line is not None:
                        cid = line.custom_id
                        response = line.response
                        if type(cid) is str and response is not None and response.status_code == 200:
                            body = response.body
                            choices = body.choices if body is not None else None
                            choice = choices[0] if choices else None
                            message = choice.message if choice is not None else None
                            content = message.content if message is not None else None
                            if type(content) is str:
                                note = TRUNCATED if choice.finish_reason == "length" else None
                                usage = body.usage
                                if usage is None:
                                    yield cid, (content, None, note, None, None, None, f)
                                else:
                                    p = usage.prompt_tokens
                                    c = usage.completion_tokens
                                    t = usage.total_tokens
                                    yield (
                                        cid,
                                        (
                                            content,
                                            None,
                                            note,
                                            p if type(p) is int else None,
                                            c if type(c) is int else None,
                                            t if type(t) is int else None,
                                            f,
                                        ),
                                    )
                                continue
                try:
                    obj = decode_any(raw)
                except refused:
                    try:
                        obj = json.loads(raw)  # bytes: invalid UTF-8 raises, it is not replaced by U+FFFD
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        cid = _custom_id_in_text(raw.decode("utf-8", "replace"))
                        error = broken.add(path, lineno, cid)
                        if cid is not None:
                            yield cid, (None, error, BROKEN_LINE, None, None, None, f)
                        continue
                    if (b"\\u" in raw or b"\xed" in raw) and LONE_SURROGATE.search(raw):
                        obj = without_lone_surrogates(obj)
                o = parse_result_line(obj, endpoint)
                if o.custom_id is None:
                    broken.add(path, lineno, None)
                    continue
                tokens = (o.prompt_tokens, o.completion_tokens, o.total_tokens)
                yield o.custom_id, (o.response, o.error, o.error_code, *tokens, f)


def _cached_outcome(record: dict, endpoint: str) -> tuple:
    """The cache table's row of a ``cached.jsonl`` record: ``(row, response, error, code, p, c, t)``."""
    line = record.get("line")
    o = parse_result_line(line, endpoint)
    return (int(record["row"]), o.response, o.error, o.error_code, o.prompt_tokens, o.completion_tokens,
            o.total_tokens)  # fmt: skip


def _not_sent(record: dict) -> str:
    """The ``error`` cell of a row that failed validation: why, and in which column."""
    column = record.get("column")
    return f"not sent: {record['error']}" + (f" (column '{column}')" if column else "")

"""Merge Batch API results back into the input CSV.

Results are staged in a temporary SQLite file keyed by ``custom_id`` so memory stays flat for large
runs; the CSV is then re-read in input order and every row written exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import csvio, paths
from .build import INVALID_NAME, MANIFEST_NAME, OUTPUT_COLUMNS, RowDigest
from .errors import InputError
from .options import BuildOptions
from .results import TRUNCATED, parse_result_line
from .schema import AnswerColumns, cell

NO_RESULT = "no result returned for this request"
REPORT_NAME = "report.json"
CHUNK_ROWS = 5000  # CSV rows looked up and written per step
INSERT_BATCH = 20_000  # result records per executemany
OUTCOME_FIELDS = "response, error, code, p, c, t"
MAX_NAMED = 20  # ids / lines named in the report

#: OWASP: a cell starting with one of these is a formula to Excel / LibreOffice / Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
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


def _fmt(v: int | None) -> str:
    return "" if v is None else str(v)


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
) -> dict[str, Any]:
    """Write ``out_csv`` (input columns, answer columns, response, error, prompt/completion/total_tokens) and
    ``report.json`` beside it (``write_report=False``: not written; the caller finishes it with
    :func:`batchpipe.report.finish_report`, as the pipeline and ``batchpipe merge`` do). Returns the
    report: ``{"rows", "answered", "failed", "invalid", "errors_by_code", "tokens": {"prompt",
    "completion", "total"}, "batch_ids", "results_csv", "report", "unmatched_results", "malformed_lines",
    "broken_lines", "duplicate_results", "duplicate_ids", "csv_formula_escape", "formula_cells_escaped",
    "problems"}``. ``problems`` names what does not add up for the rows themselves: requests sent without
    a result line.

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
    blanks = [""] * len(answer_columns)
    structured = Counter()

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, dbfile = tempfile.mkstemp(prefix=".merge-", suffix=".sqlite", dir=out.parent)
    os.close(fd)
    tmp_csv = out.with_name(f".{out.name}.tmp")
    out_parquet = out.with_suffix(".parquet")
    tmp_parquet = out_parquet.with_name(f".{out_parquet.name}.tmp")
    typed = None
    db = sqlite3.connect(dbfile)
    id_column = opts.id_column
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA temp_store=FILE")
        # Outcomes whose custom_id is the default ``row-N`` of row N (no id column) are keyed by N, so
        # each chunk of the CSV is one range scan; any other custom_id goes to the text-keyed table.
        db.execute(
            "CREATE TABLE by_row (row INTEGER PRIMARY KEY, response TEXT, error TEXT, code TEXT, p, c, t,"
            " f INTEGER, d INTEGER)"
        )
        db.execute(
            "CREATE TABLE outcome (custom_id TEXT PRIMARY KEY, response TEXT, error TEXT, code TEXT,"
            " p INTEGER, c INTEGER, t INTEGER, f INTEGER, d INTEGER)"
        )
        db.execute("CREATE TABLE invalid (row INTEGER PRIMARY KEY, error TEXT)")
        broken = _Broken()
        by_row: list[tuple] = []
        by_id: list[tuple] = []
        insert_row = _upsert("by_row", "row")
        insert_id = _upsert("outcome", "custom_id")
        for cid, rec in _iter_records(result_paths, opts.endpoint, broken):
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
        no_result = NO_RESULT
        if broken.anonymous:
            no_result += (
                f" ({broken.anonymous} result line(s) could not be read: this row's answer may be among them)"
            )
        escaped = 0

        if parquet:
            from .parquet import ParquetRows

            typed = ParquetRows(tmp_parquet, header, checked, answer_columns, opts.endpoint)
        nothing = (None, None, None)
        with open(tmp_csv, "w", encoding="utf-8", newline="") as fh:
            # CRLF (RFC 4180): the writer then quotes a cell holding a lone CR, which with "\n" it writes
            # bare, and every reader splits the row there (an answer or input cell with "\r" in it)
            w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
            w.writerow(header + answer_columns + list(OUTPUT_COLUMNS))
            chunk: list[tuple[int, list[str]]] = []

            def flush() -> None:
                nonlocal matched, escaped
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
                        append(row + blanks + ["", invalid[index], "", "", ""])
                        if typed:
                            typed.add(row, None, None, invalid[index], nothing)
                        continue
                    rec = found.get(key)
                    if rec is None:
                        n_missing += 1
                        append(row + blanks + ["", no_result, "", "", ""])
                        if typed:
                            typed.add(row, None, None, no_result, nothing)
                        continue
                    response, error, code, p, c, t = rec
                    values = None
                    sum_p += p or 0
                    sum_c += c or 0
                    sum_t += t or 0
                    cells = blanks
                    if error is None and answers is not None:
                        values, code, error = answers.values(response, code)
                        if values is None:
                            structured["not_parsed"] += 1
                        else:
                            structured["parsed"] += 1
                            cells = [cell(v) for v in values]
                            error = None
                            if formula_escape:
                                for i, v in enumerate(values):
                                    if isinstance(v, str) and v.startswith(FORMULA_START):
                                        cells[i] = "'" + v
                                        escaped += 1
                    if typed:  # as answered: a program reads it, nothing is escaped
                        typed.add(row, values, response, error or "", (p, c, t))
                    if formula_escape and response and response.startswith(FORMULA_START):
                        response = "'" + response
                        escaped += 1
                    if error is None:
                        n_answered += 1
                        append(row + cells + [response or "", "", _fmt(p), _fmt(c), _fmt(t)])
                    else:
                        n_failed += 1
                        codes[code or "error"] += 1
                        if formula_escape and error.startswith(FORMULA_START):
                            error = "'" + error
                            escaped += 1
                        append(row + cells + [response or "", error, _fmt(p), _fmt(c), _fmt(t)])
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

            digest = RowDigest()
            for index, _, row in digest.rows(csvio._iter_lists(csv_path, opts.start_row, opts.end_row)):
                chunk.append((index, row))
                if len(chunk) >= CHUNK_ROWS:
                    flush()
            flush()
        if manifest.get("rows") is not None and counts["rows"] != manifest["rows"]:
            raise InputError(
                f"{csv_path}: has {counts['rows']} rows in range now, {manifest['rows']} at build time; "
                "the file changed since the build"
            )
        if manifest.get("rows_sha256") not in (None, digest.hexdigest()):
            raise InputError(
                f"{csv_path}: the selected rows changed since the build (same size and row count, other "
                "content: rows edited, swapped or replaced); answers are joined to rows by position or id, "
                "so nothing was merged. Restore the file the build read, or run the pipeline again"
            )
        total_outcomes = sum(
            db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("by_row", "outcome")
        )
        duplicates = sum(
            db.execute(f"SELECT COALESCE(SUM(d), 0) FROM {table}").fetchone()[0]
            for table in ("by_row", "outcome")
        )
        named = f"WHERE d > 0 ORDER BY 1 LIMIT {MAX_NAMED}"
        duplicate_ids = [f"row-{n}" for (n,) in db.execute(f"SELECT row FROM by_row {named}")]
        duplicate_ids += [cid for (cid,) in db.execute(f"SELECT custom_id FROM outcome {named}")]
        if typed:
            typed.close()
            os.replace(tmp_parquet, out_parquet)
        os.replace(tmp_csv, out)
    except BaseException:
        if typed:
            typed.abort()
        raise
    finally:
        db.close()
        Path(dbfile).unlink(missing_ok=True)
        tmp_csv.unlink(missing_ok=True)
        tmp_parquet.unlink(missing_ok=True)

    report = {
        "rows": counts["rows"],
        "answered": counts["answered"],
        "failed": counts["failed"],
        "invalid": counts["invalid"],
        "errors_by_code": dict(sorted(codes.items())),
        "tokens": tokens,
        "batch_ids": list(batch_ids or []),
        "results_csv": str(out.resolve()),
        "results_parquet": str(out_parquet.resolve()) if parquet else None,
        "report": str((out.parent / REPORT_NAME).resolve()),
        "unmatched_results": total_outcomes - matched,
        "malformed_lines": broken.count,
        "broken_lines": broken.examples,
        "duplicate_results": duplicates,
        "duplicate_ids": duplicate_ids[:MAX_NAMED],
        "csv_formula_escape": formula_escape,
        "formula_cells_escaped": escaped,
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


#: A JSON escape or (CESU-8) bytes of a UTF-16 surrogate: json.loads lets those through as lone surrogates
#: when they are not paired, and a lone surrogate cannot be written as UTF-8.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def _without_lone_surrogates(obj: Any) -> Any:
    """``obj`` with every lone surrogate in its strings written as its ``\\udXXX`` escape (text kept)."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, list):
        return [_without_lone_surrogates(x) for x in obj]
    if isinstance(obj, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in obj.items()}
    return obj


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


def _iter_records(paths: list, endpoint: str, broken: _Broken) -> Iterator[tuple[str, tuple]]:
    """``(custom_id, (response, error, code, p, c, t, file index))`` per result line, in file order.

    Same values as :func:`results.iter_outcomes`; the common case (a 200 chat completion with text
    content) is decoded inline, everything else goes through :func:`results.parse_result_line`. A line
    that is not JSON, or has no custom_id, is added to ``broken``; when its custom_id can still be read
    from the text, that id gets a ``broken_result_line`` error record.
    """
    loads = json.loads
    chat = endpoint not in ("/v1/responses", "/v1/embeddings")
    for f, path in enumerate(paths):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = loads(raw)  # bytes: invalid UTF-8 raises, it is not replaced by U+FFFD
                except (json.JSONDecodeError, UnicodeDecodeError):
                    cid = _custom_id_in_text(raw.decode("utf-8", "replace"))
                    error = broken.add(path, lineno, cid)
                    if cid is not None:
                        yield cid, (None, error, BROKEN_LINE, None, None, None, f)
                    continue
                if (b"\\u" in raw or b"\xed" in raw) and _LONE_SURROGATE.search(raw):
                    obj = _without_lone_surrogates(obj)
                # Fast path, same result as parse_result_line: HTTP 200 chat completion with text.
                if chat and type(obj) is dict:
                    cid = obj.get("custom_id")
                    response = obj.get("response")
                    if type(cid) is str and type(response) is dict and response.get("status_code") == 200:
                        body = response.get("body")
                        try:
                            choice = body["choices"][0]
                            content = choice["message"]["content"]
                        except (TypeError, KeyError, IndexError):
                            content = None
                        if type(content) is str and type(body) is dict:
                            note = TRUNCATED if choice.get("finish_reason") == "length" else None
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
                                        note,
                                        p if type(p) is int else None,
                                        c if type(c) is int else None,
                                        t if type(t) is int else None,
                                        f,
                                    ),
                                )
                            else:
                                yield cid, (content, None, note, None, None, None, f)
                            continue
                o = parse_result_line(obj, endpoint)
                if o.custom_id is None:
                    broken.add(path, lineno, None)
                    continue
                tokens = (o.prompt_tokens, o.completion_tokens, o.total_tokens)
                yield o.custom_id, (o.response, o.error, o.error_code, *tokens, f)


def _not_sent(record: dict) -> str:
    """The ``error`` cell of a row that failed validation: why, and in which column."""
    column = record.get("column")
    return f"not sent: {record['error']}" + (f" (column '{column}')" if column else "")

"""Run report (self-contained HTML page) and analysis of results files.

* ``finish_report(results_csv, report, *, estimate, batches, model, prices, problems, shown) -> dict`` —
  merge's report finished: the model, the actual cost against the estimate (computed once), the batches;
  ``report.json`` written atomically and ``report.html`` beside it. The pipeline's merge task and
  ``batchpipe merge`` both call it.
* ``write_report_html(results_csv, report_json, out_html, estimate=None, batches=None) -> Path`` — one
  HTML file with inline CSS and inline SVG plots (no script, no external resource: it opens from disk).
* ``analyze(results_paths) -> dict`` — counts, error codes, tokens and response lengths of merged
  ``results.csv`` files and/or raw Batch API output/error ``.jsonl`` files.
* ``batch_phases(batch) -> list[(phase, start, end)]`` — time spent in each batch status.

Files are streamed (``csv``/line by line); memory does not grow with their size. No Airflow import.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .estimate import load_prices, price_for, token_cost
from .merge import REPORT_NAME, token_histogram
from .results import parse_result_line

HIST_BINS = 20
#: What merge's report holds of the rows' usage, so the page need not read results.csv again.
_MERGE_USAGE = ("rows_with_usage", "tokens_per_row", "tokens_histogram")
STATUS_COLORS = {"answered": "#2e7d32", "failed": "#c62828", "invalid": "#9e9e9e"}
PHASE_COLORS = {
    "validating": "#90a4ae",
    "in_progress": "#1e88e5",
    "finalizing": "#8e24aa",
    "cancelling": "#ef6c00",
}
_END_KEYS = ("completed_at", "expired_at", "cancelled_at", "failed_at")
_START_KEYS = (
    ("created_at", "validating"),
    ("in_progress_at", "in_progress"),
    ("finalizing_at", "finalizing"),
    ("cancelling_at", "cancelling"),
)
NOT_SENT_PREFIX = "not sent:"
NO_RESULT = "no result returned for this request"


def _raise_csv_limit() -> None:
    """Responses can be long: lift the csv module's 128 KiB field limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


# --------------------------------------------------------------------------- row classification

_HTTP_CODE = re.compile(r"^HTTP (\d{3})(?: ([A-Za-z0-9_.\-]+))?(?::|$)")
_CODE_PREFIX = re.compile(r"^([a-z][a-z0-9_]*): ")


def error_code_of(error: str) -> str:
    """Short error code of a results.csv ``error`` cell (the inverse of how merge writes them):
    ``invalid_input``, ``no_result``, ``malformed_result``, ``refusal``, the API's code
    (``HTTP 400 invalid_request: ...`` → ``invalid_request``; ``batch_expired: ...``), ``http_<status>``,
    else ``error``."""
    if error.startswith(NOT_SENT_PREFIX):
        return "invalid_input"
    if error.startswith(NO_RESULT):
        return "no_result"
    if error.startswith("malformed result"):
        return "malformed_result"
    if error.startswith("refusal:"):
        return "refusal"
    m = _HTTP_CODE.match(error)
    if m:
        return m.group(2) or f"http_{m.group(1)}"
    m = _CODE_PREFIX.match(error)
    return m.group(1) if m else "error"


def _int_cell(v: str | None) -> int | None:
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        return None


class _Stats:
    """Streaming counts for analyze / the report."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.tokens = {"prompt": 0, "completion": 0, "total": 0}
        self.rows_with_usage = 0
        self.row_tokens_min: int | None = None
        self.row_tokens_max: int | None = None
        self.resp_n = 0
        self.resp_sum = 0
        self.resp_min: int | None = None
        self.resp_max: int | None = None

    def add(self, status: str, code: str | None, response: str | None, p, c, t) -> None:
        self.counts["rows"] += 1
        self.counts[status] += 1
        if code is not None:
            self.codes[code] += 1
        if response is not None and status == "answered":
            n = len(response)
            self.resp_n += 1
            self.resp_sum += n
            self.resp_min = n if self.resp_min is None else min(self.resp_min, n)
            self.resp_max = n if self.resp_max is None else max(self.resp_max, n)
        if p is None and c is None and t is None:
            return
        self.tokens["prompt"] += p or 0
        self.tokens["completion"] += c or 0
        total = t if t is not None else (p or 0) + (c or 0)
        self.tokens["total"] += total
        self.rows_with_usage += 1
        self.row_tokens_min = total if self.row_tokens_min is None else min(self.row_tokens_min, total)
        self.row_tokens_max = total if self.row_tokens_max is None else max(self.row_tokens_max, total)

    def result(self) -> dict[str, Any]:
        return {
            "rows": self.counts["rows"],
            "answered": self.counts["answered"],
            "failed": self.counts["failed"],
            "invalid": self.counts["invalid"],
            "errors_by_code": dict(sorted(self.codes.items())),
            "tokens": dict(self.tokens),
            "rows_with_usage": self.rows_with_usage,
            "tokens_per_row": {"min": self.row_tokens_min, "max": self.row_tokens_max},
            "response_chars": {
                "count": self.resp_n,
                "min": self.resp_min,
                "max": self.resp_max,
                "mean": round(self.resp_sum / self.resp_n, 1) if self.resp_n else None,
            },
        }


def _iter_csv_rows(path: str | os.PathLike):
    """(status, code, response, prompt, completion, total) per row of a merged results.csv."""
    _raise_csv_limit()
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("response", "error") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a results CSV (no column(s) {', '.join(missing)})")
        for row in reader:
            error = row.get("error") or ""
            p = _int_cell(row.get("prompt_tokens"))
            c = _int_cell(row.get("completion_tokens"))
            t = _int_cell(row.get("total_tokens"))
            if not error:
                yield "answered", None, row.get("response") or "", p, c, t
                continue
            code = error_code_of(error)
            yield ("invalid" if code == "invalid_input" else "failed"), code, None, p, c, t


def _endpoint_of(line: Any) -> str:
    """Endpoint of a raw output line, guessed from its response body."""
    body = (line.get("response") or {}).get("body") if isinstance(line, dict) else None
    if isinstance(body, dict):
        if body.get("object") == "response" or "output" in body:
            return "/v1/responses"
        if body.get("object") == "list" or "data" in body:
            return "/v1/embeddings"
    return "/v1/chat/completions"


def _iter_jsonl_rows(path: str | os.PathLike):
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                yield "failed", "malformed_result", None, None, None, None
                continue
            o = parse_result_line(obj, _endpoint_of(obj))
            if o.ok:
                yield "answered", None, o.response, o.prompt_tokens, o.completion_tokens, o.total_tokens
            else:
                code = o.error_code or "error"
                yield "failed", code, None, o.prompt_tokens, o.completion_tokens, o.total_tokens


def _iter_rows(path: str | os.PathLike):
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return _iter_csv_rows(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _iter_jsonl_rows(path)
    raise ValueError(f"{path}: expected a results .csv or a Batch API output/error .jsonl file")


def analyze(results_paths: list[str | os.PathLike]) -> dict[str, Any]:
    """Summary of merged ``results.csv`` files and/or raw output/error ``.jsonl`` files (by extension).

    CSV rows: answered when ``error`` is empty; invalid when it starts with ``not sent:``; else failed,
    with the code read back from the error text (``error_code_of``). JSONL lines: parsed like the merge
    does (endpoint guessed per line); every line is one request (a request that appears in several files
    counts several times). Returns ``{"files", "rows", "answered", "failed", "invalid",
    "errors_by_code", "tokens": {"prompt", "completion", "total"}, "rows_with_usage", "tokens_per_row":
    {"min", "max"}, "response_chars": {"count", "min", "max", "mean"}, "per_file": [{"file", "rows",
    "answered", "failed", "invalid"}]}``.
    """
    total = _Stats()
    per_file = []
    for path in results_paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: file not found")
        mine = _Stats()
        for rec in _iter_rows(path):
            total.add(*rec)
            mine.add(*rec)
        r = mine.result()
        per_file.append({"file": str(path), **{k: r[k] for k in ("rows", "answered", "failed", "invalid")}})
    return {"files": [str(p) for p in results_paths], **total.result(), "per_file": per_file}


def format_analysis(a: dict[str, Any]) -> str:
    """Plain-text rendering of ``analyze``'s result (what the CLI prints)."""
    lines = [
        f"files: {', '.join(a['files'])}",
        f"rows: {a['rows']}  answered: {a['answered']}  failed: {a['failed']}  invalid: {a['invalid']}",
    ]
    if a["errors_by_code"]:
        lines.append("errors by code:")
        lines += [f"  {code}: {n}" for code, n in sorted(a["errors_by_code"].items(), key=lambda x: -x[1])]
    t = a["tokens"]
    lines.append(
        f"tokens: prompt {t['prompt']:,}  completion {t['completion']:,}  total {t['total']:,} "
        f"({a['rows_with_usage']} rows with usage)"
    )
    r = a["response_chars"]
    if r["count"]:
        lines.append(f"response length (chars): min {r['min']}  mean {r['mean']}  max {r['max']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- batches


def _ts(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def batch_phases(batch: dict[str, Any], now: float | None = None) -> list[tuple[str, float, float]]:
    """``[(phase, start, end)]`` of one batch summary from its ``*_at`` Unix timestamps.

    Phases: ``validating`` (created → in_progress, or → the end), ``in_progress``, ``finalizing``,
    ``cancelling``; each ends where the next known one starts, the last at ``completed_at`` /
    ``expired_at`` / ``cancelled_at`` / ``failed_at``. A batch with no end yet runs to ``now`` (when
    given; else its last phase is left out).
    """
    starts = sorted((t, name) for key, name in _START_KEYS if (t := _ts(batch.get(key))) is not None)
    ends = [t for key in _END_KEYS if (t := _ts(batch.get(key))) is not None]
    end = min(ends) if ends else now
    out = []
    for i, (t, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else end
        if stop is None:
            break
        out.append((name, t, max(t, stop)))
    return out


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# --------------------------------------------------------------------------- SVG plots

_FONT = 'font-family="sans-serif" font-size="12"'


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _svg_open(kind: str, title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" data-plot="{kind}" role="img" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{_e(title)}</title>",
    ]


def _svg_empty(kind: str, title: str, message: str) -> str:
    parts = _svg_open(kind, title, 640, 60)
    parts.append(f'<text x="10" y="35" {_FONT} fill="#666">{_e(message)}</text></svg>')
    return "\n".join(parts)


def svg_status(counts: dict[str, int]) -> str:
    """Horizontal bars: answered / failed / invalid."""
    title = "Rows by outcome"
    items = [(k, int(counts.get(k) or 0)) for k in ("answered", "failed", "invalid")]
    total = sum(v for _, v in items)
    if not total:
        return _svg_empty("status", title, "no rows")
    width, label_w, bar_w, row_h = 640, 90, 430, 28
    parts = _svg_open("status", title, width, row_h * len(items) + 10)
    for i, (name, v) in enumerate(items):
        y = 5 + i * row_h
        w = bar_w * v / total
        parts.append(f'<text x="{label_w - 6}" y="{y + 17}" text-anchor="end" {_FONT}>{name}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 6}" fill="{STATUS_COLORS[name]}">'
            f"<title>{name}: {v}</title></rect>"
        )
        parts.append(
            f'<text x="{label_w + w + 6:.1f}" y="{y + 17}" {_FONT}>{v:,} ({100 * v / total:.1f} %)</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _nice_step(span: float, ticks: int = 5) -> int:
    """A whole step of 1, 2 or 5 times a power of ten that cuts ``span`` into about ``ticks`` parts."""
    raw = max(span / ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return int(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))


def svg_histogram(bins: list[tuple[int, int, int]], xlabel: str = "tokens per row") -> str:
    """Vertical bars; ``bins`` = [(low, high inclusive, count)]. Both axes carry a few round-numbered
    ticks (``data-tick="x"``/``"y"`` lines with a label each): counts from 0 up, token values from the
    first bin's low to the last bin's high."""
    title = f"Histogram of {xlabel}"
    if not bins or not any(n for _, _, n in bins):
        return _svg_empty("tokens", title, "no token usage in the results")
    width, height, left, bottom, top = 640, 240, 50, 40, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    base = top + plot_h
    peak = max(n for _, _, n in bins)
    step = _nice_step(peak)
    y_max = step * math.ceil(peak / step)  # the top tick: bars are drawn against it
    bw = plot_w / len(bins)
    parts = _svg_open("tokens", title, width, height)
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>')
    for v in range(0, y_max + 1, step):
        y = base - plot_h * v / y_max
        parts.append(
            f'<line data-tick="y" x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
        )
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" {_FONT}>{v}</text>')
    for i, (lo, hi, n) in enumerate(bins):
        h = plot_h * n / y_max
        x = left + i * bw
        rng = f"{lo}" if lo == hi else f"{lo}-{hi}"
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{base - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
            f'fill="#1e88e5"><title>{rng}: {n} rows</title></rect>'
        )
    # x: the ends, and round values between them not crowding an end label
    lo0, hi_last = bins[0][0], bins[-1][1]
    span = hi_last + 1 - lo0  # the bins cover [lo0, hi_last + 1)
    step = _nice_step(span)
    inner = range((lo0 // step + 1) * step, hi_last, step)
    values = [lo0] + [v for v in inner if min(v - lo0, hi_last - v) > span / 10] + [hi_last]
    for v in dict.fromkeys(values):
        x = left + plot_w * ((v - lo0 + (1 if v == hi_last else 0)) / span)
        anchor = "start" if v == lo0 else "end" if v == hi_last else "middle"
        if lo0 == hi_last:  # one bin of one value: its label under the middle of its bar
            x, anchor = left + plot_w / 2, "middle"
        parts.append(
            f'<line data-tick="x" x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#333"/>'
        )
        parts.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="{anchor}" {_FONT}>{v}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" {_FONT}>{_e(xlabel)}</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def svg_timeline(batches: list[dict[str, Any]] | None) -> str:
    """One row per batch, one bar per phase, x = time since the first batch was created."""
    title = "Batch timeline (time in each status)"
    rows = []
    for b in batches or ():
        phases = batch_phases(b)
        if phases:
            rows.append((b, phases))
    if not rows:
        return _svg_empty("timeline", title, "no batch timing given")
    t0 = min(p[1] for _, ph in rows for p in ph)
    t1 = max(p[2] for _, ph in rows for p in ph)
    span = max(t1 - t0, 1.0)
    width, left, right, row_h, top = 760, 200, 20, 24, 10
    plot_w = width - left - right
    height = top + row_h * len(rows) + 50
    parts = _svg_open("timeline", title, width, height)
    for i, (b, phases) in enumerate(rows):
        y = top + i * row_h
        label = f"{b.get('id', '?')}" + (f" (round {b['round']})" if b.get("round") is not None else "")
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" {_FONT}>{_e(label[:30])}</text>')
        for name, s, e in phases:
            x = left + plot_w * (s - t0) / span
            w = max(plot_w * (e - s) / span, 1.0)
            color = PHASE_COLORS.get(name, "#555")
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{color}">'
                f"<title>{_e(b.get('id', '?'))} {name}: {_dur(e - s)}</title></rect>"
            )
    axis_y = top + row_h * len(rows) + 4
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
    parts.append(f'<text x="{left}" y="{axis_y + 14}" {_FONT}>0</text>')
    parts.append(f'<text x="{left + plot_w}" y="{axis_y + 14}" text-anchor="end" {_FONT}>{_dur(span)}</text>')
    x = left
    for name, color in PHASE_COLORS.items():
        parts.append(f'<rect x="{x}" y="{axis_y + 24}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{axis_y + 33}" {_FONT}>{name}</text>')
        x += 110
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the page


def _histogram(
    path: str | os.PathLike, lo: int, hi: int, nbins: int = HIST_BINS
) -> list[tuple[int, int, int]]:
    """Second pass over results.csv: counts of tokens per row in ``nbins`` integer bins over lo..hi."""
    totals: Counter[int] = Counter()
    for _status, _code, _resp, p, c, t in _iter_csv_rows(path):
        if p is None and c is None and t is None:
            continue
        totals[t if t is not None else (p or 0) + (c or 0)] += 1
    return [tuple(b) for b in token_histogram(totals, nbins)]


def _pct_diff(actual: float | None, estimate: float | None) -> str:
    if actual is None or estimate is None or estimate == 0:
        return ""
    return f"{100 * (actual - estimate) / estimate:+.1f} %"


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"${v:,.6f}".rstrip("0").rstrip(".")
    return f"{v:,}" if isinstance(v, int) else _e(v)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:60em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.kpi{display:flex;gap:1em}.kpi div{border:1px solid #ccc;padding:.6em 1em;border-radius:4px}
.kpi b{display:block;font-size:1.4em}.note{color:#555;font-size:.9em}
"""


def _load_json(v: Any) -> Any:
    if v is None or isinstance(v, (dict, list)):
        return v
    return json.loads(Path(v).read_text(encoding="utf-8"))


def _problems_html(report: dict[str, Any]) -> list[str]:
    """The "Problems" section: what the service returned that does not add up (duplicate, unknown or
    unreadable result lines) and what the run could not finish (``problems``); nothing when all is well."""
    rows = []
    dup = report.get("duplicate_results") or 0
    if dup:
        named = ", ".join(report.get("duplicate_ids") or [])
        rows.append(["duplicate result lines", f"{dup:,}", _e(f"ids: {named}" if named else "")])
    if report.get("unmatched_results"):
        rows.append(["result lines for ids not in this run", f"{report['unmatched_results']:,}", ""])
    if report.get("malformed_lines"):
        where = "; ".join(
            f"{b['file']} line {b['line']}" + (f" ({b['custom_id']})" if b.get("custom_id") else "")
            for b in report.get("broken_lines") or []
        )
        rows.append(["unreadable result lines", f"{report['malformed_lines']:,}", _e(where)])
    for problem in report.get("problems") or []:
        rows.append(["run problem", "", _e(problem)])
    if not rows:
        return []
    return ["<h3>Problems</h3>", _table(["what", "lines", "details"], rows, "problems")]


def actual_cost(
    tokens: dict[str, Any], model: str | None, prices: dict[str, Any] | None, estimate: dict[str, Any] | None
) -> dict[str, Any]:
    """What the run's ``tokens`` (``{"prompt", "completion"}``) cost at ``model``'s prices in ``prices``
    (default: ``load_prices()``), against the estimate: report.json's ``cost_usd``, ``{"actual_batch",
    "actual_standard", "estimated_batch_expected", "estimated_batch_max", "difference_pct" (actual vs
    expected Batch cost), "price" (the table entry used)}``. Figures are None when unknown (no model, no
    price for it, no estimate)."""
    price = price_for(prices if prices is not None else load_prices(), model) if model else None
    actual = standard = None
    if price is not None:
        actual = token_cost(price, tokens["prompt"], tokens["completion"], batch=True)
        standard = token_cost(price, tokens["prompt"], tokens["completion"], batch=False)
    batch_estimate = ((estimate or {}).get("cost") or {}).get("batch") or {}
    expected = batch_estimate.get("expected")
    return {
        "actual_batch": actual,
        "actual_standard": standard,
        "estimated_batch_expected": expected,
        "estimated_batch_max": batch_estimate.get("max"),
        "difference_pct": round((actual - expected) / expected * 100, 1) if actual and expected else None,
        "price": price,
    }


def savings(saved: dict[str, Any] | None, price: dict[str, Any] | None) -> dict[str, Any]:
    """What was not spent, from merge's ``saved`` (``{"from_duplicates", "from_cache"}``, each ``{"rows",
    "prompt", "completion"}``: the tokens of the answers reused) at Batch prices of ``price`` (None:
    dollars unknown): report.json's ``savings``, the same with ``batch_usd`` in each and in total."""
    out: dict[str, Any] = {}
    total: float | None = 0.0
    for kind in ("from_duplicates", "from_cache"):
        part = dict((saved or {}).get(kind) or {"rows": 0, "prompt": 0, "completion": 0})
        usd = None
        if price is not None:
            usd = token_cost(price, part.get("prompt") or 0, part.get("completion") or 0, batch=True)
        part["batch_usd"] = usd
        total = None if usd is None or total is None else round(total + usd, 6)
        out[kind] = part
    out["rows"] = sum(out[k].get("rows") or 0 for k in ("from_duplicates", "from_cache"))
    out["batch_usd"] = total
    return out


#: Keys of an API batch object that stay out of report.json (error lists and user metadata can be large,
#: and ``files`` is the pipeline's own bookkeeping).
BATCH_KEYS_LEFT_OUT = ("errors", "metadata", "files")


def finish_report(
    results_csv: str | os.PathLike,
    report: dict[str, Any],
    *,
    estimate: dict[str, Any] | str | os.PathLike | None = None,
    batches: list[dict[str, Any]] | None = None,
    model: str | None = None,
    prices: dict[str, Any] | None = None,
    problems: list[str] | tuple[str, ...] = (),
    shown: str | None = None,
) -> dict[str, Any]:
    """Finish merge's ``report`` (:func:`batchpipe.merge.merge_results`' dict) for the merged
    ``results_csv`` and write ``report.html`` then ``report.json`` beside it; return the finished report.

    Added: ``model`` (default: the estimate's), ``cost_usd`` (:func:`actual_cost` of the report's tokens
    at ``prices``, default ``load_prices()``, computed here once and handed to the page), ``savings``
    (:func:`savings`: what rows answered by a repeated request or from the cache did not cost), ``estimate``
    (its ``prompt_tokens``, ``image_tokens``, ``output_tokens_max``; ``estimate`` is estimate.json's dict
    or path), ``batches`` (the batch summaries, without :data:`BATCH_KEYS_LEFT_OUT`); ``problems`` (what
    the run could not finish, e.g. a broken download) go before merge's own. ``shown``: the folder where
    the files are stored (a URL for object storage): ``results_csv`` and ``report`` then name the files
    there, and the page names the results by it.

    Each file is written to a temporary name and renamed into place: a write cut short (disk full) leaves
    the previous report.json whole and no partial file. The page is written first, so a report.json
    written by this function always has its page beside it.
    """
    results_csv = Path(results_csv)
    estimate = _load_json(estimate)
    full = dict(report)
    full["model"] = model = model or (estimate or {}).get("model")
    full["cost_usd"] = cost = actual_cost(report["tokens"], model, prices, estimate)
    full["savings"] = savings(report.get("saved"), cost.get("price"))
    full["estimate"] = {
        k: (estimate or {}).get(k) for k in ("prompt_tokens", "image_tokens", "output_tokens_max")
    }
    full["batches"] = [{k: v for k, v in b.items() if k not in BATCH_KEYS_LEFT_OUT} for b in batches or ()]
    full["problems"] = list(problems) + list(report.get("problems") or [])
    if shown:
        full["results_csv"], full["report"] = f"{shown}/{results_csv.name}", f"{shown}/{REPORT_NAME}"
        if full.get("results_parquet"):
            full["results_parquet"] = f"{shown}/{Path(full['results_parquet']).name}"
    write_report_html(
        results_csv, full, results_csv.with_name("report.html"), estimate=estimate, batches=full["batches"],
        model=model, shown=full["results_csv"], cost=cost,
    )  # fmt: skip
    _write_atomically(
        results_csv.with_name(REPORT_NAME), json.dumps(full, ensure_ascii=False, indent=2) + "\n"
    )
    return full


def write_report_html(
    results_csv: str | os.PathLike,
    report_json: str | os.PathLike | dict | None,
    out_html: str | os.PathLike,
    estimate: dict[str, Any] | str | os.PathLike | None = None,
    batches: list[dict[str, Any]] | None = None,
    *,
    model: str | None = None,
    prices: dict[str, Any] | None = None,
    shown: str | None = None,
    cost: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML report of a run and return its path.

    ``results_csv``: the merged CSV, streamed twice (counts and token sums, then the histogram) unless
    ``report_json`` holds merge's usage counts (``rows_with_usage``, ``tokens_per_row``,
    ``tokens_histogram``: merge counts them as it writes the rows), which are then shown as they are.
    ``report_json``: merge's report (path or dict) — its counts and error codes are shown; None: they are
    derived from the CSV. ``estimate``: ``estimate_build``'s dict (or estimate.json) to compare tokens and
    cost with. ``batches``: batch summaries (``id``, ``status``, ``round``, ``request_counts``, ``*_at``
    Unix timestamps) for the time-per-status table and the timeline. The actual cost is computed from the
    usage columns at Batch prices of ``model`` (default: the estimate's) from ``prices`` (default:
    ``load_prices()``), unless ``cost`` gives the figures already computed (:func:`actual_cost`'s dict,
    as report.json's ``cost_usd`` holds them): then the page shows those and prices nothing.
    ``shown``: how the results file is named on the page (default ``results_csv``; e.g. its URL when it
    is stored in object storage).
    """
    report = _load_json(report_json) if report_json is not None else None
    estimate = _load_json(estimate)
    if report is not None and all(k in report for k in _MERGE_USAGE):
        # merge counted the usage while it wrote the rows: the file is not read again
        a = {k: report[k] for k in ("rows", "answered", "failed", "invalid", "errors_by_code", "tokens")}
        a.update({k: report[k] for k in _MERGE_USAGE})
        bins = [tuple(b) for b in report["tokens_histogram"]]
    else:
        stats = _Stats()
        for rec in _iter_csv_rows(results_csv):
            stats.add(*rec)
        a = stats.result()
        bins = []
        if a["tokens_per_row"]["min"] is not None:
            bins = _histogram(results_csv, a["tokens_per_row"]["min"], a["tokens_per_row"]["max"])
    counts = {k: (report or a).get(k, a[k]) for k in ("rows", "answered", "failed", "invalid")}
    codes = (report or {}).get("errors_by_code", a["errors_by_code"])
    tokens = a["tokens"]

    model = model or (estimate or {}).get("model")
    if cost is None:
        cost = actual_cost(tokens, model, prices, estimate)
    price, actual_batch, actual_std = cost.get("price"), cost.get("actual_batch"), cost.get("actual_standard")

    p: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Batch run report: {_e(Path(results_csv).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch run report</h1>",
        f'<p class="note">results: {_e(shown or results_csv)}'
        + (f" · model {_e(model)}" if model else "")
        + (f" · batches: {_e(', '.join(report['batch_ids']))}" if (report or {}).get("batch_ids") else "")
        + "</p>",
        '<div class="kpi">',
    ]
    for k in ("rows", "answered", "failed", "invalid"):
        p.append(f'<div id="count-{k}"><b>{counts[k]:,}</b>{k}</div>')
    p.append("</div>")
    p.append("<h2>Outcomes</h2>")
    p.append(svg_status(counts))
    copied = (report or {}).get("answered_from_rows") or 0
    if copied:
        p.append(
            f'<p class="note" id="sent-once">{copied:,} row(s) repeat an earlier row\'s request: sent once, '
            "answered from that row (<code>answered_from</code>), billed once.</p>"
        )
    from_cache = (report or {}).get("answered_from_cache") or 0
    if from_cache:
        p.append(
            f'<p class="note" id="from-cache">{from_cache:,} row(s) answered from the answer cache '
            "(<code>answered_from</code>: cache): not sent, not billed again.</p>"
        )
    if codes:
        p.append("<h3>Errors by code</h3>")
        rows = [[_e(c), f"{n:,}"] for c, n in sorted(codes.items(), key=lambda x: -x[1])]
        p.append(_table(["code", "rows"], rows, "codes"))

    structured = (report or {}).get("structured")
    if structured:
        p.append("<h3>Structured answers</h3>")
        rows = [[_e(", ".join(structured.get("columns") or [])), f"{structured.get('parsed', 0):,}",
                 f"{structured.get('not_parsed', 0):,}"]]  # fmt: skip
        p.append(_table(["answer columns", "parsed", "not parsed"], rows, "structured"))

    p.extend(_problems_html(report or {}))

    p.append("<h2>Tokens and cost</h2>")
    est_cost = ((estimate or {}).get("cost") or {}).get("batch") or {}
    est_std = ((estimate or {}).get("cost") or {}).get("standard") or {}
    rows = [
        [
            "prompt tokens",
            _num((estimate or {}).get("prompt_tokens")),
            _num(tokens["prompt"]),
            _pct_diff(tokens["prompt"], (estimate or {}).get("prompt_tokens")),
        ],
        [
            "output tokens (expected)",
            _num((estimate or {}).get("output_tokens_expected")),
            _num(tokens["completion"]),
            _pct_diff(tokens["completion"], (estimate or {}).get("output_tokens_expected")),
        ],
        ["output tokens (at most)", _num((estimate or {}).get("output_tokens_max")), "", ""],
        ["total tokens", "", _num(tokens["total"]), ""],
        [
            "cost at Batch prices (USD)",
            _num(est_cost.get("expected")),
            _num(actual_batch),
            _pct_diff(actual_batch, est_cost.get("expected")),
        ],
        [
            "cost at standard prices (USD)",
            _num(est_std.get("expected")),
            _num(actual_std),
            _pct_diff(actual_std, est_std.get("expected")),
        ],
    ]
    p.append(_table(["", "estimate", "actual", "difference"], rows, "tokens"))
    note = (
        f"Actual figures: usage reported for {a['rows_with_usage']:,} rows. The estimate covers every "
        "request sent; requests that failed without usage are not billed."
    )
    if price is None:
        note += " Actual cost unknown: no price for " + (
            f"model {_e(model)}." if model else "an unknown model."
        )
    else:
        note += (
            f" Prices as of {_e(price.get('as_of'))}: {price['input']} / {price.get('output')} "
            f"{_e(price['currency'])} per {price['per']:,} input / output tokens, Batch "
            f"{round((1 - price['batch_discount']) * 100, 2):g} % of that."
        )
    p.append(f'<p class="note">{note}</p>')
    saved = (report or {}).get("savings")
    if saved is None and (report or {}).get("saved"):
        saved = savings(report["saved"], price)
    if saved and saved.get("rows"):
        p.append("<h3>Not spent</h3>")
        rows = [
            [label, f"{part.get('rows', 0):,}", _num(part.get("prompt")), _num(part.get("completion")),
             _num(part.get("batch_usd"))]
            for label, part in (("answered by a repeated request", saved["from_duplicates"]),
                                ("answered from the cache", saved["from_cache"]))
            if part.get("rows")
        ]  # fmt: skip
        rows.append(["total", f"{saved['rows']:,}", "", "", _num(saved.get("batch_usd"))])
        heads = ["", "rows", "prompt tokens", "output tokens", "USD at Batch prices"]
        p.append(_table(heads, rows, "savings"))
        p.append(
            '<p class="note">What these rows would have cost: the tokens of the answers they reuse, at '
            "this run's Batch prices.</p>"
        )
    p.append("<h3>Tokens per row</h3>")
    p.append(svg_histogram(bins))

    p.append("<h2>Batches</h2>")
    p.append(svg_timeline(batches))
    if batches:
        rows = []
        phase_names = list(PHASE_COLORS)
        for b in batches:
            spent = Counter()
            for name, s, e in batch_phases(b):
                spent[name] += e - s
            rc = b.get("request_counts") or {}
            rows.append(
                [_e(b.get("id", "")), _e(b.get("round", "")), _e(b.get("status", ""))]
                + [_e(rc.get(k, "")) for k in ("total", "completed", "failed")]
                + [_dur(spent[n]) if n in spent else "" for n in phase_names]
                + [_dur(sum(spent.values())) if spent else ""]
            )
        p.append(
            _table(
                ["batch", "round", "status", "requests", "completed", "failed", *phase_names, "total"],
                rows,
                "batches",
            )
        )
    if estimate and estimate.get("shards"):
        p.append("<h3>Shards (estimate)</h3>")
        rows = [
            [
                _e(s.get("index")),
                _num(s.get("requests")),
                _num(s.get("prompt_tokens")),
                _num(s.get("image_tokens")),
            ]
            for s in estimate["shards"]
        ]
        p.append(_table(["shard", "requests", "prompt tokens", "image tokens"], rows, "shards"))
    if estimate and estimate.get("notes"):
        p.append(
            "<h3>Estimate notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in estimate["notes"]) + "</ul>"
        )
    p.append("</body></html>")
    return _write_page(Path(out_html), p)


def write_overview_html(
    analysis: dict[str, Any], pages: list[tuple[str, Path]], out_html: str | os.PathLike
) -> Path:
    """Write the page over several runs: their totals, then one line per run (its counts, a link to its
    own report page, ``pages`` = ``[(results file, page path)]`` in ``analysis["per_file"]`` order)."""
    p = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Batch runs: {len(pages)} results files</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Batch runs: {len(pages)} results files</h1>",
        '<p class="note">Totals over all files; each run has its own report page (outcomes, tokens and cost '
        "against its estimate, batches).</p>",
        '<div class="kpi">',
    ]
    for k in ("rows", "answered", "failed", "invalid"):
        p.append(f'<div id="count-{k}"><b>{analysis[k]:,}</b>{k}</div>')
    p.append("</div>")
    p.append(svg_status(analysis))
    out = Path(out_html)
    rows = []
    for per, (results, page) in zip(analysis["per_file"], pages, strict=True):
        href = _e(quote(os.path.relpath(page, out.parent)))
        rows.append(
            [_e(results)] + [f"{per[k]:,}" for k in ("rows", "answered", "failed", "invalid")]
            + [f'<a href="{href}">{_e(page.name)}</a>']
        )  # fmt: skip
    p.append("<h2>Runs</h2>")
    p.append(_table(["results", "rows", "answered", "failed", "invalid", "report"], rows, "runs"))
    p.append("</body></html>")
    return _write_page(out, p)


def _write_page(out: Path, parts: list[str]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomically(out, "\n".join(parts) + "\n")


def _write_atomically(out: Path, text: str) -> Path:
    """Write ``text`` to ``out`` through a temporary file renamed into place (removed if the write fails)."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

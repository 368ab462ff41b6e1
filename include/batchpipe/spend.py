"""What the team spent on the Batch API: one small summary per pipeline run (:func:`run_summary`, what
the merge records for Airflow), filtered and totalled (:func:`spend`), drawn as a self-contained page
(:func:`spend_html`: no script, no CDN, links relative so the page works under any base URL).

Nothing here reads files or Airflow: the caller gives the summaries (each with the run's ``dag_id``,
``run_id``, ``date`` and ``state`` added) and gets numbers or HTML back.
"""

from __future__ import annotations

import html
from collections import defaultdict
from datetime import date as Date
from typing import Any
from urllib.parse import quote

#: Keys of a run summary (plus ``dag_id``, ``run_id``, ``date``, ``state`` added by the caller).
SUMMARY_KEYS = (
    "model", "endpoint", "input", "rows", "answered", "failed", "invalid", "prompt_tokens",
    "completion_tokens", "cost_usd", "estimated_usd", "saved_usd", "saved_rows", "problems",
    "results_csv", "report_html", "storage_conn_id",
)  # fmt: skip


def run_summary(report: dict[str, Any], *, input_csv: str, storage_conn_id: str | None) -> dict[str, Any]:
    """The spend summary of a finished report (:func:`batchpipe.report.finish_report`'s dict): counts,
    tokens billed, actual and estimated Batch cost, what was not spent (repeats, cache), where the
    results and the page are. Small: it travels in XCom and in the results Asset's events."""
    cost = report.get("cost_usd") or {}
    savings = report.get("savings") or {}
    tokens = report.get("tokens") or {}
    results_csv = str(report.get("results_csv") or "")
    return {
        "model": report.get("model"),
        "endpoint": report.get("endpoint"),
        "input": input_csv,
        **{k: int(report.get(k) or 0) for k in ("rows", "answered", "failed", "invalid")},
        "prompt_tokens": int(tokens.get("prompt") or 0),
        "completion_tokens": int(tokens.get("completion") or 0),
        "cost_usd": cost.get("actual_batch"),
        "estimated_usd": cost.get("estimated_batch_expected"),
        "saved_usd": savings.get("batch_usd"),
        "saved_rows": int(savings.get("rows") or 0),
        "problems": len(report.get("problems") or []),
        "results_csv": results_csv,
        "report_html": results_csv.rsplit("/", 1)[0] + "/report.html" if results_csv else None,
        "storage_conn_id": storage_conn_id,
    }


_NUMBERS = ("rows", "answered", "failed", "invalid", "prompt_tokens", "completion_tokens", "saved_rows",
            "problems")  # fmt: skip
_MONEY = ("cost_usd", "estimated_usd", "saved_usd")
_TEXTS = ("model", "endpoint", "input", "results_csv", "report_html", "storage_conn_id")


def clean_summary(value: Any) -> dict[str, Any] | None:
    """A run summary as read back from a record someone else could have written: None unless a dict;
    counts as whole numbers >= 0 (else 0), money as finite numbers >= 0 (else None: unknown), texts at most
    1,000 characters (else None). The page and the sums never meet another type."""
    import math

    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}
    for k in _NUMBERS:
        v = value.get(k)
        out[k] = v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**15 else 0
    for k in _MONEY:
        v = value.get(k)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1e12
        out[k] = float(v) if ok else None
    for k in _TEXTS:
        v = value.get(k)
        out[k] = v if isinstance(v, str) and len(v) <= 1000 else None
    return out


def _add(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return None
    return round((a or 0) + (b or 0), 6)


def spend(
    runs: list[dict[str, Any]],
    *,
    start: Date | None = None,
    end: Date | None = None,
    dag_id: str | None = None,
    model: str | None = None,
    input_contains: str | None = None,
) -> dict[str, Any]:
    """The runs kept by the filters (``date`` from ``start`` to ``end`` inclusive, exact ``dag_id`` and
    ``model``, ``input_contains`` a substring of the input's name), newest first, with ``totals`` (counts,
    tokens, cost, estimated, saved), ``by_model`` (the same per model) and ``daily`` (``{day: {model:
    cost}}``, the chart's data). A cost the price table did not know stays out of the sums (``unpriced``
    counts those runs)."""
    kept = []
    for run in runs:
        day = run.get("date")
        if start and (day is None or day < start):
            continue
        if end and (day is None or day > end):
            continue
        if dag_id and run.get("dag_id") != dag_id:
            continue
        if model and run.get("model") != model:
            continue
        if input_contains and input_contains.lower() not in str(run.get("input") or "").lower():
            continue
        kept.append(run)
    kept.sort(key=lambda r: (r.get("date") or Date.min, r.get("run_id") or ""), reverse=True)

    def totals(of: list[dict[str, Any]]) -> dict[str, Any]:
        t: dict[str, Any] = {"runs": len(of), "unpriced": 0}
        for k in (
            "rows",
            "answered",
            "failed",
            "invalid",
            "prompt_tokens",
            "completion_tokens",
            "saved_rows",
        ):
            t[k] = sum(int(r.get(k) or 0) for r in of)
        for k in ("cost_usd", "estimated_usd", "saved_usd"):
            value = None
            for r in of:
                value = _add(value, r.get(k))
            t[k] = value
        t["unpriced"] = sum(1 for r in of if r.get("cost_usd") is None)
        return t

    models: dict[str, list[dict[str, Any]]] = defaultdict(list)
    daily: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for run in kept:
        name = str(run.get("model") or "?")
        models[name].append(run)
        if run.get("date") is not None and run.get("cost_usd") is not None:
            daily[run["date"].isoformat()][name] += run["cost_usd"]
    return {
        "runs": kept,
        "totals": totals(kept),
        "by_model": {name: totals(of) for name, of in sorted(models.items())},
        "daily": {day: dict(costs) for day, costs in sorted(daily.items())},
    }


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _usd(v: float | None) -> str:
    if v is None:
        return "—"
    return f"${v:,.2f}" if v >= 1 else "$" + (f"{v:.6f}".rstrip("0").rstrip(".") or "0")


def _n(v: Any) -> str:
    return f"{int(v or 0):,}"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}th{background:#f4f4f4}.note{color:#666}
form{display:flex;gap:10px;flex-wrap:wrap;align-items:end;margin-bottom:12px}label{display:flex;
flex-direction:column;font-size:12px;color:#555}.kpi{display:flex;gap:24px}
.kpi b{display:block;font-size:20px}"""

_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def svg_daily(daily: dict[str, dict[str, float]]) -> str:
    """Daily Batch spend, one bar per day stacked by model, as inline SVG."""
    if not daily:
        return '<p class="note" id="no-daily">No priced runs in this range.</p>'
    days = list(daily)
    models = sorted({m for costs in daily.values() for m in costs})
    color = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(models)}
    top = max(sum(costs.values()) for costs in daily.values()) or 1.0
    bar, gap, height, left = 28, 8, 160, 70
    width = max(left + len(days) * (bar + gap) + 10, left + len(models) * 150)  # bars, or the legend
    parts = [
        '<svg xmlns="http://www.w3.org/2000/svg" id="daily" role="img" '
        f'width="{width}" height="{height + 60}"'
        ' aria-label="daily Batch spend by model">',
        f'<text x="4" y="14" font-size="11">{_e(_usd(top))}</text>',
        f'<line x1="{left - 4}" y1="{height + 10}" x2="{width}" y2="{height + 10}" stroke="#999"/>',
    ]
    for i, day in enumerate(days):
        x, y = left + i * (bar + gap), height + 10
        for m in models:
            cost = daily[day].get(m, 0.0)
            h = cost / top * height
            if h > 0:
                y -= h
                parts.append(
                    f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{color[m]}">'
                    f"<title>{_e(day)} {_e(m)}: {_e(_usd(cost))}</title></rect>"
                )
        parts.append(f'<text x="{x}" y="{height + 24}" font-size="9">{_e(day[5:])}</text>')
    y = height + 40
    for j, m in enumerate(models):
        x = left + j * 150
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{color[m]}"/>')
        parts.append(f'<text x="{x + 14}" y="{y + 9}" font-size="11">{_e(m)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def report_link(dag_id: str, run_id: str) -> str:
    """The run's report page, relative to the spend page (both served by the plugin's app). Inside the UI
    the page is in a sandboxed iframe that may not navigate the whole window, so the report opens there."""
    return f"report/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


def spend_html(data: dict[str, Any], filters: dict[str, Any], choices: dict[str, list[str]]) -> str:
    """The spend page for :func:`spend`'s ``data``: the filter form (``filters`` as given; ``choices``:
    the DAG ids and models to pick from), the totals, the daily chart, the totals per model and one row
    per run linking to its report (:func:`report_link`)."""
    t = data["totals"]
    p = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Batch spend</title>',
        f"<style>{_CSS}</style></head><body><h1>Batch spend</h1>",
        '<form method="get" action="spend" id="filters">',
    ]
    for name, label, kind in (("start", "from", "date"), ("end", "to", "date")):
        p.append(f'<label>{label}<input type="{kind}" name="{name}" value="{_e(filters.get(name))}"></label>')
    for name, label in (("dag_id", "DAG"), ("model", "model")):
        opts = ['<option value="">all</option>'] + [
            f'<option value="{_e(c)}"{" selected" if c == filters.get(name) else ""}>{_e(c)}</option>'
            for c in choices.get(name) or []
        ]
        p.append(f'<label>{label}<select name="{name}">{"".join(opts)}</select></label>')
    p.append(f'<label>input contains<input name="input" value="{_e(filters.get("input"))}"></label>')
    p.append('<button type="submit">Show</button></form>')
    p.append('<div class="kpi">')
    for key, label, value in (
        ("runs", "runs", _n(t["runs"])),
        ("cost", "actual Batch cost", _usd(t["cost_usd"])),
        ("estimated", "estimated", _usd(t["estimated_usd"])),
        ("saved", "not spent (repeats, cache)", _usd(t["saved_usd"])),
        ("rows", "rows", _n(t["rows"])),
    ):
        p.append(f'<div id="total-{key}"><b>{value}</b>{label}</div>')
    p.append("</div>")
    if t["unpriced"]:
        p.append(
            f'<p class="note">{t["unpriced"]} run(s) of a model without a known price are not in the '
            "sums.</p>"
        )
    p.append("<h2>Daily spend by model</h2>")
    p.append(svg_daily(data["daily"]))
    p.append("<h2>Per model</h2>")
    rows = []
    for name, m in data["by_model"].items():
        rows.append(
            f'<tr><td class="l">{_e(name)}</td><td>{_n(m["runs"])}</td><td>{_n(m["rows"])}</td>'
            f"<td>{_n(m['prompt_tokens'])}</td><td>{_n(m['completion_tokens'])}</td><td>{_usd(m['cost_usd'])}</td>"
            f"<td>{_usd(m['estimated_usd'])}</td><td>{_usd(m['saved_usd'])}</td></tr>"
        )
    p.append(
        '<table id="models"><tr><th>model</th><th>runs</th><th>rows</th><th>prompt tokens</th>'
        "<th>output tokens</th><th>actual</th><th>estimated</th><th>not spent</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    p.append("<h2>Runs</h2>")
    rows = []
    for r in data["runs"]:
        link = report_link(r["dag_id"], r["run_id"])
        rows.append(
            f'<tr><td class="l">{_e(r.get("date"))}</td><td class="l">{_e(r["dag_id"])}</td>'
            f'<td class="l"><a href="{_e(link)}">{_e(r["run_id"])}</a></td>'
            f'<td class="l">{_e(r.get("state"))}</td><td class="l">{_e(r.get("model"))}</td>'
            f'<td class="l">{_e(r.get("input"))}</td>'
            + "".join(f"<td>{_n(r.get(k))}</td>" for k in ("rows", "answered", "failed", "invalid"))
            + f"<td>{_n(r.get('prompt_tokens'))}</td><td>{_n(r.get('completion_tokens'))}</td>"
            f"<td>{_usd(r.get('cost_usd'))}</td><td>{_usd(r.get('estimated_usd'))}</td>"
            f"<td>{_usd(r.get('saved_usd'))}</td></tr>"
        )
    p.append(
        '<table id="runs"><tr><th>date</th><th>DAG</th><th>run</th><th>state</th><th>model</th><th>input</th>'
        "<th>rows</th><th>answered</th><th>failed</th><th>invalid</th><th>prompt tokens</th>"
        "<th>output tokens</th>"
        "<th>actual</th><th>estimated</th><th>not spent</th></tr>" + "".join(rows) + "</table>"
    )
    if not data["runs"]:
        p.append('<p class="note" id="no-runs">No pipeline run with results in this selection.</p>')
    p.append(
        '<p class="note">From what each run\'s merge recorded in Airflow (XCom <code>batch_report</code>): '
        "runs you may "
        "read, whose merge landed results. Costs at the dated Batch prices the run used.</p></body></html>"
    )
    return "".join(p)

"""The run report and the spend inside the Airflow UI: the plugin's own FastAPI app (mounted by
:class:`openai_batch_airflow.plugin.OpenAIBatchPlugin` at :data:`URL_PREFIX` under Airflow's base URL).

* ``GET report/{dag_id}/{run_id}``: the "Batch report" tab of a run. A run whose merge landed shows its
  ``report.html`` (read from where it landed, a local folder or object storage, through the run's storage
  connection); a run that failed validation shows the validation message and its first bad rows; a run
  still going shows its tasks, its batches and its estimate. A run of another DAG gets a short note.
* ``GET spend``: every pipeline run's rows, tokens, actual and estimated cost and savings, filterable by
  date range, DAG, model and input name, totals per model and a daily chart (:mod:`batchpipe.spend`).

Every route enforces Airflow's own authentication (the UI's ``_token`` cookie or an ``Authorization:
Bearer`` token; none: 401) and authorization through the auth manager the api-server uses: a user who may
not read a DAG's runs may not read its report (403), and the spend page lists only the DAGs the user may
read. Everything shown comes from Airflow's records (the run, its XComs: :data:`~openai_batch_airflow.records.
REPORT_XCOM`, :data:`~openai_batch_airflow.records.VALIDATION_XCOM`, :data:`~openai_batch_airflow.records.
ESTIMATE_XCOM`, ``create_batch``'s manifests); no path ever comes from the request, and a recorded path
is read only when it names a ``report.html`` inside the allowed output roots. Pages are self-contained
(inline CSS and SVG, no script, no CDN) with relative links, so they work under a base URL path.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

log = logging.getLogger(__name__)

#: Where the app is mounted, below Airflow's base URL.
URL_PREFIX = "/openai-batch"
#: The spend page's route in the UI (``plugin/batch-spend``).
SPEND_ROUTE = "batch-spend"
#: Spend records read at most (the newest).
MAX_RUNS = 5000
#: Batches of a running run asked about per page view, and how long the page waits for their answers.
MAX_LIVE_BATCHES = 64
LIVE_SECONDS = 10.0

#: Largest report.html served.
MAX_REPORT_BYTES = 20 << 20
#: Tasks whose records the report tab reads.
RECORD_TASKS = ("validate_csv", "build_jsonl", "create_batch", "merge")
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
#: Every page: no script runs (a sandbox without allow-scripts; same-origin kept so the UI can follow the
#: page's own links in its frame), nothing is fetched from elsewhere, the browser sniffs no other type.
SECURITY_HEADERS = {
    "Content-Security-Policy": "sandbox allow-forms allow-same-origin; default-src 'none'; "
    "style-src 'unsafe-inline'; "
    "img-src data:; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

app = FastAPI(title="OpenAI Batch pipeline", docs_url=None, redoc_url=None, openapi_url=None)


@app.middleware("http")
async def _security_headers(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    return response


async def _user(request: Request) -> Any:
    """The caller, as Airflow's own API resolves it (``get_user``: a bearer token first, else the UI's
    ``_token`` cookie; 401 without one, 403 for a bad one). Imported here, not at module level: every
    Airflow process loads the plugin, and only the api-server serves these routes."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def _session() -> Iterator[Any]:
    from airflow.utils.session import create_session

    with create_session() as session:
        yield session


UserDep = Annotated[Any, Depends(_user)]
SessionDep = Annotated[Any, Depends(_session)]

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:16px;color:#222}pre{white-space:pre-wrap;
background:#f7f7f7;padding:8px;border:1px solid #eee}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f4f4}.error{color:#b00020}
.note{color:#666}"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    text = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(text, status_code=status)


def may_read(user: Any, dag_id: str) -> bool:
    """Whether the auth manager lets ``user`` read the runs of DAG ``dag_id`` and their XComs (the pages
    show what the runs recorded there)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    manager = get_auth_manager()
    return all(
        manager.is_authorized_dag(method="GET", access_entity=entity, details=details, user=user)
        for entity in (DagAccessEntity.RUN, DagAccessEntity.XCOM)
    )


def _records(session: Any, dag_id: str, run_id: str) -> dict[tuple[str, str], list[Any]]:
    """The run's XComs the pages read, by ``(task_id, key)`` (a mapped task's in map-index order)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    from openai_batch_airflow.records import ESTIMATE_XCOM, REPORT_XCOM, VALIDATION_XCOM

    keys = (REPORT_XCOM, VALIDATION_XCOM, ESTIMATE_XCOM, "return_value")
    rows = session.execute(
        select(XComModel.task_id, XComModel.key, XComModel.map_index, XComModel.value)
        .where(XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key.in_(keys))
        .where(XComModel.task_id.in_(RECORD_TASKS))
        .order_by(XComModel.task_id, XComModel.map_index)
    )
    out: dict[tuple[str, str], list[Any]] = {}
    for task_id, key, _, value in rows:
        out.setdefault((task_id, key), []).append(XComModel.deserialize_value(_Value(value)))
    return out


class _Value:
    def __init__(self, value: Any) -> None:
        self.value = value


def read_report_html(conf: dict[str, Any], run_id: str, summary: dict[str, Any]) -> str:
    """The run's ``report.html``: read only when the location ``merge`` recorded (``summary``) is the run's
    own folder as its conf gives it (``output_dir``, else the default output folder; ``input_csv``'s stem;
    the run folder name), inside the allowed output roots, through the conf's ``storage_conn_id``, a
    regular file of at most :data:`MAX_REPORT_BYTES`. ValueError otherwise: a record someone else wrote
    cannot make the api-server read another file."""
    from batchpipe.paths import check_within, output_roots
    from openai_batch_airflow import storage
    from openai_batch_airflow.config import OUTPUT_ROOTS_VARIABLE, run_location, variable

    if not isinstance(conf.get("input_csv"), str) or not isinstance(summary.get("report_html"), str):
        raise ValueError("the run recorded no report.html")
    location = run_location(conf, run_id) / "report.html"
    if summary["report_html"] != storage.shown(location):
        raise ValueError("the run recorded no report.html in its own folder")
    check_within(str(location), output_roots(extra=variable(OUTPUT_ROOTS_VARIABLE)), "report")
    return storage.read_capped(location, MAX_REPORT_BYTES)


def _validation_page(failure: dict[str, Any]) -> HTMLResponse:
    problems = failure.get("first_invalid")
    problems = problems[:20] if isinstance(problems, list) else []
    rows = "".join(f"<li>{_e(str(p)[:500])}</li>" for p in problems)
    body = (
        '<p class="error" id="validation-message">' + _e(str(failure.get("message"))[:4000]) + "</p>"
        + (f'<h2>First bad rows</h2><ul id="first-invalid">{rows}</ul>' if rows else "")
        + '<p class="note">Nothing was uploaded or paid for: the run stopped in '
        "<code>validate_csv</code>.</p>"
    )  # fmt: skip
    return _page("Batch report: validation failed", body)


def _progress_page(session: Any, dag_run: Any, records: dict[tuple[str, str], list[Any]]) -> HTMLResponse:
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    from openai_batch_airflow.records import ESTIMATE_XCOM

    tis = session.execute(
        select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state)
        .where(TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)
        .order_by(TaskInstance.task_id, TaskInstance.map_index)
    ).all()
    states: dict[str, dict[str, int]] = {}
    for task_id, _, state in tis:
        states.setdefault(task_id, {})
        states[task_id][str(state or "none")] = states[task_id].get(str(state or "none"), 0) + 1
    task_rows = "".join(
        f"<tr><td>{_e(t)}</td><td>{_e(', '.join(f'{n} {s}' for s, n in sorted(c.items())))}</td></tr>"
        for t, c in states.items()
    )
    shards = [
        shard
        for group in records.get(("create_batch", "return_value")) or []
        if isinstance(group, dict)
        for shard in group.get("shards") or []
        if isinstance(shard, dict)
    ]
    conf = dag_run.conf or {}
    ids = [str(s["batch_id"]) for s in shards if s.get("batch_id")]
    live = live_batches(str(conf.get("conn_id") or ""), ids, str(conf.get("provider") or "openai"))
    batch_rows = []
    for shard in shards:
        now = live.get(str(shard.get("batch_id"))) or {}
        counts = now.get("request_counts") or {}
        batch_rows.append(
            f"<tr><td>{_e(shard.get('index'))}</td><td>{_e(shard.get('batch_id') or '')}</td>"
            f"<td>{_e(shard.get('requests'))}</td><td>{_e(now.get('status') or '')}</td>"
            + "".join(f"<td>{_e(counts.get(k, ''))}</td>" for k in ("completed", "failed", "total"))
            + f"<td>{_e(shard.get('refused') or now.get('error') or '')}</td></tr>"
        )
    estimate = (records.get(("build_jsonl", ESTIMATE_XCOM)) or [None])[0]
    body = [
        f'<p id="run-state">Run state: <b>{_e(dag_run.state)}</b>. The report lands when <code>merge</code> '
        "has written the results.</p>",  # fmt: skip
        f'<h2>Tasks</h2><table id="tasks"><tr><th>task</th><th>instances</th></tr>{task_rows}</table>',
    ]
    if batch_rows:
        body.append('<h2>Batches</h2><table id="batches"><tr><th>shard</th><th>batch</th><th>requests</th>'
                    "<th>status now</th><th>completed</th><th>failed</th><th>total</th><th>problem</th></tr>"
                    + "".join(batch_rows) + "</table>"
                    '<p class="note">Status and counts as the Batch API gives them now (first-round batches; '
                    "follow-ups of resubmitted requests are in the report once merged).</p>")  # fmt: skip
    if isinstance(estimate, dict) and estimate.get("markdown"):
        body.append(f'<h2>Estimate</h2><pre id="estimate">{_e(estimate["markdown"])}</pre>')
    return _page("Batch report: run in progress", "".join(body))


def live_batches(conn_id: str, batch_ids: list[str], provider: str = "openai") -> dict[str, dict[str, Any]]:
    """The status and request counts of each batch now (at most :data:`MAX_LIVE_BATCHES`, asked at once
    through the run's connection of ``provider``, empty: its default, for at most :data:`LIVE_SECONDS`):
    ``{id: {"status", "request_counts"}}``,
    or ``{id: {"error"}}`` (redacted) for one the API would not give."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from batchpipe.paths import redact_text
    from openai_batch_airflow.hooks import batch_hook
    from openai_batch_airflow.triggers import batch_summary

    ids = [i for i in dict.fromkeys(batch_ids) if _BATCH_ID.fullmatch(i)][:MAX_LIVE_BATCHES]
    if not ids:
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        api = batch_hook(provider, conn_id or None)
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="batch-report")
    except Exception as exc:
        why = f"no client for connection {conn_id!r}: {redact_text(str(exc))[:300]}"
        return {i: {"error": why} for i in ids}
    try:
        futures = {pool.submit(api.retrieve, i): i for i in ids}
        done, _ = wait(futures, timeout=LIVE_SECONDS)
        for future, batch_id in futures.items():
            if future not in done:
                out[batch_id] = {"error": "no answer in time"}
            elif future.exception() is not None:
                out[batch_id] = {"error": redact_text(str(future.exception()))[:300]}
            else:
                summary = batch_summary(future.result())
                out[batch_id] = {
                    "status": str(summary["status"] or ""),
                    "request_counts": summary["request_counts"],
                }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # those asked end within the client's timeout
    return out


@app.get("/report/{dag_id}/{run_id}", response_class=HTMLResponse)
def report(dag_id: str, run_id: str, user: UserDep, session: SessionDep) -> HTMLResponse:
    """The "Batch report" tab of run ``run_id`` of DAG ``dag_id``."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    from batchpipe.spend import clean_summary
    from openai_batch_airflow.records import REPORT_XCOM, VALIDATION_XCOM

    if not may_read(user, dag_id):
        raise HTTPException(status_code=403, detail="Forbidden")
    dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if dag_run is None:
        return _page("Batch report", f"<p>No run {_e(run_id)} of DAG {_e(dag_id)}.</p>", status=404)
    records = _records(session, dag_id, run_id)
    failure = (records.get(("validate_csv", VALIDATION_XCOM)) or [None])[-1]
    if isinstance(failure, dict):  # (a run stopped there never merged)
        return _validation_page(failure)
    summary = clean_summary((records.get(("merge", REPORT_XCOM)) or [None])[-1])
    if summary is not None:
        try:
            return HTMLResponse(read_report_html(dict(dag_run.conf or {}), run_id, summary))
        except Exception as exc:  # moved, deleted, refused: the detail goes to the log, not to the viewer
            from batchpipe.paths import redact_text

            log.warning("report of %s %s not shown: %s", dag_id, run_id, redact_text(str(exc)))
            counts = ", ".join(f"{k} {summary[k]}" for k in ("rows", "answered", "failed", "invalid"))
            return _page("Batch report", f'<p id="counts">{_e(counts)}</p><p class="error" id="unreadable">'
                         "report.html could not be read (moved, deleted or refused; the api-server's log "
                         "says why).</p>")  # fmt: skip
    if not any(task == "build_jsonl" or task == "validate_csv" for task, _ in records):
        note = (
            '<p class="note" id="not-a-pipeline">No batch report for this run: it is not a run of the OpenAI '
            "Batch pipeline, or it has not started.</p>"
        )
        return _page("Batch report", note)
    return _progress_page(session, dag_run, records)


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(status_code=400, detail=f"{name}: not a date (YYYY-MM-DD)") from None


@app.get("/spend", response_class=HTMLResponse)
def spend_page(
    user: UserDep,
    session: SessionDep,
    start: str | None = Query(None, max_length=10),
    end: str | None = Query(None, max_length=10),
    dag_id: str | None = Query(None, max_length=250),
    model: str | None = Query(None, max_length=250),
    input: str | None = Query(None, max_length=250),
) -> HTMLResponse:
    """Every pipeline run the user may read, with its spend (:func:`batchpipe.spend.spend_html`)."""
    from batchpipe.spend import spend, spend_html

    runs = spend_records(session, user)
    data = spend(
        runs, start=_day(start, "start"), end=_day(end, "end"), dag_id=dag_id or None, model=model or None,
        input_contains=input or None,
    )  # fmt: skip
    choices = {
        "dag_id": sorted({r["dag_id"] for r in runs}),
        "model": sorted({str(r.get("model")) for r in runs if r.get("model")}),
    }
    filters = {"start": start, "end": end, "dag_id": dag_id, "model": model, "input": input}
    return HTMLResponse(spend_html(data, filters, choices))


def spend_records(session: Any, user: Any) -> list[dict[str, Any]]:
    """The run summaries (XCom :data:`~openai_batch_airflow.records.REPORT_XCOM`) of the DAGs ``user`` may
    read, newest :data:`MAX_RUNS`, each with ``dag_id``, ``run_id``, ``state`` and ``date`` (the day the
    run ended, else the day it was to run, UTC)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    from batchpipe.spend import clean_summary
    from openai_batch_airflow.records import REPORT_XCOM

    readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    allowed = [dag_id for dag_id in readable if may_read(user, dag_id)]
    if not allowed:
        return []
    rows = session.execute(
        select(
            XComModel.dag_id,
            XComModel.run_id,
            XComModel.value,
            DagRun.state,
            DagRun.end_date,
            DagRun.run_after,
        )
        .join(DagRun, DagRun.id == XComModel.dag_run_id)
        .where(XComModel.key == REPORT_XCOM, XComModel.task_id == "merge", XComModel.dag_id.in_(allowed))
        .order_by(XComModel.timestamp.desc())
        .limit(MAX_RUNS)
    )
    out = []
    for dag_id, run_id, value, state, ended, run_after in rows:
        summary = clean_summary(XComModel.deserialize_value(_Value(value)))
        if summary is None:
            continue
        when = ended or run_after
        out.append({**summary, "dag_id": dag_id, "run_id": run_id, "state": str(state or ""),
                    "date": when.date() if when is not None else None})  # fmt: skip
    return out

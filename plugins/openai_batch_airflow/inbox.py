"""Task bodies of ``openai_batch_inbox``: claim new CSVs, then settle them after their runs.

The inbox is a local folder or an object-storage URL (``s3://bucket/inbox``; connection: the URL's
own ``s3://conn@...`` or ``storage_conn_id`` in the ``defaults`` param).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from openai_batch_airflow import storage
from openai_batch_airflow.config import INBOX_ENV, INBOX_VARIABLE, fail_on_bad_input, variable
from openai_batch_airflow.params import PARAM_NAMES

log = logging.getLogger(__name__)

PIPELINE_DAG_ID = "openai_batch_pipeline"

#: The pipeline's params a sidecar may set: the pipeline DAG's own.
PIPELINE_PARAMS = PARAM_NAMES


def inbox_folder(params: dict[str, Any]) -> str:
    """Param ``inbox``, else Variable ``openai_batch_inbox``, else ``$OPENAI_BATCH_INBOX``."""
    from airflow.sdk.exceptions import AirflowFailException

    folder = params.get("inbox") or variable(INBOX_VARIABLE) or os.environ.get(INBOX_ENV)
    if not folder:
        raise AirflowFailException(
            f"no inbox folder: set the inbox param, the Variable {INBOX_VARIABLE} or ${INBOX_ENV}"
        )
    return folder


def _store(params: dict[str, Any], folder: str):
    """The inbox as an ObjectStoragePath when it is a URL, else None."""
    return storage.remote_location(folder, (params.get("defaults") or {}).get("storage_conn_id"))


def claim(
    params: dict[str, Any], run_id: str, pipeline_params: set[str], try_number: int = 1
) -> dict[str, Any]:
    """Claim every ready CSV. Returns ``{"claim", "work", "failed"}``: ``claim`` the claim's folder
    name; ``work`` one ``{"trigger_run_id", "conf", "claimed"}`` per file to process (for the mapped
    trigger; the file's own settings come from its sidecar over the inbox defaults); ``failed`` one
    ``{"name", "where", "error"}`` per file failed at claim (bad sidecar, sidecar without its CSV),
    already in ``failed/<claim>/`` beside a reason file. A key of the ``defaults`` param that a sidecar
    could not set either fails the claim before any file is touched."""
    from batchpipe.inbox import claim_name, claim_new_files, claim_new_objects, run_name
    from openai_batch_airflow.preflight import check_keys

    allowed = set(pipeline_params) - {"input_csv"}
    check_keys(params.get("defaults") or {}, allowed, "the inbox's defaults")
    folder = inbox_folder(params)
    store = _store(params, folder)
    claim_id = claim_name(run_id, try_number)
    look = {
        "min_age_seconds": float(params.get("min_age_seconds") or 0),
        "stable_seconds": float(params.get("stable_seconds") or 0),
        "allowed": allowed,
    }
    with fail_on_bad_input():
        if store is None:
            claimed = claim_new_files(folder, claim_id, **look)
        else:
            claimed = claim_new_objects(store.fs, store.path, claim_id, **look)
            for item in claimed:  # locations as URLs (the pipeline reads them from the store)
                for key in ("csv", "sidecar"):
                    item[key] = item[key] and str(store / item[key])
    result: dict[str, Any] = {"claim": claim_id, "work": [], "failed": []}
    for item in claimed:
        if item["error"]:
            result["failed"].append({"name": item["name"], "where": item["csv"] or item["sidecar"],
                                     "error": item["error"]})  # fmt: skip
            continue
        conf = {
            **(params.get("defaults") or {}),
            **item.pop("settings"),
            "input_csv": item["csv"],
            # images referenced relative to the CSV stay where they were dropped
            "image_base_dir": str(store) if store is not None else str(os.path.abspath(folder)),
        }
        run = run_name(claim_id, item["name"])
        log.info("claimed %s -> run %s", item["name"], run)
        result["work"].append({"trigger_run_id": run, "conf": conf, "claimed": item})
    if not claimed:
        log.info("inbox %s: nothing claimed this time (files that wait, if any, are listed above)", folder)
    return result


def claim_task(context: Any) -> list[dict[str, Any]]:
    """The ``claim`` task: :func:`claim`, returning the work list (the mapped ``process`` expands over
    it) and pushing the claim's name and its failed files as XComs ``claim`` and ``failed``."""
    ti = context["ti"]
    result = claim(dict(context["params"]), context["run_id"], set(PIPELINE_PARAMS), ti.try_number)
    ti.xcom_push(key="claim", value=result["claim"])
    ti.xcom_push(key="failed", value=result["failed"])
    return result["work"]


def settle_task(context: Any) -> dict:
    """The ``settle`` task: :func:`settle` of what ``claim`` pushed (nothing when claim failed)."""
    ti = context["ti"]
    claim_id = ti.xcom_pull(task_ids="claim", key="claim")
    claimed = claim_id and {
        "claim": claim_id,
        "work": ti.xcom_pull(task_ids="claim") or [],
        "failed": ti.xcom_pull(task_ids="claim", key="failed") or [],
    }
    return settle(claimed, dict(context["params"]), run_states(context), run_results(context))


def run_results(context: Any) -> Callable[[str], str | None]:
    """``results(run_id)``: where pipeline run ``run_id`` landed its results.csv (its merge's XCom)."""
    ti = context["ti"]

    def results(run_id: str) -> str | None:
        try:
            return ti.xcom_pull(task_ids="merge", dag_id=PIPELINE_DAG_ID, run_id=run_id)
        except Exception as exc:  # only decorates the outcome and the notification
            log.warning("pipeline run %s: results path not found (%s)", run_id, exc)
            return None

    return results


#: ``states(index, run_id)``: the state of the ``process`` task of map index ``index`` and the state
#: of pipeline run ``run_id`` (None: no such task instance / run).
States = Callable[[int, str], "tuple[str | None, str | None]"]


def run_states(context: Any) -> States:
    """:data:`States` from Airflow, for the settle task running in ``context``."""
    ti = context["ti"]
    tasks = ti.get_task_states(dag_id=ti.dag_id, task_ids=["process"], run_ids=[ti.run_id]).get(ti.run_id, {})

    def states(index: int, run_id: str) -> tuple[str | None, str | None]:
        try:
            run = ti.get_dagrun_state(PIPELINE_DAG_ID, run_id)
        except Exception as exc:  # no such run: the API answers with an error
            log.warning("pipeline run %s: no state (%s)", run_id, exc)
            run = None
        return _state(tasks.get(f"process_{index}")), _state(run)

    return states


def _state(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value)).lower()


def settle(
    claimed: dict[str, Any] | None,
    params: dict[str, Any],
    states: States,
    results: Callable[[str], str | None] | None = None,
) -> dict:
    """Move each claimed file to done/ or failed/: done only when both its ``process`` task (which
    triggered and waited for its own run) and its pipeline run succeeded. Fails (listing the files) when
    any file failed, here or at claim.

    Returns ``{"done", "failed", "results"}``: where the input files went, and ``results`` (from
    ``results(run_id)``) where each processed file's answers landed, ``"<file>: <results.csv>"``: what the
    success notification names."""
    from airflow.sdk.exceptions import AirflowFailException

    from batchpipe.inbox import settle as move
    from batchpipe.inbox import settle_objects

    if not claimed:
        raise AirflowFailException("the claim did not finish (see its log): nothing to settle")
    folder = inbox_folder(params)
    store = _store(params, folder)
    claim_id = claimed["claim"]
    outcome: dict[str, list[str]] = {"done": [], "failed": [w["where"] for w in claimed["failed"]],
                                     "results": []}  # fmt: skip
    reasons = [f"{w['name']}: {w['error']}" for w in claimed["failed"]]
    for index, item in enumerate(claimed["work"]):
        run = item["trigger_run_id"]
        task, state = states(index, run)
        reason = None
        if (task, state) != ("success", "success"):
            reason = f"pipeline run {run}: the process task ended {task}, the run {state or 'does not exist'}"
        where = "failed" if reason else "done"
        if store is None:
            dest = move(item["claimed"], folder, claim_id, where, reason)
        else:
            rel = _relative(store, item["claimed"])
            dest = str(store / settle_objects(store.fs, rel, store.path, claim_id, where, reason))
        log.info("%s: run %s -> %s", item["claimed"]["name"], run, dest)
        outcome[where].append(dest)
        landed = results(run) if results is not None and not reason else None
        if landed:
            outcome["results"].append(f"{item['claimed']['name']}: {landed}")
            log.info("%s: results at %s", item["claimed"]["name"], landed)
        if reason:
            reasons.append(f"{item['claimed']['name']}: {reason}")
    if reasons:
        total = len(claimed["work"]) + len(claimed["failed"])
        landed = f"; results landed: {'; '.join(outcome['results'])}" if outcome["results"] else ""
        failed = f"{len(reasons)} of {total} file(s) failed: "
        raise AirflowFailException(failed + "; ".join(reasons) + landed)
    return outcome


def _relative(store: Any, claimed: dict[str, Any]) -> dict[str, Any]:
    """A claimed item's URLs made relative to the inbox again (as :mod:`batchpipe.inbox` returns them)."""
    prefix = str(store).rstrip("/") + "/"
    return {
        k: (v[len(prefix) :] if isinstance(v, str) and v.startswith(prefix) else v)
        for k, v in claimed.items()
    }

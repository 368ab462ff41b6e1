"""Task bodies of ``openai_batch_inbox``: claim new CSVs, then settle them after their runs.

The inbox is a local folder or an object-storage URL (``s3://bucket/inbox``; connection: the URL's
own ``s3://conn@...`` or ``storage_conn_id`` in the ``defaults`` param).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

INBOX_VARIABLE = "openai_batch_inbox"
INBOX_ENV = "OPENAI_BATCH_INBOX"
PIPELINE_DAG_ID = "openai_batch_pipeline"

#: The pipeline's params a sidecar may set (kept in step by tests/test_dag_integrity.py).
PIPELINE_PARAMS = frozenset(
    "input_csv output_dir prompt_column prompt_template system_prompt image_column image_detail "
    "id_column model endpoint max_tokens temperature extra_body start_row end_row completion_window "
    "check_interval max_requests_per_batch max_batch_bytes max_image_mb keep_temp_files max_resubmits "
    "token_limit_wait max_enqueued_tokens cancel_on_kill estimate_only max_cost_usd "
    "expected_output_tokens prices image_base_dir conn_id work_dir storage_conn_id".split()
)


def inbox_folder(params: dict[str, Any]) -> str:
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowFailException

    folder = params.get("inbox") or Variable.get(INBOX_VARIABLE, default=None) or os.environ.get(INBOX_ENV)
    if not folder:
        raise AirflowFailException(
            f"no inbox folder: set the inbox param, the Variable {INBOX_VARIABLE} or ${INBOX_ENV}"
        )
    return folder


def _store(params: dict[str, Any], folder: str):
    """The inbox as an ObjectStoragePath when it is a URL, else None."""
    from openai_batch_airflow import storage

    if not storage.is_remote(folder):
        return None
    return storage.location(folder, (params.get("defaults") or {}).get("storage_conn_id"))


def claim(params: dict[str, Any], run_id: str, pipeline_params: set[str]) -> list[dict[str, Any]]:
    """Claim every ready CSV; return one ``{"trigger_run_id", "conf"}`` per file (for the mapped
    trigger), the file's own settings coming from its sidecar over the inbox defaults."""
    from batchpipe.inbox import claim_new_files, claim_new_objects, parse_sidecar, read_sidecar
    from openai_batch_airflow.tasks import fail_on_bad_input, safe_name

    folder = inbox_folder(params)
    store = _store(params, folder)
    claim_id = safe_name(run_id)
    min_age = float(params.get("min_age_seconds") or 0)
    sidecars: dict[str, str] = {}  # sidecar texts of an inbox in object storage, by CSV name
    with fail_on_bad_input():
        if store is None:
            claimed = claim_new_files(folder, claim_id, min_age)
        else:
            claimed = claim_new_objects(store.fs, store.path, claim_id, min_age)
            for item in claimed:  # locations as URLs (the pipeline reads them from the store)
                if item["sidecar"]:
                    sidecars[item["name"]] = (store / item["sidecar"]).read_text(encoding="utf-8")
                    item["sidecar"] = str(store / item["sidecar"])
                item["csv"] = str(store / item["csv"])
    if not claimed:
        log.info("inbox %s: nothing new", folder)
        return []
    work = []
    for item in claimed:
        with fail_on_bad_input():
            allowed = pipeline_params - {"input_csv"}
            if item["name"] in sidecars:
                settings = parse_sidecar(sidecars[item["name"]], item["sidecar"], allowed=allowed)
            else:
                settings = read_sidecar(item["sidecar"], allowed=allowed)
        conf = {
            **(params.get("defaults") or {}),
            **settings,
            "input_csv": item["csv"],
            # images referenced relative to the CSV stay where they were dropped
            "image_base_dir": str(store) if store is not None else str(os.path.abspath(folder)),
        }
        run = f"inbox__{claim_id}__{safe_name(os.path.splitext(item['name'])[0])}"
        log.info("claimed %s -> run %s", item["name"], run)
        work.append({"trigger_run_id": run, "conf": conf, "claimed": item})
    return work


def settle(work: list[dict[str, Any]] | None, params: dict[str, Any], run_id: str, context: Any) -> dict:
    """Move each claimed file to done/ or failed/ by the state of its pipeline run."""
    from batchpipe.inbox import settle as move
    from batchpipe.inbox import settle_objects
    from openai_batch_airflow.tasks import safe_name

    folder = inbox_folder(params)
    store = _store(params, folder)
    outcome: dict[str, list[str]] = {"done": [], "failed": []}
    for item in work or []:
        state = context["ti"].get_dagrun_state(PIPELINE_DAG_ID, item["trigger_run_id"])
        where = "done" if str(state).lower().endswith("success") else "failed"
        if store is None:
            dest = move(item["claimed"], folder, safe_name(run_id), where)
        else:
            dest = str(store / settle_objects(store.fs, _relative(store, item["claimed"]), store.path,
                                              safe_name(run_id), where))  # fmt: skip
        log.info("%s: run %s ended %s -> %s", item["claimed"]["name"], item["trigger_run_id"], state, dest)
        outcome[where].append(dest)
    if outcome["failed"]:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{len(outcome['failed'])} file(s) failed: {outcome['failed']}")
    return outcome


def _relative(store: Any, claimed: dict[str, Any]) -> dict[str, Any]:
    """A claimed item's URLs made relative to the inbox again (as :mod:`batchpipe.inbox` returns them)."""
    prefix = str(store).rstrip("/") + "/"
    return {
        k: (v[len(prefix) :] if isinstance(v, str) and v.startswith(prefix) else v)
        for k, v in claimed.items()
    }

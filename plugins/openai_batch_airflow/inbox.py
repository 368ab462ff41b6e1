"""Task bodies of ``openai_batch_inbox``: claim new CSVs, then settle them after their runs."""

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


def claim(params: dict[str, Any], run_id: str, pipeline_params: set[str]) -> list[dict[str, Any]]:
    """Claim every ready CSV; return one ``{"trigger_run_id", "conf"}`` per file (for the mapped
    trigger), the file's own settings coming from its sidecar over the inbox defaults."""
    from batchpipe.inbox import claim_new_files, read_sidecar
    from openai_batch_airflow.tasks import fail_on_bad_input, safe_name

    folder = inbox_folder(params)
    claim_id = safe_name(run_id)
    with fail_on_bad_input():
        claimed = claim_new_files(folder, claim_id, float(params.get("min_age_seconds") or 0))
    if not claimed:
        log.info("inbox %s: nothing new", folder)
        return []
    work = []
    for item in claimed:
        with fail_on_bad_input():
            settings = read_sidecar(item["sidecar"], allowed=pipeline_params - {"input_csv"})
        conf = {
            **(params.get("defaults") or {}),
            **settings,
            "input_csv": item["csv"],
            # images referenced relative to the CSV stay where they were dropped
            "image_base_dir": str(os.path.abspath(folder)),
        }
        run = f"inbox__{claim_id}__{safe_name(os.path.splitext(item['name'])[0])}"
        log.info("claimed %s -> run %s", item["name"], run)
        work.append({"trigger_run_id": run, "conf": conf, "claimed": item})
    return work


def settle(work: list[dict[str, Any]] | None, params: dict[str, Any], run_id: str, context: Any) -> dict:
    """Move each claimed file to done/ or failed/ by the state of its pipeline run."""
    from batchpipe.inbox import settle as move
    from openai_batch_airflow.tasks import safe_name

    folder = inbox_folder(params)
    outcome: dict[str, list[str]] = {"done": [], "failed": []}
    for item in work or []:
        state = context["ti"].get_dagrun_state(PIPELINE_DAG_ID, item["trigger_run_id"])
        where = "done" if str(state).lower().endswith("success") else "failed"
        dest = move(item["claimed"], folder, safe_name(run_id), where)
        log.info("%s: run %s ended %s -> %s", item["claimed"]["name"], item["trigger_run_id"], state, dest)
        outcome[where].append(dest)
    if outcome["failed"]:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{len(outcome['failed'])} file(s) failed: {outcome['failed']}")
    return outcome

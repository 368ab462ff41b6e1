"""
# OpenAI Batch inbox (nightly)

Processes every new CSV dropped into an **inbox folder**, each exactly once:

1. `claim`: each ready `*.csv` (older than `min_age_seconds` and unchanged in size and time across
   two looks `stable_seconds` apart) is moved atomically to `processing/<run>/` with its optional
   sidecar `<name>.json` (settings for that file, same keys as `openai_batch_pipeline`'s params,
   over the `defaults` param). Two overlapping runs never take the same file. A bad sidecar fails
   only its own file, and a sidecar without its CSV is moved aside once older than
   `min_age_seconds`: both go to `failed/<run>/` beside a `<name>.error.txt`. A plain file named
   `processing`, `done` or `failed` in the inbox fails the run before anything is claimed. An empty
   inbox is a quick success.
2. `process`: one `openai_batch_pipeline` run per file (`inbox__<run>__<name>_<hash of the name>`;
   triggered, waited for without holding a worker).
3. `settle`: each file moves to `done/<run>/` if its own run succeeded, else to `failed/<run>/`
   with the reason; the run fails (and notifies) if any file failed.

Every successful file updates the `openai_batch_results` Asset (downstream DAGs can be scheduled
on it). Inbox folder: the `inbox` param, else Variable `openai_batch_inbox`, else
`$OPENAI_BATCH_INBOX`; a local folder or a URL such as `s3://bucket/inbox` (connection: in the URL,
`s3://conn@bucket/inbox`, or `storage_conn_id` in `defaults`; there a claim is an exclusive
marker object instead of a rename). Schedule: `$OPENAI_BATCH_INBOX_SCHEDULE`: a cron expression (default
`0 2 * * *`, nightly at 02:00) or an interval such as `15m`.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

from openai_batch_airflow.notify import RunNotifier


def _schedule(value: str) -> str | timedelta:
    """A cron expression, or an interval such as ``20s``, ``15m``, ``6h``."""
    if m := re.fullmatch(r"\s*(\d+)\s*([smh])\s*", value):
        return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours"}[m[2]]: int(m[1])})
    return value


@dag(
    dag_id="openai_batch_inbox",
    schedule=_schedule(os.environ.get("OPENAI_BATCH_INBOX_SCHEDULE", "0 2 * * *")),
    catchup=False,
    doc_md=__doc__,
    tags=["openai", "batch", "inbox"],
    default_args={"retries": 1, "on_failure_callback": RunNotifier("failure")},
    params={
        "inbox": Param(
            None,
            type=["null", "string"],
            title="Inbox folder",
            description="Folder of new CSVs: a local path or a URL such as s3://bucket/inbox. Empty: "
            "Variable openai_batch_inbox, else $OPENAI_BATCH_INBOX.",
        ),
        "min_age_seconds": Param(
            60,
            type="integer",
            minimum=0,
            title="Minimum file age (s)",
            description="Files modified more recently are left for the next run (may still be copying); "
            "a sidecar JSON without its CSV is moved to failed/ once this old.",
        ),
        "stable_seconds": Param(
            5,
            type="number",
            minimum=0,
            title="Stability check (s)",
            description="The inbox is listed twice this far apart; a file whose size or modification time "
            "(ETag in object storage) changed in between is still being written and waits for the next run.",
        ),
        "defaults": Param(
            {},
            type="object",
            title="Default settings",
            description="Pipeline params for every file (a file's sidecar JSON overrides them), "
            'e.g. {"model": "gpt-4o-mini", "image_column": "image"}.',
        ),
        "check_interval": Param(
            60,
            type="integer",
            minimum=1,
            title="Check interval (s)",
            description="How often to look whether each file's pipeline run has finished.",
        ),
    },
)
def openai_batch_inbox():
    from openai_batch_airflow import inbox as ib

    @task
    def claim() -> list[dict]:
        return ib.claim_task(get_current_context())

    claimed = claim()
    process = TriggerDagRunOperator.partial(
        task_id="process",
        trigger_dag_id=ib.PIPELINE_DAG_ID,
        wait_for_completion=True,
        deferrable=True,
        poke_interval=int(os.environ.get("OPENAI_BATCH_INBOX_POKE_SECONDS", "30")),
        allowed_states=["success"],
        failed_states=["failed"],
        retries=0,
    ).expand_kwargs(claimed.map(lambda w: {"trigger_run_id": w["trigger_run_id"], "conf": w["conf"]}))

    @task(trigger_rule="all_done", on_success_callback=RunNotifier("success"))
    def settle() -> dict:
        return ib.settle_task(get_current_context())

    process >> settle()


openai_batch_inbox()

"""
# OpenAI Batch inbox (nightly)

Processes every new CSV dropped into an **inbox folder**, each exactly once:

1. `claim`: each ready `*.csv` (older than `min_age_seconds`) is moved atomically to
   `processing/<run>/` with its optional sidecar `<name>.json` (settings for that file, same keys
   as `openai_batch_pipeline`'s params, over the `defaults` param). Two overlapping runs never
   take the same file. An empty inbox is a quick success.
2. `process`: one `openai_batch_pipeline` run per file (triggered, waited for without holding a
   worker).
3. `settle`: each file moves to `done/<run>/` or `failed/<run>/`; the run fails if any file did.

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
            description="Files modified more recently are left for the next run (may still be copying).",
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
        ctx = get_current_context()
        return ib.claim(dict(ctx["params"]), ctx["run_id"], set(ib.PIPELINE_PARAMS))

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
    def settle(work: list[dict]) -> dict:
        ctx = get_current_context()
        return ib.settle(work, dict(ctx["params"]), ctx["run_id"], ctx)

    process >> settle(claimed)


openai_batch_inbox()

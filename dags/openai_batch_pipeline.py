"""
# OpenAI Batch pipeline

Push a CSV of prompts (optionally with images) through the OpenAI **Batch API** at half the
price of live calls, and get the answers back as a CSV.

`validate_csv` → `build_jsonl` → `upload` → `create_batch` → `wait_for_batch` → `download` → `merge`

* **validate_csv** reads the CSV as text and checks columns, row range and every row (prompt,
  image file, size, type); it also refuses a conf key that is no param (a typo would be ignored),
  a model the API does not know (`GET /v1/models/{model}`; one it cannot check is a warning) and
  an output or work folder that cannot be written. Fatal problems stop the run *before anything
  is uploaded*; bad rows are listed in the log and come back in the results with their error,
  the rest goes on.
* **build_jsonl** writes the request file(s). Over `max_requests_per_batch` requests or
  `max_batch_bytes` bytes the input is split into shards, and upload → download run once per
  shard (dynamic task mapping); over 64 shards, once per group of shards (at most 64 task
  instances per task, whatever the number of shards).
* **wait_for_batch** is deferrable: the triggerer polls the batches every `check_interval`
  seconds, no worker slot is held; it also resubmits what failed for a retryable reason.
* **merge** writes `<output_dir>/<csv name>/<run id>/results.csv`: every selected row exactly
  once, in input order, original columns unchanged, plus `response`, `error` and token columns;
  `report.json` beside it.

`output_dir` empty means: Airflow Variable `openai_batch_output_dir`, else environment variable
`OPENAI_BATCH_OUTPUT_DIR`, else `$AIRFLOW_HOME/openai_batch_results`.

`input_csv`, `output_dir` and `work_dir` may be object-storage URLs (`s3://bucket/prefix`, `gs://...`,
through Airflow's `ObjectStoragePath` and the installed providers; connection: `storage_conn_id`).
Tasks then read and write only through the store, so mapped shards may run on different workers.

`provider` picks the batch API: `openai` (connection `openai_default`; its host may be any
OpenAI-compatible base URL, e.g. the repo's local batch server), `azure_openai` (`azure_openai_default`;
the model is the deployment name) or `anthropic` (Message Batches, `anthropic_default`); the `conn_id`
param names another connection.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from openai_batch_airflow.assets import RESULTS_ASSET
from openai_batch_airflow.links import BatchReportLink
from openai_batch_airflow.notify import RunNotifier
from openai_batch_airflow.operators import OpenAIBatchWaitOperator
from openai_batch_airflow.params import pipeline_params

PARAMS = pipeline_params()


def _params() -> dict:
    return dict(get_current_context()["params"])


def _run_id() -> str:
    return get_current_context()["run_id"]


@dag(
    dag_id="openai_batch_pipeline",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["openai", "batch", "llm"],
    params=PARAMS,
    default_args={
        "retries": 2,
        # OPENAI_BATCH_RETRY_DELAY_SECONDS: for tests and impatient demos; 30 s is kind to the API.
        "retry_delay": timedelta(seconds=float(os.environ.get("OPENAI_BATCH_RETRY_DELAY_SECONDS", "30"))),
        "retry_exponential_backoff": True,
        # task-level callbacks: they run on the worker with the run's full context
        "on_failure_callback": RunNotifier("failure"),
    },
    max_active_tasks=32,
)
def openai_batch_pipeline():
    from openai_batch_airflow import tasks as t

    @task
    def validate_csv() -> dict:
        # the raw conf: Airflow merges unknown conf keys into the params, so only the conf tells them apart
        conf = get_current_context()["dag_run"].conf
        return t.validate(
            _params(), _run_id(), conf=dict(conf or {}), known=PARAMS, context=get_current_context()
        )

    @task
    def build_jsonl(summary: dict) -> list[dict]:
        return t.build(_params(), _run_id(), get_current_context())

    @task
    def upload(group: dict) -> dict:
        return t.upload(group, _params(), get_current_context())

    # one create at a time per run, so waves under max_enqueued_tokens see each other's batches
    @task(max_active_tis_per_dagrun=1)
    def create_batch(group: dict) -> dict:
        return t.create(group, _params(), get_current_context())

    @task
    def download(group: dict) -> dict:
        return t.download(group, _params())

    # none_failed: also runs when no row could be sent (zero shards, so the mapped tasks skip).
    @task(trigger_rule="none_failed", outlets=[RESULTS_ASSET], on_success_callback=RunNotifier("success"))
    def merge(downloads: list | None) -> str:
        # index by length: iterating the lazy XCom sequence probes one past its end (an error log)
        groups = [downloads[i] for i in range(len(downloads))] if downloads else []
        return t.merge(groups, _params(), _run_id(), get_current_context())

    built = build_jsonl(validate_csv())
    created = create_batch.expand(group=upload.expand(group=built))
    waited = OpenAIBatchWaitOperator.partial(
        task_id="wait_for_batch",
        conn_id="{{ params.conn_id or '' }}",
        provider="{{ params.provider }}",
        check_interval="{{ params.check_interval }}",
        max_resubmits="{{ params.max_resubmits }}",
        token_limit_wait="{{ params.token_limit_wait }}",
        cancel_on_kill="{{ params.cancel_on_kill }}",
        retries=3,
    ).expand(group=created)
    merged = merge(download.expand(group=waited.output))
    merged.operator.operator_extra_links = [BatchReportLink()]  # the run's report tab, one click away


openai_batch_pipeline()

"""The bodies of the ``openai_batch_pipeline`` tasks, kept out of the DAG file.

Each function takes plain values (the run's params, ids, small manifests) and returns a small
JSON-able manifest for XCom: paths, ids and counts, never file contents. The heavy lifting is
in the Airflow-free library :mod:`batchpipe`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Airflow Variable and environment variable that give the default output folder.
OUTPUT_DIR_VARIABLE = "openai_batch_output_dir"
OUTPUT_DIR_ENV = "OPENAI_BATCH_OUTPUT_DIR"
#: Variables adding to OPENAI_BATCH_ALLOWED_ROOTS / OPENAI_BATCH_OUTPUT_ROOTS (os.pathsep-separated).
ALLOWED_ROOTS_VARIABLE = "openai_batch_allowed_roots"
OUTPUT_ROOTS_VARIABLE = "openai_batch_output_roots"


def _client(conn_id: str):
    from airflow.providers.openai.hooks.openai import OpenAIHook

    return OpenAIHook(conn_id=conn_id).get_conn()


def build_options(params: dict[str, Any]):
    from batchpipe.options import BuildOptions

    with fail_on_bad_input():
        opts = BuildOptions.from_dict(params)  # the build options among the params
        opts.validate()
    return opts


@contextmanager
def fail_on_bad_input():
    """Bad input fails the task at once: retrying cannot fix a CSV."""
    from airflow.sdk.exceptions import AirflowFailException

    from batchpipe.errors import InputError

    try:
        yield
    except InputError as exc:
        raise AirflowFailException(str(exc)) from exc


def default_output_dir() -> str:
    """Param ``output_dir`` when empty: Variable, then environment, then ``$AIRFLOW_HOME``."""
    from airflow.sdk import Variable

    value = Variable.get(OUTPUT_DIR_VARIABLE, default=None) or os.environ.get(OUTPUT_DIR_ENV)
    if value:
        return value
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return os.path.join(home, "openai_batch_results")


def safe_name(text: str) -> str:
    """A run id such as ``manual__2026-11-30T05:00:00+00:00`` made safe as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def run_dir(params: dict[str, Any], run_id: str) -> Path:
    """``<output_dir>/<input file stem>/<run id made filesystem-safe>``."""
    base = params.get("output_dir") or default_output_dir()
    return Path(base).expanduser().resolve() / Path(params["input_csv"]).stem / safe_name(run_id)


def read_roots() -> list[Path] | None:
    """Allowed input roots: env OPENAI_BATCH_ALLOWED_ROOTS plus Variable openai_batch_allowed_roots."""
    from airflow.sdk import Variable

    from batchpipe.paths import allowed_roots

    return allowed_roots(extra=Variable.get(ALLOWED_ROOTS_VARIABLE, default=None))


def checked_run_dir(params: dict[str, Any], run_id: str) -> Path:
    """The run folder, refused (before anything is uploaded) when outside the allowed output roots."""
    from airflow.sdk import Variable

    from batchpipe.paths import PathNotAllowed, check_within, output_roots

    folder = run_dir(params, run_id)
    roots = output_roots(extra=Variable.get(OUTPUT_ROOTS_VARIABLE, default=None))
    try:
        check_within(folder, roots, "output folder")
    except PathNotAllowed as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc
    return folder


def validate(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    from batchpipe.build import validate_csv

    opts = build_options(params)
    with fail_on_bad_input():
        summary = validate_csv(params["input_csv"], opts, allowed_roots=read_roots())
    checked_run_dir(params, run_id)
    log.info(
        "%s: %d rows selected of %d; %d valid, %d invalid",
        summary["file"],
        summary["rows_selected"],
        summary["rows_in_file"],
        summary["valid"],
        summary["invalid"],
    )
    for example in summary.get("first_invalid") or []:
        log.warning("invalid row %s (column %s): %s", example["row"], example["column"], example["error"])
    if summary["valid"] == 0:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"{summary['file']}: none of the {summary['rows_selected']} selected rows can be sent; "
            f"first problems: {summary.get('first_invalid')}"
        )
    return summary


def build(params: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Write the shard file(s); return one small manifest per shard (the list the run maps over)."""
    from batchpipe.build import build_jsonl

    work_dir = checked_run_dir(params, run_id) / "work"
    opts = build_options(params)
    with fail_on_bad_input():
        manifest = build_jsonl(params["input_csv"], opts, work_dir, allowed_roots=read_roots())
    log.info(
        "built %d shard(s) with %d requests (%d invalid rows kept aside) in %s",
        len(manifest["shards"]),
        manifest["valid"],
        manifest["invalid"],
        work_dir,
    )
    estimate = estimate_cost(manifest["manifest"], params, work_dir.parent)
    if params.get("estimate_only"):
        log.info("estimate_only: nothing is uploaded; the estimate is in %s", work_dir.parent / "estimate.md")
        if not params.get("keep_temp_files"):
            shutil.rmtree(work_dir, ignore_errors=True)
        return []
    common = {"manifest": manifest["manifest"], "work_dir": manifest["work_dir"]}
    log.info("estimated prompt tokens: %s", estimate["prompt_tokens"])
    return [{**shard, **common} for shard in manifest["shards"]]


PRICES_VARIABLE = "openai_batch_prices"


def prices(params: dict[str, Any]) -> dict[str, Any]:
    """The shipped, dated price table, overridden by param ``prices`` or Variable ``openai_batch_prices``."""
    from airflow.sdk import Variable

    from batchpipe.estimate import load_prices

    override = params.get("prices") or Variable.get(PRICES_VARIABLE, default=None)
    with fail_on_bad_input():
        return load_prices(override or None)


def estimate_cost(manifest_path: str, params: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Estimate tokens and cost offline, write estimate.json/.md, log it, and stop the run before
    anything is uploaded when the worst case exceeds ``max_cost_usd``."""
    from batchpipe.estimate import estimate_build, exceeds_budget, format_estimate, write_estimate

    estimate = estimate_build(
        manifest_path, prices=prices(params), expected_output_tokens=params.get("expected_output_tokens")
    )
    write_estimate(estimate, folder)
    log.info("cost estimate (written to %s):\n%s", folder / "estimate.md", format_estimate(estimate))
    over = exceeds_budget(estimate, params.get("max_cost_usd"))
    if over:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"stopped before upload: {over} (max_cost_usd)")
    return estimate


def intent(context: Any, key: str):
    """This task's recorded submission ``key`` (see :mod:`openai_batch_airflow.submit`)."""
    from openai_batch_airflow.submit import Intent, generation

    return Intent(context.get("task_state_store"), key, generation(context))


def upload(shard: dict[str, Any], conn_id: str, context: Any) -> dict[str, Any]:
    """Upload one shard; a retry re-attaches to the file an earlier try uploaded."""
    from openai_batch_airflow.submit import upload_once

    name = (
        f"{safe_name(context['dag'].dag_id)}-{safe_name(context['run_id'])}-shard-{int(shard['index']):05d}"
    )
    uploaded = upload_once(_client(conn_id), shard["path"], name, intent(context, "upload"))
    log.info(
        "shard %s: uploaded %s (%d bytes) as %s", shard["index"], shard["path"], shard["bytes"], uploaded.id
    )
    return {**shard, "input_file_id": uploaded.id}


ACTIVE_STATUSES = ("validating", "in_progress", "finalizing")
MAX_ENQUEUED_TOKENS_VARIABLE = "openai_batch_max_enqueued_tokens"


def max_enqueued_tokens(params: dict[str, Any]) -> int | None:
    """Param ``max_enqueued_tokens``, else Variable ``openai_batch_max_enqueued_tokens``; None = no limit."""
    from airflow.sdk import Variable

    value = params.get("max_enqueued_tokens") or Variable.get(MAX_ENQUEUED_TOKENS_VARIABLE, default=None)
    return int(value) if value else None


def enqueued_tokens(client: Any, model: str) -> int:
    """Estimated prompt tokens of this pipeline's batches for ``model`` that are still enqueued."""
    total, since = 0, time.time() - 26 * 3600  # nothing older can still be running (24 h window)
    for b in client.batches.list(limit=100):
        if (b.created_at or 0) < since:
            break
        meta = b.metadata or {}
        if b.status in ACTIVE_STATUSES and meta.get("model") == model and meta.get("est_prompt_tokens"):
            total += int(meta["est_prompt_tokens"])
    return total


def create(shard: dict[str, Any], params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Create the shard's batch; a retry re-attaches to the batch an earlier try created.

    With ``max_enqueued_tokens`` the shards go out in waves: a shard whose estimated prompt tokens
    would push this model's enqueued total over the limit waits (rescheduled, no worker held)
    until earlier batches finish. A shard is never held back when nothing is enqueued.
    """
    from openai_batch_airflow.submit import create_once

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    client = _client(params["conn_id"])
    recorded = intent(context, "create_batch")
    metadata = {
        "dag_id": dag_id[:512],
        "run_id": run_id[:512],
        "shard": str(shard["index"]),
        "source": Path(params["input_csv"]).name[:512],
        "model": params["model"][:512],
    }
    limit = max_enqueued_tokens(params)
    if limit and not (recorded.saved and recorded.saved.get("batch_id")):
        from batchpipe.tokens import shard_prompt_tokens

        estimate = shard_prompt_tokens(shard["path"], params["endpoint"], params["model"])
        metadata["est_prompt_tokens"] = str(estimate)
        queued = enqueued_tokens(client, params["model"])
        if queued and queued + estimate > limit:
            from airflow.sdk.exceptions import AirflowRescheduleException

            wait = max(float(params.get("check_interval") or 60), 1.0)
            log.info(
                "shard %s waits for the next wave: %d tokens enqueued for %s + %d for this shard > %d",
                shard["index"],
                queued,
                params["model"],
                estimate,
                limit,
            )
            raise AirflowRescheduleException(datetime.now(UTC) + timedelta(seconds=wait))
    batch = create_once(
        client,
        recorded,
        metadata=metadata,
        input_file_id=shard["input_file_id"],
        endpoint=params["endpoint"],
        completion_window=params["completion_window"],
    )
    log.info("shard %s: batch %s (%d requests)", shard["index"], batch.id, shard["requests"])
    return {**shard, "batch_id": batch.id}


def download_batch_files(client: Any, summary: dict[str, Any], folder: Path, index: int) -> list[str]:
    """Stream a finished batch's output and error files to ``folder`` (skipping what is already
    there) and check they hold a line for every request; return their paths, output first."""
    from batchpipe.resubmit import DownloadMismatch, check_download, count_result_lines

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kind in ("output", "error"):
        file_id = summary.get(f"{kind}_file_id")
        if not file_id:
            continue
        target = folder / f"shard-{index:05d}.r{summary.get('round', 0)}.{kind}.jsonl"
        if not target.exists():
            part = target.with_name(target.name + ".part")
            # streamed to disk, never held in memory; 5xx and resets are retried by the client
            with client.with_options(max_retries=5).files.with_streaming_response.content(file_id) as resp:
                resp.stream_to_file(part)
            os.replace(part, target)
            log.info("batch %s: downloaded %s file %s to %s", summary["id"], kind, file_id, target)
        paths[kind] = target
    try:
        check_download(
            summary["request_counts"],
            count_result_lines(paths.get("output")),
            count_result_lines(paths.get("error")),
            summary["status"],
        )
    except DownloadMismatch:
        for path in paths.values():  # let the task's retry download them again
            path.unlink(missing_ok=True)
        raise
    return [str(p) for p in paths.values()]


def download(waited: dict[str, Any], conn_id: str) -> dict[str, Any]:
    """Download the result files of every batch of the shard (first submission and follow-ups)."""
    client = _client(conn_id)
    index = int(waited["index"])
    folder = Path(waited["path"]).parent / "results"
    batches = waited.get("batches") or [waited["batch"]]
    files = [f for summary in batches for f in download_batch_files(client, summary, folder, index)]
    return {
        "index": index,
        "batch_ids": [b["id"] for b in batches],
        "status": waited["batch"]["status"],
        "request_counts": waited["batch"]["request_counts"],
        "result_files": files,
        "batches": [
            {k: v for k, v in b.items() if k not in ("errors", "metadata", "files")} for b in batches
        ],
    }


def merge(
    downloads: list[dict[str, Any]] | None, params: dict[str, Any], run_id: str, context: Any = None
) -> str:
    """Join every shard's results back onto the CSV rows, write report.json (with the actual cost
    against the estimate) and report.html; return the path of results.csv."""
    from batchpipe.merge import merge_results

    if params.get("estimate_only"):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("estimate_only: nothing was sent, so there is nothing to merge")
    downloads = sorted(downloads or [], key=lambda d: int(d["index"]))
    folder = checked_run_dir(params, run_id)
    work_dir = folder / "work"
    out_csv = folder / "results.csv"
    report = merge_results(
        work_dir / "build_manifest.json",
        [path for d in downloads for path in d["result_files"]],  # by shard, then round: latest wins
        out_csv,
        batch_ids=[batch_id for d in downloads for batch_id in d["batch_ids"]],
        allowed_roots=read_roots(),
    )
    log.info(
        "results: %s rows, %s answered, %s failed, %s invalid -> %s",
        report["rows"],
        report["answered"],
        report["failed"],
        report["invalid"],
        out_csv,
    )
    batches = [b for d in downloads for b in d.get("batches") or []]
    write_reports(folder, out_csv, report, batches, params)
    if not params.get("keep_temp_files"):
        shutil.rmtree(work_dir, ignore_errors=True)
        log.info("removed temporary files in %s (keep_temp_files is off)", work_dir)
    if context is not None:  # tell downstream DAGs (scheduled on the Asset) what landed
        from openai_batch_airflow.assets import RESULTS_ASSET

        context["outlet_events"][RESULTS_ASSET].extra = {
            "results_csv": str(out_csv),
            "report_json": str(folder / "report.json"),
            "input_csv": str(params["input_csv"]),
            "run_id": run_id,
            **{k: report[k] for k in ("rows", "answered", "failed", "invalid")},
        }
    return str(out_csv)


def write_reports(
    folder: Path, out_csv: Path, report: dict[str, Any], batches: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    """Add the estimate, the actual cost and the batches to report.json; write report.html beside it."""
    from batchpipe.estimate import price_for, token_cost
    from batchpipe.report import write_report_html

    table = prices(params)
    price = price_for(table, params["model"])
    estimate_path = folder / "estimate.json"
    estimate = json.loads(estimate_path.read_text()) if estimate_path.exists() else None
    tokens = report["tokens"]
    actual = token_cost(price, tokens["prompt"], tokens["completion"], batch=True) if price else None
    expected = ((estimate or {}).get("cost") or {}).get("batch", {}).get("expected")
    report_path = Path(report["report"])
    full = json.loads(report_path.read_text())
    full["model"] = params["model"]
    full["cost_usd"] = {
        "actual_batch": actual,
        "estimated_batch_expected": expected,
        "estimated_batch_max": ((estimate or {}).get("cost") or {}).get("batch", {}).get("max"),
        "difference_pct": round((actual - expected) / expected * 100, 1) if actual and expected else None,
    }
    full["estimate"] = {
        k: (estimate or {}).get(k) for k in ("prompt_tokens", "image_tokens", "output_tokens_max")
    }
    full["batches"] = batches
    report_path.write_text(json.dumps(full, indent=2))
    html = write_report_html(out_csv, full, folder / "report.html", estimate=estimate, batches=batches,
                             model=params["model"], prices=table)  # fmt: skip
    log.info("report: %s (actual Batch cost %s USD, estimated %s)", html, actual, expected)

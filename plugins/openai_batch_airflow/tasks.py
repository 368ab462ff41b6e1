"""The bodies of the ``openai_batch_pipeline`` tasks, kept out of the DAG file.

Each function takes plain values (the run's params, ids, small manifests) and returns a small
JSON-able manifest for XCom: paths, ids and counts, never file contents. The heavy lifting is
in the Airflow-free library :mod:`batchpipe`.

Files go through :mod:`openai_batch_airflow.storage`: ``output_dir``, ``work_dir`` and ``input_csv``
may be local paths or object-storage URLs (``s3://...``), so no task relies on a file another task
left on its worker's disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from openai_batch_airflow import storage

log = logging.getLogger(__name__)

#: Airflow Variable and environment variable that give the default output folder.
OUTPUT_DIR_VARIABLE = "openai_batch_output_dir"
OUTPUT_DIR_ENV = "OPENAI_BATCH_OUTPUT_DIR"
#: Variables adding to OPENAI_BATCH_ALLOWED_ROOTS / OPENAI_BATCH_OUTPUT_ROOTS (os.pathsep-separated).
ALLOWED_ROOTS_VARIABLE = "openai_batch_allowed_roots"
OUTPUT_ROOTS_VARIABLE = "openai_batch_output_roots"


def hook(conn_id: str):
    """The :class:`~openai_batch_airflow.hooks.OpenAIBatchHook` of connection ``conn_id``: every API call
    of the task bodies goes through it."""
    from openai_batch_airflow.hooks import OpenAIBatchHook

    return OpenAIBatchHook(conn_id=conn_id)


def build_options(params: dict[str, Any]):
    """The library's build options from the params. A CSV in object storage with no image folder
    given: relative image paths resolve against the CSV's own folder in the store."""
    from batchpipe.options import BuildOptions

    if storage.is_remote(params["input_csv"]) and not params.get("image_base_dir"):
        params = {**params, "image_base_dir": str(params["input_csv"]).rsplit("/", 1)[0]}
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
    """``text`` made safe as a name (not unique: see :func:`batchpipe.naming.unique_name`)."""
    from batchpipe.naming import safe_name as safe

    return safe(text)


def storage_conn_id(params: dict[str, Any]) -> str | None:
    """Param ``storage_conn_id``: the connection for object-storage URLs (None: the URL's or the default)."""
    return params.get("storage_conn_id") or None


def _input_stem(params: dict[str, Any]) -> str:
    """The input file's name without extension: as is for a local path (as it always was) unless it
    would leave the output folder (``...csv`` has the stem ``..``); else :func:`unique_name` of it."""
    from batchpipe.naming import unique_name

    where = str(params["input_csv"])
    if not storage.is_remote(where):
        stem = Path(where).stem
        return stem if stem.strip(".") and "/" not in stem else unique_name(stem)
    return unique_name(Path(where.rstrip("/").rsplit("/", 1)[-1]).stem)


def run_folder_name(run_id: str) -> str:
    """The run's folder name: the run id when it is filesystem-safe, else its safe form plus a short hash
    of the run id, so ``batch:1``, ``batch+1`` and ``batch_1`` never share (and overwrite) one folder."""
    from batchpipe.naming import unique_name

    return unique_name(run_id)


def run_dir(params: dict[str, Any], run_id: str) -> storage.Location:
    """``<output_dir>/<input file stem>/<run folder name>`` (a Path, or a URL location)."""
    base = storage.location(params.get("output_dir") or default_output_dir(), storage_conn_id(params))
    return base / _input_stem(params) / run_folder_name(run_id)


def work_location(params: dict[str, Any], run_id: str) -> storage.Location:
    """Param ``work_dir`` + ``/<input file stem>/<run folder name>``; empty: ``<run folder>/work``."""
    if params.get("work_dir"):
        base = storage.location(params["work_dir"], storage_conn_id(params))
        return base / _input_stem(params) / run_folder_name(run_id)
    return run_dir(params, run_id) / "work"


def read_roots() -> list[Path] | None:
    """Allowed input roots: env OPENAI_BATCH_ALLOWED_ROOTS plus Variable openai_batch_allowed_roots."""
    from airflow.sdk import Variable

    from batchpipe.paths import allowed_roots

    return allowed_roots(extra=Variable.get(ALLOWED_ROOTS_VARIABLE, default=None))


def checked_run_dir(params: dict[str, Any], run_id: str) -> storage.Location:
    """The run folder, refused (before anything is uploaded) when it or the work folder lies outside
    the allowed output roots."""
    from airflow.sdk import Variable

    from batchpipe.paths import PathNotAllowed, check_within, output_roots

    roots = output_roots(extra=Variable.get(OUTPUT_ROOTS_VARIABLE, default=None))
    try:
        folder = run_dir(params, run_id)
        check_within(str(folder), roots, "output folder")
        if params.get("work_dir"):
            check_within(str(work_location(params, run_id)), roots, "work folder")
    except (PathNotAllowed, ValueError) as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc
    return folder


@contextmanager
def local_input_csv(params: dict[str, Any], into: Path):
    """The input CSV as a local file and the allowed roots to check it (and its images) against.

    A URL is checked against the allowed roots first, then fetched into ``into``; the roots then
    also admit exactly that copy (so relative image paths still have to lie inside the roots).
    """
    from batchpipe.errors import InputError
    from batchpipe.paths import PathNotAllowed, Roots, check_within, is_url, quote_path

    roots = read_roots()
    where = params["input_csv"]
    if not storage.is_remote(where):
        yield (str(storage.local_path(where)) if is_url(str(where)) else str(where)), roots
        return
    with fail_on_bad_input():
        try:
            check_within(where, roots, "input CSV")
        except PathNotAllowed as exc:
            raise InputError(str(exc)) from None
        try:
            remote = storage.location(where, storage_conn_id(params))
        except ValueError as exc:  # a scheme nothing here reads (http://...), a '?' or a password in it
            raise InputError(f"input_csv {exc}") from None
        try:
            local = storage.fetch(remote, into)
        except FileNotFoundError:
            raise InputError(f"{quote_path(where)}: input CSV not found") from None
    if roots is not None:
        roots = Roots([*roots, local.resolve()], setting=roots.setting)
    yield str(local), roots


#: Column names the validate_csv XCom carries (``columns_total`` says how many there are).
MAX_XCOM_COLUMNS = 50


def validate(
    params: dict[str, Any], run_id: str, conf: dict[str, Any] | None = None, known: Iterable[str] = ()
) -> dict[str, Any]:
    """The ``validate_csv`` task: everything that can be checked before anything is uploaded or paid for.

    Fails once (no retries) on: a key of the run's ``conf`` that is not among the ``known`` params (it
    would be silently ignored), bad options, a CSV none of whose selected rows can be sent, an output or
    work folder outside the allowed roots or not writable (remote: a probe object; local: created, then a
    probe file), a model the API does not know (:func:`preflight.check_model`; one that cannot be checked
    is a warning). Returns the CSV summary for XCom.
    """
    from batchpipe.build import describe_problem, validate_csv
    from batchpipe.paths import clip
    from openai_batch_airflow import preflight

    if known:
        preflight.check_keys(conf or {}, known, "the run conf")
    opts = build_options(params)
    with storage.scratch() as tmp, local_input_csv(params, tmp) as (csv_path, roots), fail_on_bad_input():
        summary = validate_csv(
            csv_path, opts, allowed_roots=roots, url_fs=storage.url_reader(storage_conn_id(params))
        )
    summary["file"] = storage.shown(params["input_csv"])
    # XCom carries small manifests: a CSV of 10,000 columns would not be one
    summary["columns_total"] = len(summary["columns"])
    summary["columns"] = [clip(c, 80) for c in summary["columns"][:MAX_XCOM_COLUMNS]]
    log.info(
        "%s: %d rows selected of %d; %d valid, %d invalid",
        summary["file"],
        summary["rows_selected"],
        summary["rows_in_file"],
        summary["valid"],
        summary["invalid"],
    )
    problems = [describe_problem(example) for example in summary.get("first_invalid") or []]
    for problem in problems:
        log.warning("invalid %s", problem)
    if summary["valid"] == 0:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"{summary['file']}: none of the {summary['rows_selected']} selected rows can be sent; "
            f"first problems: {'; '.join(problems)}"
        )
    folder = checked_run_dir(params, run_id)
    check_model(params)
    for target in (folder, work_location(params, run_id)):
        if not storage.is_remote(target):  # a file in the way, no permission, a read-only disk
            preflight.check_writable(target)
            continue
        try:  # wrong credentials or a missing bucket fail now, not after paying
            storage.check_writable(target)
        except Exception as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"cannot write to {storage.shown(target)}: {exc}") from exc
    return summary


#: Airflow Variable / environment variable that turn the model check off (false, 0, no, off): for a
#: server whose model names its GET /v1/models does not list (a gateway, deployment names).
CHECK_MODEL_VARIABLE = "openai_batch_check_model"
CHECK_MODEL_ENV = "OPENAI_BATCH_CHECK_MODEL"


def check_model(params: dict[str, Any]) -> None:
    """Param ``model`` checked with the API of connection ``conn_id`` (:func:`preflight.check_model`); a
    connection that cannot be made into a client is a warning (the upload reports it, with retries).
    Skipped (logged) when Variable ``openai_batch_check_model`` or ``$OPENAI_BATCH_CHECK_MODEL`` is off."""
    from airflow.sdk import Variable

    from batchpipe.csvio import quote_value
    from batchpipe.paths import redact_text
    from openai_batch_airflow.preflight import check_model as check

    switch = Variable.get(CHECK_MODEL_VARIABLE, default=None) or os.environ.get(CHECK_MODEL_ENV) or ""
    if switch.strip().lower() in ("false", "0", "no", "off"):
        log.info("model %s not checked: %s is off", quote_value(params["model"]), CHECK_MODEL_ENV)
        return
    conn_id = params.get("conn_id") or "openai_default"
    api = hook(conn_id)
    try:
        api.conn  # noqa: B018 - builds the client: a broken connection is told apart from a wrong model
    except Exception as exc:
        log.warning("model %s not checked: no client for connection %r (%s)", quote_value(params["model"]),
                    conn_id, redact_text(str(exc)))  # fmt: skip
        return
    check(api, params["model"], conn_id)


def build(params: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Write the shard file(s); return one small manifest per shard (the list the run maps over).

    With a remote work folder the shards are built in a scratch folder and then stored there; the
    manifests name their stored locations.
    """
    from batchpipe.build import build_jsonl

    folder = checked_run_dir(params, run_id)
    work = work_location(params, run_id)
    remote = storage.is_remote(work)
    opts = build_options(params)
    with storage.scratch() as tmp, local_input_csv(params, tmp) as (csv_path, roots):
        local_work = tmp / "work" if remote else work
        with fail_on_bad_input():
            manifest = build_jsonl(
                csv_path,
                opts,
                local_work,
                allowed_roots=roots,
                url_fs=storage.url_reader(storage_conn_id(params)),
            )
        log.info(
            "built %d shard(s) with %d requests (%d invalid rows kept aside) in %s",
            len(manifest["shards"]),
            manifest["valid"],
            manifest["invalid"],
            storage.shown(work),
        )
        estimate = estimate_cost(manifest["manifest"], params, folder)
        estimate_only = params.get("estimate_only")
        if estimate_only and not params.get("keep_temp_files"):
            log.info("estimate_only: nothing is uploaded; the estimate is in %s", folder / "estimate.md")
            remove_work_files(work)
            return []
        if remote:  # shards, invalid rows and the build manifest (last: it marks a complete build)
            names = [Path(s["path"]).name for s in manifest["shards"]] + [
                "invalid.jsonl",
                "build_manifest.json",
            ]
            for name in names:
                if (local_work / name).exists():
                    storage.publish(local_work / name, work / name)
            for shard in manifest["shards"]:
                shard["path"] = storage.shown(work / Path(shard["path"]).name)
            log.info("stored %d file(s) in %s", len(names), storage.shown(work))
        if estimate_only:
            log.info("estimate_only: nothing is uploaded; the estimate is in %s", folder / "estimate.md")
            return []
    common = {
        "manifest": storage.shown(work / "build_manifest.json"),
        "work_dir": storage.shown(work),
        "storage_conn_id": storage_conn_id(params),
    }
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


def estimate_cost(manifest_path: str, params: dict[str, Any], folder: storage.Location) -> dict[str, Any]:
    """Estimate tokens and cost offline (``manifest_path`` is local), write estimate.json/.md into the
    run folder, log it, and stop the run before anything is uploaded when the worst case exceeds
    ``max_cost_usd``."""
    from batchpipe.estimate import estimate_build, exceeds_budget, format_estimate, write_estimate

    estimate = estimate_build(
        manifest_path, prices=prices(params), expected_output_tokens=params.get("expected_output_tokens")
    )
    if storage.is_remote(folder):
        with storage.scratch() as tmp:
            write_estimate(estimate, tmp)
            for name in ("estimate.json", "estimate.md"):
                storage.publish(tmp / name, folder / name)
    else:
        write_estimate(estimate, folder)
    log.info("cost estimate (written to %s):\n%s", folder / "estimate.md", format_estimate(estimate))
    over = exceeds_budget(estimate, params.get("max_cost_usd"))
    if over:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"stopped before upload: {over} (max_cost_usd)")
    return estimate


def upload(shard: dict[str, Any], conn_id: str, context: Any) -> dict[str, Any]:
    """Upload one shard; a retry re-attaches to the file an earlier try uploaded."""
    from openai_batch_airflow.submit import intent

    name = (
        f"{safe_name(context['dag'].dag_id)}-{safe_name(context['run_id'])}-shard-{int(shard['index']):05d}"
    )
    with storage.local_copy(shard["path"], shard.get("storage_conn_id")) as local:
        uploaded = hook(conn_id).upload_once(local, name, intent(context, "upload"))
    log.info(
        "shard %s: uploaded %s (%d bytes) as %s", shard["index"], shard["path"], shard["bytes"], uploaded.id
    )
    return {**shard, "input_file_id": uploaded.id}


MAX_ENQUEUED_TOKENS_VARIABLE = "openai_batch_max_enqueued_tokens"


def max_enqueued_tokens(params: dict[str, Any]) -> int | None:
    """Param ``max_enqueued_tokens``, else Variable ``openai_batch_max_enqueued_tokens``; None = no limit."""
    from airflow.sdk import Variable

    value = params.get("max_enqueued_tokens") or Variable.get(MAX_ENQUEUED_TOKENS_VARIABLE, default=None)
    return int(value) if value else None


def create(shard: dict[str, Any], params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Create the shard's batch; a retry re-attaches to the batch an earlier try created.

    With ``max_enqueued_tokens`` the shards go out in waves: a shard whose estimated prompt tokens
    would push this model's enqueued total over the limit waits (rescheduled, no worker held)
    until earlier batches finish. A shard is never held back when nothing is enqueued.
    """
    from openai_batch_airflow.submit import intent

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    api = hook(params["conn_id"])
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

        with storage.local_copy(shard["path"], shard.get("storage_conn_id")) as local:
            estimate = shard_prompt_tokens(local, params["endpoint"], params["model"])
        metadata["est_prompt_tokens"] = str(estimate)
        queued = api.enqueued_tokens(params["model"])
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
    batch = api.create_once(
        recorded,
        metadata=metadata,
        input_file_id=shard["input_file_id"],
        endpoint=params["endpoint"],
        completion_window=params["completion_window"],
    )
    log.info("shard %s: batch %s (%d requests)", shard["index"], batch.id, shard["requests"])
    return {**shard, "batch_id": batch.id}


def download(waited: dict[str, Any], conn_id: str) -> dict[str, Any]:
    """Download the result files of every batch of the shard (first submission and follow-ups)."""
    api = hook(conn_id)
    index = int(waited["index"])
    folder = storage.location(waited["work_dir"], waited.get("storage_conn_id")) / "results"
    batches = waited.get("batches") or [waited["batch"]]
    files: list[str] = []
    problems = list(waited.get("problems") or [])  # what the wait could not finish (a refused follow-up)
    with storage.scratch() as tmp:
        for summary in batches:
            stored, found = api.download_results(summary, folder, index, tmp)
            files += [where for where, _ in stored]
            problems += [p for p in found if p not in problems]
    return {
        "index": index,
        "batch_ids": [b["id"] for b in batches],
        "status": waited["batch"]["status"],
        "request_counts": waited["batch"]["request_counts"],
        "result_files": files,
        "problems": problems,
        "batches": [
            {k: v for k, v in b.items() if k not in ("errors", "metadata", "files")} for b in batches
        ],
    }


def merge(
    downloads: list[dict[str, Any]] | None, params: dict[str, Any], run_id: str, context: Any = None
) -> str:
    """Join every shard's results back onto the CSV rows, finish report.json (with the actual cost
    against the estimate) and report.html with :func:`write_reports`; return the path of results.csv."""
    from batchpipe.merge import merge_results

    if params.get("estimate_only"):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("estimate_only: nothing was sent, so there is nothing to merge")
    downloads = sorted(downloads or [], key=lambda d: int(d["index"]))
    folder = checked_run_dir(params, run_id)
    work = work_location(params, run_id)
    remote_out = storage.is_remote(folder)
    with storage.scratch() as tmp, local_input_csv(params, tmp / "input") as (csv_path, roots):
        with fail_on_bad_input():
            manifest = _local_build_manifest(
                work, tmp, csv_path if storage.is_remote(params["input_csv"]) else None
            )
        results = []
        for d in downloads:  # by shard, then round: later files win
            for i, stored in enumerate(d["result_files"]):
                where = storage.location(stored, storage_conn_id(params))
                name = f"{int(d['index']):05d}-{i}-{where.name}"
                results.append(
                    storage.fetch(where, tmp / "results", name) if storage.is_remote(where) else where
                )
        local_folder = tmp / "out" if remote_out else folder
        out_csv = local_folder / "results.csv"
        with fail_on_bad_input():
            report = merge_results(
                manifest,
                results,
                out_csv,
                batch_ids=[batch_id for d in downloads for batch_id in d["batch_ids"]],
                allowed_roots=roots,
                formula_escape=params.get("csv_formula_escape", True) is not False,
                write_report=False,  # written once, finished, by write_reports
            )
        log_result_problems(report)
        log.info(
            "results: %s rows, %s answered, %s failed, %s invalid -> %s",
            report["rows"],
            report["answered"],
            report["failed"],
            report["invalid"],
            storage.shown(folder / "results.csv"),
        )
        batches = [b for d in downloads for b in d.get("batches") or []]
        problems = [p for d in downloads for p in d.get("problems") or []]
        if remote_out and (folder / "estimate.json").exists():
            storage.fetch(folder / "estimate.json", local_folder)
        report = write_reports(
            local_folder, out_csv, report, batches, params, shown=storage.shown(folder), problems=problems
        )
        if remote_out:  # results.csv last: its arrival means the run's output is complete
            for name in ("report.json", "report.html", "results.csv"):
                storage.publish(local_folder / name, folder / name)
    results_csv = storage.shown(folder / "results.csv")
    if report.get("problems"):  # landed, and visible: the run fails; the work files stay for a look
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"results landed at {results_csv}, but not every row could be answered: "
            + " | ".join(report["problems"])
        )
    if not params.get("keep_temp_files"):
        removed = remove_work_files(work)
        log.info("removed %d temporary file(s) in %s (keep_temp_files is off)", removed, storage.shown(work))
    log.info("results.csv: %s", results_csv)  # the last word: where the answers are
    if context is not None:  # tell downstream DAGs (scheduled on the Asset) what landed
        from openai_batch_airflow.assets import RESULTS_ASSET

        context["outlet_events"][RESULTS_ASSET].extra = {
            "results_csv": results_csv,
            "report_json": storage.shown(folder / "report.json"),
            "input_csv": storage.shown(params["input_csv"]),
            "run_id": run_id,
            **{k: report[k] for k in ("rows", "answered", "failed", "invalid")},
        }
    return results_csv


def remove_work_files(work: storage.Location) -> int:
    """Delete the files the run wrote into its work folder and its ``results/`` (shards, follow-ups,
    downloads, the build manifest: :func:`batchpipe.build.is_work_file`), then those folders when empty.

    Nothing else is touched, so a ``work_dir`` equal to ``output_dir``, or one that holds the run folder
    or lies inside it, never loses ``results.csv``, ``report.*`` or ``estimate.*``. Returns how many files
    were removed; a file that cannot be removed is logged, never fails a landed run.
    """
    from batchpipe.build import is_work_file
    from batchpipe.paths import redact_text

    removed = 0
    for folder in (work / "results", work):
        try:
            entries = [e for e in folder.iterdir() if is_work_file(e.name) and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                entry.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", storage.shown(entry), redact_text(exc))
        if not storage.is_remote(folder):  # object stores have no folders to remove
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else lives there
    return removed


def log_result_problems(report: dict[str, Any]) -> None:
    """Warn in the merge log about result lines that do not add up (they are in report.json/.html too)."""
    if report.get("duplicate_results"):
        log.warning(
            "%d duplicate result line(s) (an answer is never replaced by a later error); ids: %s",
            report["duplicate_results"],
            ", ".join(report.get("duplicate_ids") or []),
        )
    if report.get("unmatched_results"):
        log.warning("%d result line(s) for custom_ids not in this run ignored", report["unmatched_results"])
    if report.get("malformed_lines"):
        log.warning(
            "%d result line(s) could not be read (truncated or not JSON): %s",
            report["malformed_lines"],
            "; ".join(f"{b['file']} line {b['line']}" for b in report.get("broken_lines") or []),
        )


def _local_build_manifest(work: storage.Location, tmp: Path, csv_path: str | None) -> Path:
    """The build manifest as a local file (``invalid.jsonl`` beside it) for the merge.

    Used in place when the work folder is local and the CSV was read in place; otherwise copied into
    ``tmp`` with its ``csv`` entry pointing at the local copy ``csv_path`` of a remote input CSV.
    """
    from batchpipe.errors import InputError
    from batchpipe.merge import INVALID_NAME, MANIFEST_NAME

    source = work / MANIFEST_NAME
    if not storage.is_remote(work) and csv_path is None:
        return source
    text = storage.read_text(source)
    if text is None:
        raise InputError(f"{storage.shown(source)}: build manifest not found (run the build step first)")
    manifest = json.loads(text)
    if csv_path is not None:
        manifest["csv"] = csv_path
    local = tmp / "work"
    local.mkdir(parents=True, exist_ok=True)
    (local / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    invalid = work / INVALID_NAME
    if invalid.exists():  # a remote one is fetched straight to its place; a local one is copied there
        storage.publish(storage.fetch(invalid, local), local / INVALID_NAME)
    return local / MANIFEST_NAME


def write_reports(
    folder: Path,
    out_csv: Path,
    report: dict[str, Any],
    batches: list[dict[str, Any]],
    params: dict[str, Any],
    shown: str | None = None,
    problems: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Finish merge's ``report`` into report.json and report.html in the local ``folder`` with
    :func:`batchpipe.report.finish_report` (what ``batchpipe merge`` calls too): the model, the actual
    cost against the run's estimate.json (when ``folder`` has it), the batches, and ``problems`` (what the
    downloads could not finish) before merge's own. Returns the finished report.

    ``shown`` is where the files are stored (a URL for object storage), named in report.json and on the
    page instead of the local copies.
    """
    from batchpipe.report import finish_report

    estimate = folder / "estimate.json"
    full = finish_report(
        out_csv,
        report,
        estimate=estimate if estimate.exists() else None,
        batches=batches,
        model=params["model"],
        prices=prices(params),
        problems=problems,
        shown=shown,
    )
    where = f"{shown}/report.html" if shown else folder / "report.html"
    cost = full["cost_usd"]
    log.info("report: %s (actual Batch cost %s USD, estimated %s)", where, cost["actual_batch"],
             cost["estimated_batch_expected"])  # fmt: skip
    return full

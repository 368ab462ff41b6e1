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
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from openai_batch_airflow import storage
from openai_batch_airflow.config import RunConfig, fail_on_bad_input
from openai_batch_airflow.records import ESTIMATE_XCOM, REPORT_XCOM, VALIDATION_XCOM

log = logging.getLogger(__name__)


def hook(params: dict[str, Any]):
    """The batch-API hook of the run's ``provider`` on its connection (param ``conn_id``, else the
    provider's default; :func:`openai_batch_airflow.hooks.batch_hook`): every API call of the task bodies
    goes through it."""
    from openai_batch_airflow.hooks import batch_hook

    return batch_hook(params.get("provider") or "openai", params.get("conn_id") or None)


def local_input_csv(cfg: RunConfig, into: Path) -> tuple[str, Any]:
    """The input CSV as a local file and the allowed roots to check it (and its images) against
    (:func:`storage.fetch_input`); a bad location fails the task at once."""
    with fail_on_bad_input():
        return storage.fetch_input(cfg.input_csv, cfg.storage_conn_id, into, cfg.read_roots)


#: Column names the validate_csv XCom carries (``columns_total`` says how many there are).
MAX_XCOM_COLUMNS = 50


def validate(
    params: dict[str, Any],
    run_id: str,
    conf: dict[str, Any] | None = None,
    known: Iterable[str] = (),
    context: Any = None,
) -> dict[str, Any]:
    """The ``validate_csv`` task: :func:`check_run`; a failure that fails the run at once is also recorded
    for the run's report tab (XCom :data:`VALIDATION_XCOM`: the message, redacted, and the first bad rows)."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return check_run(params, run_id, conf, known)
    except AirflowFailException as exc:
        if context is not None:
            from batchpipe.paths import redact_text

            failure = {
                "message": redact_text(str(exc))[:4000],
                "first_invalid": getattr(exc, "first_invalid", []),
            }
            context["ti"].xcom_push(key=VALIDATION_XCOM, value=failure)
        raise


def check_run(
    params: dict[str, Any], run_id: str, conf: dict[str, Any] | None = None, known: Iterable[str] = ()
) -> dict[str, Any]:
    """Everything that can be checked before anything is uploaded or paid for.

    Fails once (no retries) on: a key of the run's ``conf`` that is not among the ``known`` params (it
    would be silently ignored), bad options or settings (:meth:`RunConfig.resolve`: also an output or
    work folder outside the allowed roots), a CSV none of whose selected rows can be sent, an output or
    work folder that is not writable (remote: a probe object; local: created, then a probe file), a model
    the API does not know (:func:`preflight.check_model`; one that cannot be checked is a warning).
    Returns the CSV summary for XCom.
    """
    from batchpipe.build import describe_problem, validate_csv
    from batchpipe.paths import clip, redact_text
    from openai_batch_airflow import preflight

    if known:
        preflight.check_keys(conf or {}, known, "the run conf")
    with storage.scratch() as tmp:  # the task's scratch folder, for a copy of a CSV in object storage
        cfg = RunConfig.resolve(params, run_id)
        csv_path, roots = local_input_csv(cfg, tmp)
        with fail_on_bad_input():
            summary = validate_csv(
                csv_path, cfg.build, allowed_roots=roots, url_fs=storage.url_reader(cfg.storage_conn_id)
            )
    summary["file"] = storage.shown(cfg.input_csv)
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
    if summary["answer_columns"]:
        log.info("answers follow the response schema; columns: %s", ", ".join(summary["answer_columns"]))
    for note in summary["schema_notes"]:
        log.info("response schema: %s", note)
    problems = [describe_problem(example) for example in summary.get("first_invalid") or []]
    for problem in problems:
        log.warning("invalid %s", problem)
    if summary["valid"] == 0:
        from airflow.sdk.exceptions import AirflowFailException

        failure = AirflowFailException(
            f"{summary['file']}: none of the {summary['rows_selected']} selected rows can be sent; "
            f"first problems: {'; '.join(problems)}"
        )
        failure.first_invalid = [redact_text(p)[:500] for p in problems]
        raise failure
    check_model(cfg)
    for target in (cfg.run_dir, cfg.work_dir):
        try:  # a file in the way, no permission, a read-only disk; wrong credentials or a missing bucket
            storage.check_writable(target, local=preflight.check_writable)
        except Exception as exc:
            from airflow.sdk.exceptions import AirflowFailException

            if isinstance(exc, AirflowFailException):
                raise
            raise AirflowFailException(f"cannot write to {storage.shown(target)}: {exc}") from exc
    return summary


def check_model(cfg: RunConfig) -> None:
    """The run's model checked with the API of its connection (:func:`preflight.check_model`); a
    connection that cannot be made into a client is a warning (the upload reports it, with retries).
    Skipped (logged) when Variable ``openai_batch_check_model`` or ``$OPENAI_BATCH_CHECK_MODEL`` is off."""
    from batchpipe.csvio import quote_value
    from batchpipe.paths import redact_text
    from openai_batch_airflow.config import CHECK_MODEL_ENV
    from openai_batch_airflow.preflight import check_model as check

    if not cfg.check_model:
        log.info("model %s not checked: %s is off", quote_value(cfg.model), CHECK_MODEL_ENV)
        return
    api = cfg.hook()
    if not api.checks_model:
        log.info("model %s not checked: %s model lists do not name deployments", quote_value(cfg.model),
                 cfg.provider)  # fmt: skip
        return
    try:
        api.conn  # noqa: B018 - builds the client: a broken connection is told apart from a wrong model
    except Exception as exc:
        log.warning("model %s not checked: no client for connection %r (%s)", quote_value(cfg.model),
                    cfg.conn_id, redact_text(str(exc)))  # fmt: skip
        return
    check(api, cfg.model, cfg.conn_id)


def build(params: dict[str, Any], run_id: str, context: Any = None) -> list[dict[str, Any]]:
    """Write the shard file(s); return the groups the run maps over: ``{"group": n, "shards": [...]}``,
    one small manifest per shard, at most ``shard_groups`` groups (:func:`batchpipe.build.group_shards`:
    one shard per group while they fit, so shards go out in parallel; more are grouped, so any number of
    shards stays under Airflow's ``max_map_length``).

    The shards are written through :func:`storage.staged`: in the work folder itself when it is local,
    else in a scratch folder stored there afterwards (the build manifest last: it marks a complete
    build); the manifests name their stored locations.
    """
    from batchpipe.build import build_jsonl, group_shards

    cfg = RunConfig.resolve(params, run_id)
    work = cfg.work_dir
    with storage.scratch() as tmp:
        csv_path, roots = local_input_csv(cfg, tmp)
        with storage.staged(work, last=("build_manifest.json",)) as local_work:
            cache = cfg.open_cache()
            try:
                with fail_on_bad_input():
                    manifest = build_jsonl(
                        csv_path, cfg.build, local_work, allowed_roots=roots,
                        url_fs=storage.url_reader(cfg.storage_conn_id), cache=cache,
                    )  # fmt: skip
            finally:
                if cache is not None:
                    cache.close()
            sent = manifest["valid"] - manifest["duplicates"] - manifest["cached"]
            log.info(
                "built %d shard(s) with %d requests (%d invalid rows kept aside) in %s",
                len(manifest["shards"]),
                sent,
                manifest["invalid"],
                storage.shown(work),
            )
            if manifest["duplicates"]:
                log.info("%d row(s) repeat an earlier row's request: not sent, answered by it",
                         manifest["duplicates"])  # fmt: skip
            if cfg.cache_dir is not None:
                log.info("answer cache %s (%s): %d row(s) answered from it, not sent",
                         storage.shown(cfg.cache_dir), cfg.cache_mode, manifest["cached"])  # fmt: skip
            estimate = estimate_cost(manifest["manifest"], cfg, context)
            if cfg.estimate_only and not cfg.keep_temp_files:
                remove_work_files(local_work)  # nothing will be sent: nothing is kept, nothing stored
    if cfg.estimate_only:
        log.info("estimate_only: nothing is uploaded; the estimate is in %s", cfg.run_dir / "estimate.md")
        return []
    common = {
        "manifest": storage.shown(work / "build_manifest.json"),
        "work_dir": storage.shown(work),
        "storage_conn_id": cfg.storage_conn_id,
    }
    for shard in manifest["shards"]:
        shard["path"] = storage.shown(work / Path(shard["path"]).name)
    log.info("estimated prompt tokens: %s", estimate["prompt_tokens"])
    groups = group_shards([{**shard, **common} for shard in manifest["shards"]], cfg.shard_groups)
    if len(groups) < len(manifest["shards"]):
        log.info("%d shards in %d groups of %d to %d (at most %d task instances per mapped task)",
                 len(manifest["shards"]), len(groups), min(map(len, groups)), max(map(len, groups)),
                 cfg.shard_groups)  # fmt: skip
    return [{"group": n, "shards": shards} for n, shards in enumerate(groups)]


def estimate_cost(manifest_path: str, cfg: RunConfig, context: Any = None) -> dict[str, Any]:
    """Estimate tokens and cost offline (``manifest_path`` is local), write estimate.json/.md into the
    run folder, log it (and record it for the run's report tab: XCom :data:`ESTIMATE_XCOM`, the
    Markdown summary), and stop the run before anything is uploaded when the worst case exceeds
    ``max_cost_usd``."""
    from batchpipe.estimate import estimate_build, exceeds_budget, format_estimate, write_estimate

    folder = cfg.run_dir
    estimate = estimate_build(
        manifest_path, prices=dict(cfg.prices), expected_output_tokens=cfg.expected_output_tokens
    )
    with storage.staged(folder) as local:
        write_estimate(estimate, local)
    log.info("cost estimate (written to %s):\n%s", folder / "estimate.md", format_estimate(estimate))
    if context is not None:
        context["ti"].xcom_push(key=ESTIMATE_XCOM, value={"markdown": format_estimate(estimate)[:20_000]})
    over = exceeds_budget(estimate, cfg.max_cost_usd)
    if over:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"stopped before upload: {over} (max_cost_usd)")
    return estimate


def upload(group: dict[str, Any], params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Upload the group's shards in order; a retry re-attaches to the files an earlier try uploaded. A
    shard the service refuses (a 4xx, e.g. a file too large) is marked ``refused`` with the reason and the
    others go on (its rows get that error in the merge, and the run fails then, naming it)."""
    from batchpipe.naming import safe_name
    from openai_batch_airflow.submit import intent, refused

    api = hook(params)
    if not api.uploads_files:  # the requests go with the create call
        log.info("no upload: %s batches take their requests with the create call", api.provider)
        return {**group, "shards": [{**shard, "input_file_id": None} for shard in group["shards"]]}
    prefix = f"{safe_name(context['dag'].dag_id)}-{safe_name(context['run_id'])}"
    shards = []
    for shard in group["shards"]:
        index = int(shard["index"])
        try:
            with storage.local_copy(shard["path"], shard.get("storage_conn_id")) as local:
                uploaded = api.upload_once(
                    local, f"{prefix}-shard-{index:05d}", intent(context, f"upload-{index}")
                )
        except Exception as exc:
            if not refused(exc):
                raise  # may pass next time: the task's retry re-attaches to what this try uploaded
            shards.append({**shard, "refused": f"the upload of {shard['path']} was refused: {_said(exc)}"})
            log.error("shard %s: %s", index, shards[-1]["refused"])
            continue
        log.info("shard %s: uploaded %s (%d bytes) as %s", index, shard["path"], shard["bytes"], uploaded.id)
        shards.append({**shard, "input_file_id": uploaded.id})
    return {**group, "shards": shards}


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def create(group: dict[str, Any], params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Create the batch of each of the group's shards, in order; a retry re-attaches to the batches an
    earlier try created.

    With ``max_enqueued_tokens`` the shards go out in waves: a shard whose estimated prompt tokens
    would push this model's enqueued total over the limit waits (the task is rescheduled, no worker
    held; the shards before it keep their batches) until earlier batches finish. A shard is never held
    back when nothing is enqueued. A shard whose upload was refused is passed on as it is; one whose
    create is refused is marked ``refused`` and the others go on.
    """
    from openai_batch_airflow.submit import intent, refused

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    cfg = RunConfig.resolve(params, run_id)
    api = cfg.hook()
    shards = []
    for shard in group["shards"]:
        index = int(shard["index"])
        if shard.get("refused"):
            shards.append(shard)
            continue
        recorded = intent(context, f"create_batch-{index}")
        metadata = {
            "dag_id": dag_id[:512],
            "run_id": run_id[:512],
            "shard": str(index),
            "source": Path(cfg.input_csv).name[:512],
            "model": cfg.model[:512],
        }
        limit = cfg.max_enqueued_tokens if api.counts_enqueued_tokens else None
        if limit and not (recorded.saved and recorded.saved.get("batch_id")):
            from batchpipe.tokens import shard_prompt_tokens

            with storage.local_copy(shard["path"], shard.get("storage_conn_id")) as local:
                estimate = shard_prompt_tokens(local, cfg.endpoint, cfg.model)
            metadata["est_prompt_tokens"] = str(estimate)
            queued = api.enqueued_tokens(cfg.model)
            if queued and queued + estimate > limit:
                from airflow.sdk.exceptions import AirflowRescheduleException

                log.info(
                    "shard %s waits for the next wave: %d tokens enqueued for %s + %d for this shard > %d",
                    index,
                    queued,
                    cfg.model,
                    estimate,
                    limit,
                )
                raise AirflowRescheduleException(datetime.now(UTC) + timedelta(seconds=cfg.check_interval))
        # an API without file upload takes the shard's requests with the create call
        requests = (
            nullcontext(None)
            if api.uploads_files
            else storage.local_copy(shard["path"], shard.get("storage_conn_id"))
        )
        try:
            with requests as local:
                batch = api.create_once(
                    recorded,
                    metadata=metadata,
                    input_file_id=shard["input_file_id"],
                    endpoint=cfg.endpoint,
                    completion_window=cfg.completion_window,
                    requests_path=local,
                    requests=int(shard["requests"]),
                )
        except Exception as exc:
            if not refused(exc):
                raise  # may pass next time: the task's retry re-attaches to a batch this try made
            shards.append({**shard, "refused": f"creating the batch was refused: {_said(exc)}"})
            log.error("shard %s: %s", index, shards[-1]["refused"])
            continue
        log.info("shard %s: batch %s (%d requests)", index, batch.id, shard["requests"])
        shards.append({**shard, "batch_id": batch.id})
    return {**group, "shards": shards}


def download(group: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Download the result files of every batch of each of the group's shards (first submission and
    follow-ups)."""
    api = hook(params)
    return {**group, "shards": [_download_shard(api, waited) for waited in group["shards"]]}


def _download_shard(api: Any, waited: dict[str, Any]) -> dict[str, Any]:
    from batchpipe.resubmit import write_unfinished
    from openai_batch_airflow.status import BatchStatus

    index = int(waited["index"])
    conn = waited.get("storage_conn_id")
    folder = storage.location(waited["work_dir"], conn) / "results"
    batches = [b for b in waited.get("batches") or [waited["batch"]] if b.get("id")]
    files: list[str] = []
    problems = list(waited.get("problems") or [])  # what the wait could not finish (a refused follow-up)
    with storage.scratch() as tmp:
        for summary in batches:
            if not BatchStatus.ended(summary.get("status")):
                continue  # never ended here (given up on): nothing to fetch
            stored, found = api.download_results(summary, folder, index, tmp)
            files += [where for where, _ in stored]
            problems += [p for p in found if p not in problems]
        unfinished = waited.get("unfinished")
        if unfinished:  # every request of that file gets the shard's error (answers already in stay)
            name = f"shard-{index:05d}.r{len(batches)}.unfinished.jsonl"
            with storage.local_copy(unfinished["path"], conn) as requests:
                lines = {int(k): v for k, v in (unfinished.get("lines") or {}).items()}
                code, message = unfinished["code"], unfinished["message"]
                written = write_unfinished(requests, tmp / name, code, message, lines)
            storage.publish(tmp / name, folder / name)
            files.append(storage.shown(folder / name))
            log.warning("shard %s: %d request(s) got no outcome: %s", index, written, unfinished["message"])
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
    groups: list[dict[str, Any]] | None, params: dict[str, Any], run_id: str, context: Any = None
) -> str:
    """Join every shard's results (the ``download`` groups) back onto the CSV rows, finish report.json
    (with the actual cost against the estimate) and report.html with :func:`write_reports`; return the
    path of results.csv."""
    from batchpipe.merge import merge_results

    cfg = RunConfig.resolve(params, run_id)
    if cfg.estimate_only:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("estimate_only: nothing was sent, so there is nothing to merge")
    downloads = sorted((d for g in groups or [] for d in g["shards"]), key=lambda d: int(d["index"]))
    folder, work = cfg.run_dir, cfg.work_dir
    with storage.scratch() as tmp, _NewAnswers(cfg, tmp) as new_answers:
        csv_path, roots = local_input_csv(cfg, tmp / "input")
        with fail_on_bad_input():
            manifest = _local_build_manifest(work, tmp, csv_path)
        results = []
        for d in downloads:  # by shard, then round: later files win
            for i, stored in enumerate(d["result_files"]):
                where = storage.location(stored, cfg.storage_conn_id)
                name = f"{int(d['index']):05d}-{i}-{where.name}"
                results.append(storage.fetch(where, tmp / "results", name))
        estimate = folder / "estimate.json"
        estimate = storage.fetch(estimate, tmp / "estimate") if estimate.exists() else None
        # results.csv last: its arrival means the run's output is complete
        with storage.staged(folder, last=("results.csv",)) as local_folder:
            out_csv = local_folder / "results.csv"
            with fail_on_bad_input():
                report = merge_results(
                    manifest,
                    results,
                    out_csv,
                    batch_ids=[batch_id for d in downloads for batch_id in d["batch_ids"]],
                    allowed_roots=roots,
                    formula_escape=cfg.csv_formula_escape,
                    write_report=False,  # written once, finished, by write_reports
                    answered=new_answers.answered,
                )
            kept = new_answers.keep(manifest, work, results)
            if kept is not None:
                report["cache"] = kept
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
            report = write_reports(local_folder, out_csv, report, batches, cfg, estimate=estimate,
                                   shown=storage.shown(folder), problems=problems)  # fmt: skip
    results_csv = storage.shown(folder / "results.csv")
    summary = run_summary(report, cfg)
    if context is not None:  # the run's record in Airflow: the report tab and the spend page read it
        context["ti"].xcom_push(key=REPORT_XCOM, value=summary)
    if report.get("problems"):  # landed, and visible: the run fails; the work files stay for a look
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"results landed at {results_csv}, but not every row could be answered: "
            + " | ".join(report["problems"])
        )
    if not cfg.keep_temp_files:
        removed = remove_work_files(work)
        log.info("removed %d temporary file(s) in %s (keep_temp_files is off)", removed, storage.shown(work))
    log.info("results.csv: %s", results_csv)  # the last word: where the answers are
    if context is not None:  # tell downstream DAGs (scheduled on the Asset) what landed
        from openai_batch_airflow.assets import RESULTS_ASSET

        context["outlet_events"][RESULTS_ASSET].extra = {
            "results_csv": results_csv,
            "results_parquet": storage.shown(folder / "results.parquet"),
            "report_json": storage.shown(folder / "report.json"),
            "input_csv": storage.shown(cfg.input_csv),
            "run_id": run_id,
            **{k: report[k] for k in ("rows", "answered", "failed", "invalid")},
            "summary": summary,
        }
    return results_csv


def run_summary(report: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """The run's spend summary (:func:`batchpipe.spend.run_summary`) for XCom and the Asset event."""
    from batchpipe.spend import run_summary as summarize

    summary = summarize(report, input_csv=storage.shown(cfg.input_csv), storage_conn_id=cfg.storage_conn_id)
    summary["endpoint"] = cfg.endpoint
    return summary


class _NewAnswers:
    """The merge's side of the answer cache: collects the answers the merge put on their rows
    (:class:`batchpipe.cache.NewAnswers`, in the scratch folder ``tmp``) and keeps them in the run's
    cache (:meth:`keep`). Nothing to do without a cache, or in ``read_only`` mode."""

    def __init__(self, cfg: RunConfig, tmp: Path) -> None:
        from batchpipe.cache import NewAnswers

        self.cfg = cfg
        writes = cfg.cache_dir is not None and cfg.cache_mode != "read_only"
        self.new = NewAnswers(tmp) if writes else None

    def __enter__(self) -> _NewAnswers:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.new is not None:
            self.new.close()

    @property
    def answered(self):
        return self.new.answered if self.new is not None else None

    def keep(self, manifest: Path, work: storage.Location, results: list[Path]) -> dict[str, Any] | None:
        """Keep the new answers; report.json's ``cache`` (``{"folder", "mode", "added"}``, ``added`` None
        when writing failed: logged, the run's results stand), None without a cache."""
        from batchpipe.paths import redact_text

        cfg = self.cfg
        if cfg.cache_dir is None:
            return None
        out: dict[str, Any] = {"folder": storage.shown(cfg.cache_dir), "mode": cfg.cache_mode, "added": 0}
        if self.new is None:
            return out
        built = json.loads(manifest.read_text(encoding="utf-8"))
        local = manifest.parent / "shards"
        try:
            shards = [storage.fetch(work / Path(s["path"]).name, local) for s in built.get("shards") or ()]
            cache = cfg.open_cache()
            try:
                out["added"] = self.new.keep(cache, shards, results, cfg.endpoint, cfg.model)
            finally:
                cache.close()
        except Exception as exc:  # the answers landed; only the next run pays for them again
            log.warning("answer cache %s: new answers not kept: %s", out["folder"], redact_text(str(exc)))
            out["added"] = None
            return out
        log.info("answer cache %s: %d new answer(s) kept", out["folder"], out["added"])
        return out


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
        storage.remove_folder_if_empty(folder)
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


def _local_build_manifest(work: storage.Location, tmp: Path, csv_path: str) -> Path:
    """The build manifest as a local file (``invalid.jsonl`` and ``duplicates.jsonl`` beside it) for the
    merge, naming the input CSV as this task reads it (``csv_path``: a local copy of a CSV in object
    storage, else the CSV itself).

    Used in place when the work folder is local and the manifest already names ``csv_path``; otherwise
    a copy in ``tmp``, its ``csv`` entry pointing at ``csv_path``.
    """
    from batchpipe.build import CACHED_NAME, DUPLICATES_NAME
    from batchpipe.errors import InputError
    from batchpipe.merge import INVALID_NAME, MANIFEST_NAME

    source = work / MANIFEST_NAME
    try:
        local = storage.fetch(source, tmp / "work")  # the file itself when the work folder is local
        manifest = json.loads(local.read_text(encoding="utf-8"))
    except FileNotFoundError:
        found = f"{storage.shown(source)}: build manifest not found"
        raise InputError(f"{found} (run the build step first)") from None
    csv = str(Path(csv_path).resolve())
    if manifest.get("csv") != csv:  # the CSV was fetched for this task: the manifest names the copy
        manifest["csv"] = csv
        local = tmp / "work" / MANIFEST_NAME
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(manifest), encoding="utf-8")
    for name in (INVALID_NAME, DUPLICATES_NAME, CACHED_NAME):  # beside the manifest used (in place if local)
        stored = work / name
        if stored.exists():
            storage.publish(storage.fetch(stored, local.parent), local.parent / name)
    return local


def write_reports(
    folder: Path,
    out_csv: Path,
    report: dict[str, Any],
    batches: list[dict[str, Any]],
    cfg: RunConfig,
    estimate: Path | None = None,
    shown: str | None = None,
    problems: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Finish merge's ``report`` into report.json and report.html in the local ``folder`` with
    :func:`batchpipe.report.finish_report` (what ``batchpipe merge`` calls too): the model, the actual
    cost against the run's ``estimate`` (a local estimate.json, None: none), the batches, and
    ``problems`` (what the downloads could not finish) before merge's own. Returns the finished report.

    ``shown`` is where the files are stored (a URL for object storage), named in report.json and on the
    page instead of the local copies.
    """
    from batchpipe.report import finish_report

    full = finish_report(
        out_csv,
        report,
        estimate=estimate,
        batches=batches,
        model=cfg.model,
        prices=dict(cfg.prices),
        problems=problems,
        shown=shown,
    )
    where = f"{shown}/report.html" if shown else folder / "report.html"
    cost = full["cost_usd"]
    log.info("report: %s (actual Batch cost %s USD, estimated %s)", where, cost["actual_batch"],
             cost["estimated_batch_expected"])  # fmt: skip
    return full

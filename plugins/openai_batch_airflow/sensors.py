"""``OpenAIBatchSensor``: wait for one shard's batch, deferring to :class:`OpenAIBatchTrigger`,
and see it through to a final outcome for every request.

* **Resubmits.** When the batch ends (completed or expired) with requests that failed for a
  retryable reason (``batch_expired``, 429, 5xx), those request lines are copied byte for byte
  into a follow-up file, uploaded and submitted as a new batch, and the wait goes on; up to
  ``max_resubmits`` rounds. Permanent failures (4xx) are not resubmitted.
* **Enqueued token limit.** A batch that fails validation with ``token_limit_exceeded`` is
  created again from the same input file after ``token_limit_wait`` seconds (deferred: no worker
  is held), up to ``token_limit_retries`` times. Other validation failures fail the task with
  the service's messages, each mapped back to the request's ``custom_id`` (= CSV row).
* **Kill means cancel.** With ``cancel_on_kill`` (default), killing, clearing or marking the
  waiting task cancels the batch (the trigger's ``on_kill`` while deferred; :meth:`on_kill` here
  while the task itself runs).

Returns the ``create_batch`` manifest plus ``batch`` (final summary) and ``batches``: every
batch of the shard in order (round 0, follow-ups...), each with its round, so ``download`` and
``merge`` can take the latest outcome of every row.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from openai_batch_airflow import storage
from openai_batch_airflow.status import BatchStatus
from openai_batch_airflow.submit import generation, intent
from openai_batch_airflow.triggers import (
    OpenAIBatchTrigger,
    batch_summary,
    progress_line,
    unknown_status_note,
)

if TYPE_CHECKING:
    from openai_batch_airflow.hooks import OpenAIBatchHook


class OpenAIBatchSensor(BaseSensorOperator):
    """Wait until a shard's batch (and its follow-ups) reach a final outcome.

    :param batch: the ``create_batch`` manifest: ``batch_id``, and for resubmits the shard's
        ``path``, ``index`` and ``input_file_id``.
    :param conn_id: the OpenAI connection.
    :param check_interval: seconds between polls (at least 1).
    :param max_resubmits: follow-up rounds for retryable failures (0 = none).
    :param token_limit_wait: seconds to wait before re-creating a batch rejected for the enqueued
        token limit; ``token_limit_retries`` bounds how often.
    :param cancel_on_kill: cancel the batch when the task is killed, cleared or marked.
    :param expiry_margin: seconds past the batch's ``expires_at`` before the wait gives up.
    """

    template_fields = (
        "batch",
        "conn_id",
        "check_interval",
        "max_resubmits",
        "token_limit_wait",
        "cancel_on_kill",
    )

    def __init__(
        self,
        *,
        batch: dict[str, Any] | str,
        conn_id: str = "openai_default",
        check_interval: float | str = 60,
        deferrable: bool = True,
        max_consecutive_errors: int = 10,
        max_resubmits: int | str = 2,
        token_limit_wait: float | str = 600,
        token_limit_retries: int = 12,
        cancel_on_kill: bool | str = True,
        expiry_margin: float = 3600,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", timedelta(days=3))
        super().__init__(**kwargs)
        self.batch = batch
        self.conn_id = conn_id
        self.check_interval = check_interval
        self.deferrable = deferrable
        self.max_consecutive_errors = max_consecutive_errors
        self.max_resubmits = max_resubmits
        self.token_limit_wait = token_limit_wait
        self.token_limit_retries = token_limit_retries
        self.cancel_on_kill = cancel_on_kill
        self.expiry_margin = expiry_margin
        self._current: str | None = None

    # -- small helpers ----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self.batch) if isinstance(self.batch, dict) else {"batch_id": str(self.batch)}

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        """The hook of connection ``conn_id`` (read once the field is rendered)."""
        from openai_batch_airflow.hooks import OpenAIBatchHook  # the client, loaded when the task runs

        return OpenAIBatchHook(conn_id=self.conn_id)

    def _interval(self) -> float:
        interval = float(self.check_interval)
        if interval < 1:
            raise AirflowFailException(f"check_interval must be at least 1 second, got {interval}")
        return interval

    def _cancel_flag(self) -> bool:
        return str(self.cancel_on_kill).lower() not in ("false", "0", "no", "")

    # -- the wait ---------------------------------------------------------------------------------
    # The wait's progress (round, current batch, history) is kept in the task_state_store, which
    # survives deferrals and the task's retries (a retry resumes with the current follow-up batch),
    # and also passed as the deferral's kwargs.
    STATE_KEY = "wait_state"

    def _save(self, context: Any, state: dict[str, Any]) -> None:
        store = context.get("task_state_store")
        if store is not None:
            store.set(self.STATE_KEY, {**state, "generation": generation(context)})

    def _load(self, context: Any, passed: dict[str, Any] | None) -> dict[str, Any] | None:
        if passed:
            return passed
        store = context.get("task_state_store")
        saved = store.get(self.STATE_KEY) if store is not None else None
        if isinstance(saved, dict) and saved.get("generation") == generation(context):
            return {k: v for k, v in saved.items() if k != "generation"}
        return None

    def execute(self, context: Any) -> Any:
        m = self.manifest
        state = self._load(context, None)
        if state is not None and state.get("origin") == m["batch_id"]:
            self.log.info(
                "resuming the wait of an earlier try: round %s, batch %s", state["round"], state["batch_id"]
            )
        else:
            state = {
                "origin": m["batch_id"],
                "round": 0,
                "token_waits": 0,
                "batch_id": m["batch_id"],
                "input_file_id": m.get("input_file_id"),
                "shard_path": m.get("path"),
                "history": [],
            }
        return self._wait(context, state)

    def _wait(self, context: Any, state: dict[str, Any]) -> Any:
        """Look at the current batch once; finish it if it has ended, else defer (or poll here)."""
        self._current = state["batch_id"]
        summary = batch_summary(self.hook.retrieve(state["batch_id"]))
        self.log.info(progress_line(summary))
        if BatchStatus.ended(summary["status"]):
            return self._on_terminal(context, state, summary)
        deadline = (summary.get("expires_at") or time.time() + 24 * 3600) + float(self.expiry_margin)
        if note := unknown_status_note(summary, deadline):
            self.log.warning(note)
        self._save(context, state)
        if not self.deferrable:
            while not BatchStatus.ended(summary["status"]):
                if time.time() > deadline:
                    raise AirflowException(f"batch {summary['id']} has not ended by its deadline")
                time.sleep(self._interval())
                summary = batch_summary(self.hook.retrieve(state["batch_id"]))
                self.log.info(progress_line(summary))
                if note := unknown_status_note(summary, deadline):
                    self.log.warning(note)
            return self._on_terminal(context, state, summary)
        self.defer(
            trigger=OpenAIBatchTrigger(
                batch_id=state["batch_id"],
                conn_id=self.conn_id,
                poll_interval=self._interval(),
                max_consecutive_errors=self.max_consecutive_errors,
                deadline=deadline,
                cancel_on_kill=self._cancel_flag(),
            ),
            method_name="execute_complete",
            kwargs={"state": state},
            timeout=timedelta(seconds=max(deadline - time.time(), 0) + 600),
        )

    def execute_complete(
        self, context: Any, event: dict[str, Any] | None = None, state: dict[str, Any] | None = None
    ) -> Any:
        if not event:
            raise AirflowException(f"no event received while waiting for batch {self.manifest['batch_id']}")
        if event.get("status") != "done":
            raise AirflowException(event.get("message") or "waiting for the batch failed")
        state = self._load(context, state)
        if state is None:
            raise AirflowException("the wait's state was lost; clear the task to start the shard again")
        return self._on_terminal(context, state, event["batch"])

    def resubmit_after_wait(
        self, context: Any, event: dict[str, Any] | None = None, state: dict[str, Any] | None = None
    ) -> Any:
        """After a token-limit pause: create the batch again from the same input file."""
        state = self._load(context, state)
        if state is None:
            raise AirflowException("the wait's state was lost; clear the task to start the shard again")
        batch = self.hook.create_once(
            intent(context, f"token-retry-{state['round']}-{state['token_waits']}"),
            metadata=self._metadata(context, state),
            input_file_id=state["input_file_id"],
            endpoint=state["history"][-1]["endpoint"],
            completion_window="24h",
        )
        self.log.info("re-created the batch after the token-limit pause: %s", batch.id)
        state["batch_id"] = batch.id
        return self._wait(context, state)

    # -- outcomes ---------------------------------------------------------------------------------
    def _on_terminal(self, context: Any, state: dict[str, Any], summary: dict[str, Any]) -> Any:
        # the final status line was logged by whoever looked last (this task's poll, or the trigger)
        summary = {**summary, "round": state["round"]}
        state["history"].append(summary)
        if summary["status"] == "failed":
            return self._on_failed(context, state, summary)
        if summary["status"] in ("expired", "cancelled"):
            self.log.warning(
                "batch %s ended %s: %d requests completed and are kept",
                summary["id"],
                summary["status"],
                summary["request_counts"]["completed"],
            )
        status = BatchStatus.of(summary["status"])
        if status and status.is_resubmittable and state["round"] < int(self.max_resubmits):
            if self._resubmit(context, state, summary):
                return self._wait(context, state)
        return self._result(state, summary)

    def _result(self, state: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.manifest,
            "batch": summary,
            "batches": state["history"],
            "problems": state.get("problems") or [],
        }

    def _on_failed(self, context: Any, state: dict[str, Any], summary: dict[str, Any]) -> Any:
        codes = {e.get("code") for e in summary.get("errors") or []}
        if "token_limit_exceeded" in codes and state["token_waits"] < int(self.token_limit_retries):
            state["token_waits"] += 1
            wait = float(self.token_limit_wait)
            self.log.warning(
                "batch %s was refused: enqueued token limit reached (%s). Waiting %.0fs before "
                "submitting it again (%d/%d)",
                summary["id"],
                "; ".join(e.get("message") or "" for e in summary["errors"]),
                wait,
                state["token_waits"],
                int(self.token_limit_retries),
            )
            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            self._save(context, state)
            self.defer(
                trigger=TimeDeltaTrigger(timedelta(seconds=wait)),
                method_name="resubmit_after_wait",
                kwargs={"state": state},
            )
        details = "; ".join(self._describe_error(e, state) for e in summary.get("errors") or [])
        if state["round"] > 0:  # a follow-up: what earlier rounds answered is merged, the run then fails
            earlier = state["history"][-2] if len(state["history"]) > 1 else summary
            self._refused_followup(state, earlier, f"failed validation: {details or 'no details'}",
                                   summary["request_counts"].get("total") or 0)  # fmt: skip
            return self._result(state, summary)
        raise AirflowFailException(
            f"batch {summary['id']} failed validation: {details or 'no details given'}"
        )

    def _describe_error(self, error: dict[str, Any], state: dict[str, Any]) -> str:
        text = f"{error.get('code')}: {error.get('message')}"
        line = error.get("line")
        if not line or not state.get("shard_path"):
            return text
        custom_id = self._custom_id_at_line(state["shard_path"], int(line))
        where = f"line {line} of {str(state['shard_path']).rsplit('/', 1)[-1]}"
        return f"{where} (custom_id {custom_id}): {text}" if custom_id else f"{where}: {text}"

    def _resubmit(self, context: Any, state: dict[str, Any], summary: dict[str, Any]) -> bool:
        """Submit the retryable failures of ``summary`` as a follow-up batch; False if there are none."""
        if not summary.get("error_file_id") and summary["request_counts"]["failed"] == 0:
            return False
        with storage.scratch() as tmp:
            return self._resubmit_via(context, state, summary, tmp)

    def _resubmit_via(self, context: Any, state: dict[str, Any], summary: dict[str, Any], tmp: Path) -> bool:
        from batchpipe.resubmit import select_retryable, write_followup

        work = self._location(self.manifest.get("work_dir") or str(self.manifest["path"]).rsplit("/", 1)[0])
        index = int(self.manifest.get("index", 0))
        files, problems = self.hook.download_results(summary, work / "results", index, tmp)
        summary["files"] = [stored for stored, _ in files]
        state.setdefault("problems", []).extend(problems)
        retry = select_retryable([local for _, local in files])
        if not retry:
            return False
        nxt = state["round"] + 1
        fname = f"shard-{index:05d}.r{nxt}.jsonl"
        source = storage.fetch(self._location(state["shard_path"]), tmp / "source")
        followup = write_followup(source, retry, tmp / fname)  # stored beside the shard by publish below
        if followup["unknown"]:
            self.log.warning(
                "batch %s: the service listed %d custom_id(s) this shard never sent; ignored: %s",
                summary["id"],
                followup["unknown"],
                followup["unknown_ids"],
            )
        if not followup["requests"]:
            return False
        storage.publish(Path(followup["path"]), work / fname)
        self.log.warning(
            "batch %s: %d requests failed for a retryable reason; resubmitting them (round %d of %s)",
            summary["id"],
            len(retry),
            nxt,
            self.max_resubmits,
        )
        name = f"{context['dag'].dag_id}-{context['run_id']}-shard-{index:05d}-r{nxt}"
        try:
            uploaded = self.hook.upload_once(followup["path"], name, intent(context, f"upload-r{nxt}"))
            state.update(round=nxt, input_file_id=uploaded.id, shard_path=storage.shown(work / fname))
            batch = self.hook.create_once(
                intent(context, f"create-r{nxt}"),
                metadata=self._metadata(context, state),
                input_file_id=uploaded.id,
                endpoint=summary["endpoint"],
                completion_window="24h",
            )
        except Exception as exc:
            if not _refused(exc):
                raise  # transient: the task's retry resumes here
            # the answers we have are kept and merged; the rows keep their last error; the run fails
            state["round"] = nxt - 1
            self._refused_followup(state, summary, f"{type(exc).__name__}: {exc}", len(retry))
            return False
        self.log.info("follow-up batch %s with %d requests", batch.id, followup["requests"])
        state["batch_id"] = batch.id
        return True

    def _refused_followup(self, state: dict[str, Any], summary: dict[str, Any], why: str, rows: int) -> None:
        problem = (
            f"shard {self.manifest.get('index', 0)}: the follow-up batch for {rows} request(s) of batch "
            f"{summary['id']} was refused ({why}); those rows keep their last error"
        )
        self.log.error("%s", problem)
        state.setdefault("problems", []).append(problem)

    def _location(self, where: str) -> Any:
        return storage.location(where, self.manifest.get("storage_conn_id"))

    def _custom_id_at_line(self, where: str, line: int) -> str | None:
        try:
            return _custom_id_at_line(self._location(where), line)
        except Exception:  # only decorates an error message
            return None

    def _metadata(self, context: Any, state: dict[str, Any]) -> dict[str, str]:
        return {
            "dag_id": context["dag"].dag_id[:512],
            "run_id": context["run_id"][:512],
            "shard": str(self.manifest.get("index", 0)),
            "round": str(state["round"]),
        }

    def on_kill(self) -> None:
        """Killed while running on a worker (not deferred): cancel the current batch."""
        if self._current and self._cancel_flag():
            try:
                self.hook.cancel(self._current)
                self.log.warning("task killed: cancelled batch %s", self._current)
            except Exception as exc:  # best effort: the task is going away
                self.log.warning("could not cancel batch %s: %s", self._current, exc)


#: HTTP statuses that mean "no": trying again will not change the answer. Anything else (408, 409, 429,
#: 5xx, a lost connection) may have gone through or may pass next time: the task's retry looks for what
#: it recorded first (never a second batch), then tries again.
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 415, 422})


def _refused(exc: BaseException) -> bool:
    """An API error that trying again will not fix (:data:`REFUSED_STATUSES`)."""
    import openai

    return isinstance(exc, openai.APIStatusError) and exc.status_code in REFUSED_STATUSES


def _custom_id_at_line(path: Any, line: int) -> str | None:
    """The custom_id of the 1-based ``line`` of a request file (None if unreadable)."""
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if number == line:
                    return json.loads(raw).get("custom_id")
    except (OSError, ValueError, AttributeError):
        return None
    return None

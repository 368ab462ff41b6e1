"""``OpenAIBatchWaitOperator``: see a group of shards' batches through to a final outcome for every
request, waiting in the triggerer (:class:`~openai_batch_airflow.triggers.OpenAIBatchTrigger`).

An operator, not a sensor: besides waiting it submits batches of its own.

* **Resubmits.** When a batch ends (completed or expired) with requests that failed for a retryable
  reason (``batch_expired``, 429, 5xx), those request lines are copied byte for byte into a follow-up
  file, uploaded and submitted as a new batch, and the wait goes on; up to ``max_resubmits`` rounds per
  shard. Permanent failures (4xx) are not resubmitted.
* **Enqueued token limit.** A batch that fails validation with ``token_limit_exceeded`` is created
  again from the same input file after ``token_limit_wait`` seconds (the trigger wakes the task then: no
  worker is held meanwhile), up to ``token_limit_retries`` times.
* **One shard's trouble is that shard's.** A batch that fails validation (the service's messages mapped
  back to each request's ``custom_id`` = CSV row), a shard whose upload or create was refused, a batch
  that can no longer be polled (404, persistent errors) or that outlives its deadline: that shard ends
  with a problem naming it, its rows get that precise error (``unfinished``, written by ``download``),
  and the group's other batches are waited for as usual. The merge then lands every row and fails the
  run, naming the problems: nothing another batch answered is thrown away.
* **Kill means cancel.** With ``cancel_on_kill`` (default), killing, clearing or marking the waiting
  task cancels its batches (the trigger's ``on_kill`` while deferred; :meth:`on_kill` here while the task
  itself runs).

One task instance waits for a whole group of shards (``create_batch``'s manifest: ``{"group", "shards"}``),
so any number of shards maps to a bounded number of task instances (``batchpipe.build.group_shards``); one
trigger polls the group's running batches, and every batch's progress is logged.

Returns the group with, for each shard, ``batch`` (its final summary), ``batches`` (every batch of the
shard in order, round 0 then follow-ups, each with its round, so ``download`` and ``merge`` take the latest
outcome of every row), ``problems`` (what could not be finished, e.g. a refused follow-up) and
``unfinished`` (None, or the error for every request of ``path`` that never got an outcome: ``code``,
``message``, ``lines`` = messages the service gave for some 1-based lines).
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from openai_batch_airflow import storage
from openai_batch_airflow.links import BatchReportLink
from openai_batch_airflow.status import BatchStatus
from openai_batch_airflow.submit import generation, intent, refused
from openai_batch_airflow.triggers import (
    OpenAIBatchTrigger,
    batch_summary,
    progress_line,
    unknown_status_note,
)

if TYPE_CHECKING:
    from openai_batch_airflow.hooks import BatchAPI


class OpenAIBatchWaitOperator(BaseOperator):
    """Wait until every batch of a group of shards (and their follow-ups) reaches a final outcome.

    :param group: the ``create_batch`` manifest, ``{"group": n, "shards": [...]}``, each shard with its
        ``batch_id`` and, for resubmits, its ``path``, ``index``, ``input_file_id``, ``work_dir`` and
        ``storage_conn_id``; one shard's manifest or a batch id alone is a group of one.
    :param conn_id: the batch API's connection (None: the provider's default, :data:`DEFAULT_CONN_IDS`).
    :param provider: ``openai``, ``azure_openai`` or ``anthropic``: the batch API behind the hook.
    :param check_interval: seconds between polls (at least 1).
    :param max_consecutive_errors: transient polling failures of one batch in a row that fail the wait.
    :param max_resubmits: follow-up rounds for retryable failures per shard (0 = none).
    :param token_limit_wait: seconds to wait before re-creating a batch rejected for the enqueued
        token limit; ``token_limit_retries`` bounds how often per shard.
    :param cancel_on_kill: cancel the batches when the task is killed, cleared or marked.
    :param expiry_margin: seconds past a batch's ``expires_at`` before the wait gives up on it.
    """

    operator_extra_links = (BatchReportLink(),)
    template_fields = (
        "group",
        "conn_id",
        "provider",
        "check_interval",
        "max_resubmits",
        "token_limit_wait",
        "cancel_on_kill",
    )

    def __init__(
        self,
        *,
        group: dict[str, Any] | str,
        conn_id: str | None = None,
        provider: str = "openai",
        check_interval: float | str = 60,
        max_consecutive_errors: int = 10,
        max_resubmits: int | str = 2,
        token_limit_wait: float | str = 600,
        token_limit_retries: int = 12,
        cancel_on_kill: bool | str = True,
        expiry_margin: float = 3600,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.group = group
        self.conn_id = conn_id
        self.provider = provider
        self.check_interval = check_interval
        self.max_consecutive_errors = max_consecutive_errors
        self.max_resubmits = max_resubmits
        self.token_limit_wait = token_limit_wait
        self.token_limit_retries = token_limit_retries
        self.cancel_on_kill = cancel_on_kill
        self.expiry_margin = expiry_margin
        self._current: list[str] = []

    # -- small helpers ----------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict[str, Any]]:
        """The group's shard manifests, in order."""
        if isinstance(self.group, dict):
            return [dict(s) for s in self.group["shards"]] if "shards" in self.group else [dict(self.group)]
        return [{"batch_id": str(self.group)}]

    @cached_property
    def hook(self) -> BatchAPI:
        """The hook of ``provider`` on connection ``conn_id`` (read once the fields are rendered)."""
        from openai_batch_airflow.hooks import batch_hook  # the client, loaded when the task runs

        return batch_hook(self.provider or "openai", self.conn_id or None)

    def _interval(self) -> float:
        interval = float(self.check_interval)
        if interval < 1:
            raise AirflowFailException(f"check_interval must be at least 1 second, got {interval}")
        return interval

    def _cancel_flag(self) -> bool:
        return str(self.cancel_on_kill).lower() not in ("false", "0", "no", "")

    # -- the wait ---------------------------------------------------------------------------------
    # The wait's progress (per shard: round, current batch, history) is kept in the task_state_store,
    # which survives deferrals and the task's retries (a retry resumes with the current follow-up
    # batches), and also passed as the deferral's kwargs.
    STATE_KEY = "wait_state"

    def _save(self, context: Any, state: dict[str, Any]) -> None:
        store = context.get("task_state_store")
        if store is not None:
            store.set(self.STATE_KEY, {**state, "generation": generation(context)})

    def _load(
        self, context: Any, passed: dict[str, Any] | None, *, cleared: bool = False
    ) -> dict[str, Any] | None:
        """The wait's state: ``passed`` (the deferral's kwargs), else this generation's saved state
        (``cleared``: the saved state of an earlier generation, before the task was cleared)."""
        if passed:
            return passed
        store = context.get("task_state_store")
        saved = store.get(self.STATE_KEY) if store is not None else None
        if isinstance(saved, dict) and (saved.get("generation") == generation(context)) != cleared:
            return {k: v for k, v in saved.items() if k != "generation"}
        return None

    def execute(self, context: Any) -> Any:
        self._interval()  # a bad value fails now, not after the first wait
        shards = self.shards
        self._check(shards)
        origin = [s.get("batch_id") for s in shards]
        state = self._load(context, None)
        if state is not None and state.get("origin") == origin:
            self.log.info(
                "resuming the wait of an earlier try: %s",
                ", ".join(
                    f"shard {s['index']} round {s['round']} batch {s['batch_id']}" for s in state["shards"]
                ),
            )
        elif (earlier := self._load(context, None, cleared=True)) and earlier.get("origin") == origin:
            state = self._reopen(earlier)
        else:
            state = {"origin": origin, "shards": [self._start(m) for m in shards]}
        self._current = self._running(state)
        active = [sh for sh in state["shards"] if not sh["done"] and sh["batch_id"]]
        return self._advance(context, state, [], look=active)

    def _reopen(self, state: dict[str, Any]) -> dict[str, Any]:
        """The wait of a cleared task goes on from where the last one stopped: what was resubmitted is
        not submitted (and paid for) again, a shard that ended stays ended, and a shard whose batch could
        no longer be polled (``wait_stopped``) has that batch polled again."""
        for sh in state["shards"]:
            stopped = sh.get("unfinished") or {}
            if sh["done"] and stopped.get("code") == "wait_stopped" and sh["batch_id"]:
                sh["done"], sh["unfinished"] = False, None
                problem = f"shard {sh['index']}: {stopped.get('message')}"
                sh["problems"] = [p for p in sh["problems"] if p != problem]
                self.log.info("shard %s: waiting again for batch %s", sh["index"], sh["batch_id"])
        self.log.info(
            "the task was cleared: the wait goes on from where it stopped (%s); nothing is submitted twice",
            ", ".join(
                f"shard {sh['index']} round {sh['round']} batch {sh['batch_id']}"
                + (" (ended)" if sh["done"] else "")
                for sh in state["shards"]
            ),
        )
        return state

    def _check(self, shards: list[dict[str, Any]]) -> None:
        """A group the operator can wait for: distinct shard indices, each shard with a batch or the reason
        it has none."""
        indices = [int(m.get("index", 0)) for m in shards]
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            raise AirflowFailException(f"the group lists shard(s) {twice} more than once")
        for m in shards:
            if not m.get("batch_id") and not m.get("refused"):
                raise AirflowFailException(
                    f"shard {m.get('index', 0)} has no batch_id (and no reason it has none): {m!r:.300}"
                )

    def _start(self, m: dict[str, Any]) -> dict[str, Any]:
        """A shard's state at the start of the wait (a shard whose upload or create was refused is over)."""
        sh = {
            "index": int(m.get("index", 0)),
            "round": 0,
            "token_waits": 0,
            "batch_id": m.get("batch_id"),
            "input_file_id": m.get("input_file_id"),
            "shard_path": m.get("path"),
            "history": [],
            "problems": [],
            "retry_at": None,
            "deadline": None,
            "done": False,
            "unfinished": None,
        }
        if not sh["batch_id"]:
            self._give_up(sh, "batch_refused", str(m["refused"]))
        return sh

    @staticmethod
    def _running(state: dict[str, Any]) -> list[str]:
        return [sh["batch_id"] for sh in state["shards"] if not sh["done"] and sh["batch_id"]]

    def execute_complete(
        self, context: Any, event: dict[str, Any] | None = None, state: dict[str, Any] | None = None
    ) -> Any:
        if not event:
            ids = ", ".join(str(m.get("batch_id")) for m in self.shards)
            raise AirflowException(f"no event received while waiting for batch(es) {ids}")
        if event.get("status") not in ("done", "wake"):
            raise AirflowException(event.get("message") or "waiting for the batches failed")
        state = self._load(context, state)
        if state is None:
            raise AirflowException("the wait's state was lost; clear the task to start its shards again")
        self._current = self._running(state)
        for failure in event.get("failed") or []:
            which = failure.get("batch_id")
            sh = next((s for s in state["shards"] if not s["done"] and s["batch_id"] == which), None)
            if sh is not None:
                message = str(failure.get("message") or "waiting for it failed")
                self._give_up(sh, "wait_stopped", f"{message}; its requests got no outcome here")
        return self._advance(context, state, list(event.get("ended") or []))

    def _advance(
        self,
        context: Any,
        state: dict[str, Any],
        ended: list[dict[str, Any]],
        look: list[dict[str, Any]] = (),
    ) -> Any:
        """Settle every batch that ended (resubmit, re-create after a token-limit pause, or finish its
        shard), look once at each batch submitted meanwhile, then defer for the ones still running; return
        the group's outcome once every shard has one."""
        import openai

        by_id = {s["id"]: s for s in ended}
        look = list(look)
        while True:
            for sh in look:
                try:
                    summary = batch_summary(self.hook.retrieve(sh["batch_id"]))
                except openai.APIError as exc:  # the trigger polls it, and decides what an error means
                    self.log.warning("batch %s: could not look at it now (%s); the trigger polls it",
                                     sh["batch_id"], exc)  # fmt: skip
                    sh["deadline"] = sh["deadline"] or time.time() + 24 * 3600 + float(self.expiry_margin)
                    continue
                self.log.info(progress_line(summary))
                sh["deadline"] = (summary.get("expires_at") or time.time() + 24 * 3600) + float(
                    self.expiry_margin
                )
                if BatchStatus.ended(summary["status"]):
                    by_id[summary["id"]] = summary
                elif note := unknown_status_note(summary, sh["deadline"]):
                    self.log.warning(note)
            look = []
            for sh in state["shards"]:
                summary = by_id.pop(sh["batch_id"], None) if not sh["done"] and sh["batch_id"] else None
                if summary is None:
                    continue
                before = sh["batch_id"]
                self._on_terminal(context, sh, summary)
                if not sh["done"] and sh["batch_id"] and sh["batch_id"] != before:
                    self._current.append(sh["batch_id"])  # a follow-up batch
                    look.append(sh)
            now = time.time()
            for sh in state["shards"]:
                if (
                    not sh["done"]
                    and not sh["batch_id"]
                    and sh["retry_at"] is not None
                    and sh["retry_at"] <= now
                ):
                    if self._recreate(context, sh):
                        self._current.append(sh["batch_id"])
                        look.append(sh)
            if not look:
                break
        waiting = [sh for sh in state["shards"] if not sh["done"]]
        if not waiting:
            self._save(context, state)  # a clear goes on from here (see _reopen)
            return self._result(state)
        running = [sh for sh in waiting if sh["batch_id"]]
        self._current = [sh["batch_id"] for sh in running]
        wakes = [sh["retry_at"] for sh in waiting if not sh["batch_id"] and sh["retry_at"] is not None]
        deadlines = {sh["batch_id"]: sh["deadline"] for sh in running if sh["deadline"]}
        wake_at = min(wakes, default=None)
        until = min([*deadlines.values(), *([wake_at] if wake_at is not None else [])], default=time.time())
        self._save(context, state)
        self.defer(
            trigger=OpenAIBatchTrigger(
                batch_ids=self._current,
                conn_id=self.hook.conn_id,
                provider=self.hook.provider,
                poll_interval=self._interval(),
                max_consecutive_errors=self.max_consecutive_errors,
                cancel_on_kill=self._cancel_flag(),
                wake_at=wake_at,
                deadlines=deadlines,
            ),
            method_name="execute_complete",
            kwargs={"state": state},
            timeout=timedelta(seconds=max(until - time.time(), 0) + 600),
        )

    def _recreate(self, context: Any, sh: dict[str, Any]) -> bool:
        """After a token-limit pause: create the shard's batch again from the same input file. False when
        the service refuses (the shard then ends with that problem); a transient error goes up (the task's
        retry resumes the wait and re-attaches to a batch this try may have made)."""
        try:
            batch = self.hook.create_once(
                intent(context, f"token-retry-{sh['index']}-{sh['round']}-{sh['token_waits']}"),
                metadata=self._metadata(context, sh),
                input_file_id=sh["input_file_id"],
                endpoint=sh["history"][-1]["endpoint"],
                completion_window="24h",
            )
        except Exception as exc:
            if not refused(exc):
                raise
            sh["retry_at"] = None
            why = "creating the batch again after the token-limit pause was refused"
            self._give_up(sh, "batch_refused", f"{why}: {type(exc).__name__}: {exc}")
            return False
        self.log.info("shard %s: re-created the batch after the token-limit pause: %s", sh["index"], batch.id)
        sh["batch_id"], sh["retry_at"] = batch.id, None
        return True

    def _give_up(
        self, sh: dict[str, Any], code: str, message: str, lines: dict[int, str] | None = None
    ) -> None:
        """End a shard whose current requests got no outcome: say so (a problem, logged as an error) and
        record the error its rows get (``unfinished``; ``lines``: messages for some 1-based lines of the
        request file). The group's other shards go on."""
        sh["done"] = True
        sh["unfinished"] = {
            "code": code,
            "message": message,
            "lines": {str(k): v for k, v in (lines or {}).items()},
            "path": sh["shard_path"],
        }
        problem = f"shard {sh['index']}: {message}"
        self.log.error("%s", problem)
        sh["problems"].append(problem)

    # -- outcomes ---------------------------------------------------------------------------------
    def _on_terminal(self, context: Any, sh: dict[str, Any], summary: dict[str, Any]) -> None:
        """One shard's batch ended: resubmit what may pass next time, pause for the token limit, or mark
        the shard done. The final status line was logged by whoever looked last (a poll here, or the
        trigger)."""
        summary = {**summary, "round": sh["round"]}
        sh["history"].append(summary)
        if summary["status"] == "failed":
            self._on_failed(context, sh, summary)
            return
        if summary["status"] in ("expired", "cancelled"):
            self.log.warning(
                "batch %s ended %s: %d requests completed and are kept",
                summary["id"],
                summary["status"],
                summary["request_counts"]["completed"],
            )
        status = BatchStatus.of(summary["status"])
        if status and status.is_resubmittable and sh["round"] < int(self.max_resubmits):
            if self._resubmit(context, sh, summary):
                return
        sh["done"] = True

    def _result(self, state: dict[str, Any]) -> dict[str, Any]:
        by_index = {sh["index"]: sh for sh in state["shards"]}
        shards = []
        for m in self.shards:
            sh = by_index[int(m.get("index", 0))]
            last = sh["history"][-1] if sh["history"] else {
                "id": sh["batch_id"], "status": None, "round": sh["round"], "endpoint": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }  # fmt: skip
            shards.append({**m, "batch": last, "batches": sh["history"], "problems": sh["problems"],
                           "unfinished": sh.get("unfinished")})  # fmt: skip
        base = dict(self.group) if isinstance(self.group, dict) and "shards" in self.group else {}
        return {**base, "shards": shards}

    def _on_failed(self, context: Any, sh: dict[str, Any], summary: dict[str, Any]) -> None:
        codes = {e.get("code") for e in summary.get("errors") or []}
        if "token_limit_exceeded" in codes and sh["token_waits"] < int(self.token_limit_retries):
            sh["token_waits"] += 1
            wait = float(self.token_limit_wait)
            self.log.warning(
                "batch %s was refused: enqueued token limit reached (%s). Waiting %.0fs before "
                "submitting it again (%d/%d)",
                summary["id"],
                "; ".join(e.get("message") or "" for e in summary["errors"]),
                wait,
                sh["token_waits"],
                int(self.token_limit_retries),
            )
            sh["batch_id"], sh["retry_at"] = None, time.time() + wait
            return
        errors = summary.get("errors") or []
        details = "; ".join(self._describe_error(e, sh) for e in errors)
        if sh["round"] > 0:  # a follow-up: what earlier rounds answered is merged, the run then fails
            earlier = sh["history"][-2] if len(sh["history"]) > 1 else summary
            self._refused_followup(sh, earlier, f"failed validation: {details or 'no details'}",
                                   summary["request_counts"].get("total") or 0)  # fmt: skip
            sh["done"] = True
            return
        why = f"batch {summary['id']} failed validation"
        lines = {e["line"]: f"{why}: {self._describe_error(e, sh)}" for e in errors
                 if isinstance(e.get("line"), int) and e["line"] > 0}  # fmt: skip
        self._give_up(sh, "batch_failed", f"{why}: {details or 'no details'}", lines)

    def _describe_error(self, error: dict[str, Any], sh: dict[str, Any]) -> str:
        text = f"{error.get('code')}: {error.get('message')}"
        line = error.get("line")
        if not line or not sh.get("shard_path"):
            return text
        custom_id = self._custom_id_at_line(sh, sh["shard_path"], int(line))
        where = f"line {line} of {str(sh['shard_path']).rsplit('/', 1)[-1]}"
        return f"{where} (custom_id {custom_id}): {text}" if custom_id else f"{where}: {text}"

    def _manifest(self, sh: dict[str, Any]) -> dict[str, Any]:
        """The shard's manifest from ``create_batch``."""
        return next((m for m in self.shards if int(m.get("index", 0)) == sh["index"]), {})

    def _resubmit(self, context: Any, sh: dict[str, Any], summary: dict[str, Any]) -> bool:
        """Submit the retryable failures of ``summary`` as a follow-up batch; False if there are none."""
        if not summary.get("error_file_id") and summary["request_counts"]["failed"] == 0:
            return False
        with storage.scratch() as tmp:
            return self._resubmit_via(context, sh, summary, tmp)

    def _resubmit_via(self, context: Any, sh: dict[str, Any], summary: dict[str, Any], tmp: Path) -> bool:
        from batchpipe.resubmit import select_retryable, write_followup

        m = self._manifest(sh)
        work = self._location(sh, m.get("work_dir") or str(m["path"]).rsplit("/", 1)[0])
        index = sh["index"]
        files, problems = self.hook.download_results(summary, work / "results", index, tmp)
        summary["files"] = [stored for stored, _ in files]
        sh["problems"].extend(problems)
        retry = select_retryable([local for _, local in files])
        if not retry:
            return False
        nxt = sh["round"] + 1
        fname = f"shard-{index:05d}.r{nxt}.jsonl"
        source = storage.fetch(self._location(sh, sh["shard_path"]), tmp / "source")
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
            file_id = None
            if self.hook.uploads_files:
                file_id = self.hook.upload_once(
                    followup["path"], name, intent(context, f"upload-{index}-r{nxt}")
                ).id
            sh.update(round=nxt, input_file_id=file_id, shard_path=storage.shown(work / fname))
            batch = self.hook.create_once(
                intent(context, f"create-{index}-r{nxt}"),
                metadata=self._metadata(context, sh),
                input_file_id=file_id,
                endpoint=summary["endpoint"],
                completion_window="24h",
                requests_path=followup["path"],
                requests=followup["requests"],
            )
        except Exception as exc:
            if not refused(exc):
                raise  # transient: the task's retry resumes here
            # the answers we have are kept and merged; the rows keep their last error; the run fails
            sh["round"] = nxt - 1
            self._refused_followup(sh, summary, f"{type(exc).__name__}: {exc}", len(retry))
            return False
        self.log.info("follow-up batch %s with %d requests", batch.id, followup["requests"])
        sh["batch_id"] = batch.id
        return True

    def _refused_followup(self, sh: dict[str, Any], summary: dict[str, Any], why: str, rows: int) -> None:
        problem = (
            f"shard {sh['index']}: the follow-up batch for {rows} request(s) of batch "
            f"{summary['id']} was refused ({why}); those rows keep their last error"
        )
        self.log.error("%s", problem)
        sh["problems"].append(problem)

    def _location(self, sh: dict[str, Any], where: str) -> Any:
        return storage.location(where, self._manifest(sh).get("storage_conn_id"))

    def _custom_id_at_line(self, sh: dict[str, Any], where: str, line: int) -> str | None:
        try:
            return _custom_id_at_line(self._location(sh, where), line)
        except Exception:  # only decorates an error message
            return None

    def _metadata(self, context: Any, sh: dict[str, Any]) -> dict[str, str]:
        return {
            "dag_id": context["dag"].dag_id[:512],
            "run_id": context["run_id"][:512],
            "shard": str(sh["index"]),
            "round": str(sh["round"]),
        }

    def on_kill(self) -> None:
        """Killed while running on a worker (not deferred): cancel the current batches."""
        if not self._cancel_flag():
            return
        for batch_id in self._current:
            try:
                self.hook.cancel(batch_id)
                self.log.warning("task killed: cancelled batch %s", batch_id)
            except Exception as exc:  # best effort: the task is going away
                self.log.warning("could not cancel batch %s: %s", batch_id, exc)


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

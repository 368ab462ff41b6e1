"""Deferrable wait for an OpenAI batch: the trigger that runs in the triggerer.

Lives outside ``dags/`` (in an installed package that is also on the plugins path) because the
triggerer process imports triggers by class path and cannot import code from a DAG bundle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from openai_batch_airflow.status import BatchStatus
from openai_batch_airflow.submit import refused

if TYPE_CHECKING:
    from openai_batch_airflow.hooks import BatchAPI


#: How a provider is named in messages.
PROVIDER_NAMES = {"openai": "OpenAI", "azure_openai": "Azure OpenAI", "anthropic": "Anthropic"}


def unknown_status_note(summary: dict[str, Any], deadline: float | None) -> str | None:
    """A warning for a status the pipeline does not know (a new one, or a proxy's own), else None: such a
    batch is treated as still running, polled until it reaches a known end or the deadline."""
    if BatchStatus.of(summary.get("status")) is not None:
        return None
    try:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline)) if deadline else "its expiry"
    except (OverflowError, ValueError, OSError):  # a deadline no clock can show
        until = "its deadline"
    known = ", ".join(sorted(s.value for s in BatchStatus))
    return (
        f"batch {summary.get('id')}: unknown status {str(summary.get('status'))[:80]!r} (known: "
        f"{known}); treated as still running, waited for until {until}"
    )


def batch_summary(batch: Any) -> dict[str, Any]:
    """The small, JSON-able part of a Batch object that the pipeline needs downstream."""
    data = batch.model_dump() if hasattr(batch, "model_dump") else dict(batch)
    counts = data.get("request_counts") or {}
    errors = (data.get("errors") or {}).get("data") or []
    known = BatchStatus.of(data.get("status"))  # a documented status in its documented spelling
    return {
        "id": data.get("id"),
        "status": known.value if known is not None else data.get("status"),
        "endpoint": data.get("endpoint"),
        # Azure OpenAI may say "" for a file it has not made: no file
        "input_file_id": data.get("input_file_id") or None,
        "output_file_id": data.get("output_file_id") or None,
        "error_file_id": data.get("error_file_id") or None,
        "request_counts": {  # null while validating on Azure: none yet
            "total": counts.get("total") or 0,
            "completed": counts.get("completed") or 0,
            "failed": counts.get("failed") or 0,
        },
        "errors": [{k: e.get(k) for k in ("code", "message", "param", "line")} for e in errors[:20]],
        "usage": data.get("usage"),
        "created_at": data.get("created_at"),
        "in_progress_at": data.get("in_progress_at"),
        "finalizing_at": data.get("finalizing_at"),
        "completed_at": data.get("completed_at"),
        "failed_at": data.get("failed_at"),
        "expired_at": data.get("expired_at"),
        "cancelled_at": data.get("cancelled_at"),
        "expires_at": data.get("expires_at"),
        "metadata": data.get("metadata"),
    }


def progress_line(summary: dict[str, Any]) -> str:
    c = summary["request_counts"]
    return (
        f"batch {summary['id']}: status={summary['status']} "
        f"completed={c['completed']} failed={c['failed']} total={c['total']}"
    )


@dataclass(frozen=True)
class PollError:
    """One poll that failed: the batch, what went wrong, and whether trying again may help (408, 409, 429,
    5xx, a lost connection, a timeout, an answer that does not parse) or not (the statuses of
    :data:`~openai_batch_airflow.submit.REFUSED_STATUSES`: 401, 404, ...)."""

    batch_id: str
    text: str
    transient: bool


@dataclass(frozen=True)
class Step:
    """What the trigger does next: yield ``event`` and stop, or sleep ``sleep`` seconds and poll again."""

    event: dict[str, Any] | None = None
    sleep: float = 0.0


class BatchPoller:
    """The trigger's decisions, without I/O: given what one round of polls saw, end the wait (with which
    event) or poll again (after how long). Unit-tested without a triggerer or a server.

    The wait ends with ``{"status": "done", "ended": [summaries], "failed": [{"batch_id", "message"}]}`` as
    soon as a round has news for the operator, which settles those batches and waits again for the rest:

    * ``ended``: every batch that reached a terminal status in the round.
    * ``failed``: every batch that can no longer be followed: a permanent polling error (401, 404, ...),
      ``max_consecutive_errors`` transient ones in a row (429, 5xx, a lost connection or a timeout; until
      then the next round comes after a backoff, doubling from ``poll_interval`` up to
      ``max(poll_interval, 300 s)``), or its deadline passed (``deadlines[batch_id]``, else ``deadline``).
      One batch's trouble never ends the others' wait: the operator finishes that shard with the message
      and waits on.

    ``wake_at`` (Unix time) reached: ``{"status": "wake"}`` (a batch the operator holds back, waiting for
    room under the enqueued-token limit, is due); the sleep before it is cut short to meet it.
    """

    MAX_BACKOFF = 300.0

    def __init__(
        self,
        batch_ids: list[str],
        poll_interval: float,
        max_consecutive_errors: int,
        deadline: float | None = None,
        wake_at: float | None = None,
        deadlines: dict[str, float] | None = None,
    ) -> None:
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.deadline = deadline
        self.deadlines = {b: float(d) for b, d in (deadlines or {}).items() if d is not None}
        self.wake_at = wake_at
        self.failures: dict[str, int] = {}

    def deadline_of(self, batch_id: str) -> float | None:
        return self.deadlines.get(batch_id, self.deadline)

    def before_round(self, now: float) -> Step | None:
        """The event that ends the wait before polling (a deadline passed, a wake-up due), else None."""
        late = []
        for batch_id in self.batch_ids:
            deadline = self.deadline_of(batch_id)
            if deadline is not None and now > deadline:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline))
                late.append(self._failure(batch_id, (
                    f"batch {batch_id} has not ended by its deadline ({when}, its expiry plus a margin); "
                    "stopped waiting for it")))  # fmt: skip
        if late:
            return Step(self._done([], late))
        if self.wake_at is not None and now >= self.wake_at:
            return Step({"status": "wake"})
        return None

    def after_round(self, now: float, polled: list[dict[str, Any]], errors: list[PollError]) -> Step:
        """What the round's ``polled`` summaries and ``errors`` mean."""
        failed = [
            self._failure(e.batch_id, f"polling batch {e.batch_id} failed: {e.text}")
            for e in errors
            if not e.transient
        ]
        for summary in polled:
            self.failures.pop(summary.get("id"), None)
        worst = 0
        for error in (e for e in errors if e.transient):
            count = self.failures[error.batch_id] = self.failures.get(error.batch_id, 0) + 1
            if count >= self.max_consecutive_errors:
                failed.append(self._failure(error.batch_id, (
                    f"gave up waiting for batch {error.batch_id} after {count} consecutive polling errors; "
                    f"last: {error.text}")))  # fmt: skip
            worst = max(worst, count)
        ended = [s for s in polled if BatchStatus.ended(s.get("status"))]
        if ended or failed:
            return Step(self._done(ended, failed))
        if worst:
            sleep = min(self.poll_interval * 2 ** (worst - 1), max(self.MAX_BACKOFF, self.poll_interval))
        else:
            sleep = self.poll_interval
        if self.wake_at is not None:
            sleep = max(min(sleep, self.wake_at - now), 0.0)
        return Step(sleep=sleep)

    @staticmethod
    def _done(ended: list[dict[str, Any]], failed: list[dict[str, str]]) -> dict[str, Any]:
        return {"status": "done", "ended": ended, "failed": failed}

    @staticmethod
    def _failure(batch_id: str, message: str) -> dict[str, str]:
        return {"batch_id": batch_id, "message": message}

    @staticmethod
    def _error(batch_id: str, message: str) -> dict[str, Any]:
        """The wait could not start at all (no client): the operator's task fails and its retry resumes."""
        return {"status": "error", "batch_id": batch_id, "message": message}


class OpenAIBatchTrigger(BaseTrigger):
    """Poll one or more batches with the async OpenAI client until one of them reaches a terminal status
    (decisions: :class:`BatchPoller`). The triggers of one connection in a triggerer poll through one
    shared client (see :class:`~openai_batch_airflow.hooks.SharedAsyncClients`); the last one to end,
    finish or be cancelled closes it. The batches of a round are polled together
    (:attr:`ROUND_CONCURRENCY` at a time).

    Yields exactly one event (see :class:`BatchPoller`): ``done`` with the summaries
    (:func:`batch_summary`) of the batches that ended and the batches that can no longer be followed (a
    permanent API error, e.g. 401/404; transient ones, 429, 5xx, connection errors and timeouts, only after
    ``max_consecutive_errors`` failed polls of a batch in a row, with backoff between; a passed deadline),
    ``wake`` at ``wake_at``, or ``error`` when no client can be built from the connection.

    :param batch_ids: the batches to wait for (may be empty while ``wake_at`` is set).
    :param conn_id: the batch API's Airflow connection (an ``openai`` one's host may be any
        OpenAI-compatible base URL).
    :param provider: ``openai`` (default), ``azure_openai`` or ``anthropic``: whose batch API
        (:func:`~openai_batch_airflow.hooks.batch_hook`).
    :param poll_interval: seconds between rounds of polls.
    :param max_consecutive_errors: transient polling failures of one batch in a row that end the wait.
    :param deadline: Unix time after which a batch without an entry in ``deadlines`` is given up on.
    :param deadlines: per batch id, the Unix time after which it is given up on. The operator sets them
        from each batch's own ``expires_at`` plus a margin, so a restarted triggerer keeps the same
        deadlines (they are part of the serialized trigger, not measured from the trigger's start).
    :param cancel_on_kill: cancel the batches when a user kills, clears or marks the waiting task
        (Airflow calls :meth:`on_kill` then; not on triggerer restarts or redistribution).
    :param wake_at: Unix time at which to end the wait with a ``wake`` event even though no batch ended.
    """

    def __init__(
        self,
        batch_ids: list[str] | tuple[str, ...] = (),
        conn_id: str = "openai_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
        wake_at: float | None = None,
        deadlines: dict[str, float] | None = None,
        provider: str = "openai",
    ) -> None:
        super().__init__()
        if isinstance(batch_ids, str):  # one id is a list of one, not a list of characters
            batch_ids = [batch_ids]
        self.batch_ids = [str(b) for b in batch_ids]
        self.conn_id = conn_id
        self.provider = provider
        self.poll_interval = float(poll_interval)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.deadline = float(deadline) if deadline is not None else None
        self.cancel_on_kill = bool(cancel_on_kill)
        self.wake_at = float(wake_at) if wake_at is not None else None
        self.deadlines = {str(b): float(d) for b, d in (deadlines or {}).items() if d is not None}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": list(self.batch_ids),
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
                "wake_at": self.wake_at,
                "deadlines": dict(self.deadlines),
                "provider": self.provider,
            },
        )

    @cached_property
    def hook(self) -> BatchAPI:
        from openai_batch_airflow.hooks import batch_hook  # the client, loaded in the triggerer only

        return batch_hook(self.provider, self.conn_id)

    def poller(self) -> BatchPoller:
        return BatchPoller(self.batch_ids, self.poll_interval, self.max_consecutive_errors, self.deadline,
                           self.wake_at, self.deadlines)  # fmt: skip

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = self.poller()
        if self.batch_ids:
            try:
                await self.hook.aconn()
            except Exception as exc:  # a broken connection definition: report, do not crash the triggerer
                yield TriggerEvent(
                    BatchPoller._error(
                        self.batch_ids[0],
                        f"cannot build the {PROVIDER_NAMES.get(self.provider, self.provider)} client: {exc}",
                    )
                )
                return
        try:
            while True:
                if (step := poller.before_round(time.time())) is not None:
                    yield TriggerEvent(step.event)
                    return
                polled: list[dict[str, Any]] = []
                errors: list[PollError] = []
                for batch_id, outcome in await self._poll_round():
                    if isinstance(outcome, Exception):  # refused (401, 404, ...): at once; else after a few
                        errors.append(PollError(batch_id, _describe(outcome), not refused(outcome)))
                        if not refused(outcome):
                            count = poller.failures.get(batch_id, 0) + 1
                            self.log.warning("polling batch %s failed (%d/%d in a row): %s", batch_id, count,
                                             self.max_consecutive_errors, _describe(outcome))  # fmt: skip
                        continue
                    polled.append(outcome)
                    self.log.info(progress_line(outcome))
                    if note := unknown_status_note(outcome, poller.deadline_of(batch_id)):
                        self.log.warning(note)
                step = poller.after_round(time.time(), polled, errors)
                if step.event is not None:
                    yield TriggerEvent(step.event)
                    return
                await asyncio.sleep(step.sleep)
        finally:
            await self.hook.aclose()

    #: Polls of one round in flight at once (a group's batches are polled together, not one by one).
    ROUND_CONCURRENCY = 8

    async def _poll_round(self) -> list[tuple[str, Any]]:
        """``[(batch_id, summary or the exception its poll raised)]`` for every batch, in order; at most
        :attr:`ROUND_CONCURRENCY` polls at a time through the trigger's client."""
        gate = asyncio.Semaphore(self.ROUND_CONCURRENCY)

        async def one(batch_id: str) -> tuple[str, Any]:
            async with gate:
                try:
                    return batch_id, batch_summary(await self.hook.aretrieve(batch_id))
                except Exception as exc:  # one batch's trouble (an API error, an answer no hook can read)
                    return batch_id, exc  # is that batch's poll error, never the end of the others' wait

        return list(await asyncio.gather(*(one(b) for b in self.batch_ids)))

    async def on_kill(self) -> None:
        """The waiting task was killed, cleared or marked by a user: cancel the batches (billing stops; what
        they finished is kept by the service), all at once through one client, so a big group is cancelled
        within the triggerer's time for ``on_kill``. Never raises."""
        if not self.cancel_on_kill:
            self.log.info("batch(es) %s left running (cancel_on_kill is off)", ", ".join(self.batch_ids))
            return
        try:
            outcomes = await self.hook.acancel_all(self.batch_ids)
        except Exception as exc:  # never raises: the task is going away whatever the service says
            self.log.error("could not cancel batch(es) %s after the waiting task was stopped: %s",
                           ", ".join(self.batch_ids), _describe(exc))  # fmt: skip
            return
        for batch_id, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                self.log.error("could not cancel batch %s after the waiting task was stopped: %s", batch_id,
                               _describe(outcome))  # fmt: skip
            else:
                self.log.warning("waiting task was stopped by a user: cancelled batch %s (%s)", batch_id,
                                 outcome.status)  # fmt: skip


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc) or type(exc).__name__
    return f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}"

"""Deferrable wait for an OpenAI batch: the trigger that runs in the triggerer.

Lives outside ``dags/`` (in an installed package that is also on the plugins path) because the
triggerer process imports triggers by class path and cannot import code from a DAG bundle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from openai_batch_airflow.status import BatchStatus

if TYPE_CHECKING:
    from openai_batch_airflow.hooks import OpenAIBatchHook


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
    return {
        "id": data.get("id"),
        "status": data.get("status"),
        "endpoint": data.get("endpoint"),
        "input_file_id": data.get("input_file_id"),
        "output_file_id": data.get("output_file_id"),
        "error_file_id": data.get("error_file_id"),
        "request_counts": {
            "total": counts.get("total", 0),
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
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


class OpenAIBatchTrigger(BaseTrigger):
    """Poll one batch with the async OpenAI client until it reaches a terminal status. The triggers of
    one connection in a triggerer poll through one shared client (see
    :class:`~openai_batch_airflow.hooks.SharedAsyncClients`); the last one to end, finish or be cancelled
    closes it.

    Yields exactly one event:

    * ``{"status": "done", "batch": <batch_summary>}`` once the batch is completed, failed, expired
      or cancelled (the sensor decides what each means);
    * ``{"status": "error", "batch_id": ..., "message": ...}`` when polling itself fails: a
      permanent API error (e.g. 401/404) at once, transient ones (429, 5xx, connection errors,
      timeouts) only after ``max_consecutive_errors`` failed polls in a row, with backoff between.

    :param batch_id: the batch to wait for.
    :param conn_id: Airflow connection of type ``openai`` (its host may be any OpenAI-compatible
        base URL).
    :param poll_interval: seconds between polls.
    :param max_consecutive_errors: transient polling failures in a row that end the wait.
    :param deadline: Unix time after which the wait ends with an error. The sensor sets it from
        the batch's own ``expires_at`` plus a margin, so a restarted triggerer keeps the same
        deadline (it is part of the serialized trigger, not measured from the trigger's start).
    :param cancel_on_kill: cancel the batch when a user kills, clears or marks the waiting task
        (Airflow calls :meth:`on_kill` then; not on triggerer restarts or redistribution).
    """

    def __init__(
        self,
        batch_id: str,
        conn_id: str = "openai_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
        deadline: float | None = None,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.deadline = float(deadline) if deadline is not None else None
        self.cancel_on_kill = bool(cancel_on_kill)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_id": self.batch_id,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        from openai_batch_airflow.hooks import OpenAIBatchHook  # the client, loaded in the triggerer only

        return OpenAIBatchHook(conn_id=self.conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import openai

        transient = (
            openai.APIConnectionError,  # includes APITimeoutError
            openai.RateLimitError,
            openai.InternalServerError,
        )
        failures = 0
        try:
            await self.hook.aconn()
        except Exception as exc:  # a broken connection definition: report, do not crash the triggerer
            yield TriggerEvent(self._error(f"cannot build the OpenAI client: {exc}"))
            return
        try:
            while True:
                if self.deadline is not None and time.time() > self.deadline:
                    yield TriggerEvent(
                        self._error(
                            f"batch {self.batch_id} has not ended by its deadline "
                            f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.deadline))}, "
                            "its expiry plus a margin); stopped waiting"
                        )
                    )
                    return
                try:
                    batch = await self.hook.aretrieve(self.batch_id)
                except transient as exc:
                    failures += 1
                    self.log.warning(
                        "polling batch %s failed (%d/%d in a row): %s",
                        self.batch_id,
                        failures,
                        self.max_consecutive_errors,
                        _describe(exc),
                    )
                    if failures >= self.max_consecutive_errors:
                        yield TriggerEvent(
                            self._error(
                                f"gave up waiting for batch {self.batch_id} after {failures} "
                                f"consecutive polling errors; last: {_describe(exc)}"
                            )
                        )
                        return
                    await asyncio.sleep(min(self.poll_interval * 2 ** (failures - 1), 300.0))
                    continue
                except openai.APIError as exc:
                    yield TriggerEvent(self._error(f"polling batch {self.batch_id} failed: {_describe(exc)}"))
                    return
                failures = 0
                summary = batch_summary(batch)
                self.log.info(progress_line(summary))
                if note := unknown_status_note(summary, self.deadline):
                    self.log.warning(note)
                if BatchStatus.ended(summary["status"]):
                    yield TriggerEvent({"status": "done", "batch": summary})
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            await self.hook.aclose()

    async def on_kill(self) -> None:
        """The waiting task was killed, cleared or marked by a user: cancel the batch (billing stops;
        what it finished is kept by the service)."""
        if not self.cancel_on_kill:
            self.log.info("batch %s left running (cancel_on_kill is off)", self.batch_id)
            return
        try:
            batch = await self.hook.acancel(self.batch_id)
        except Exception as exc:  # never raises: the task is going away whatever the service says
            self.log.error("could not cancel batch %s after the waiting task was stopped: %s", self.batch_id,
                           _describe(exc))  # fmt: skip
            return
        self.log.warning(
            "waiting task was stopped by a user: cancelled batch %s (%s)", self.batch_id, batch.status
        )

    def _error(self, message: str) -> dict[str, Any]:
        return {"status": "error", "batch_id": self.batch_id, "message": message}


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc) or type(exc).__name__
    return f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}"

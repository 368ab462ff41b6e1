"""``OpenAIBatchSensor``: wait for one OpenAI batch, deferring to :class:`OpenAIBatchTrigger`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from openai_batch_airflow.triggers import (
    TERMINAL_STATUSES,
    OpenAIBatchTrigger,
    batch_summary,
    progress_line,
)


class OpenAIBatchSensor(BaseSensorOperator):
    """Wait until a batch is completed, expired or cancelled; fail if it failed validation.

    ``batch`` is the manifest of ``create_batch`` (a dict with at least ``batch_id``; usually the
    shard's index and paths too). The sensor returns that manifest with ``"batch"`` set to the
    final batch summary (status, output and error file ids, request counts, usage), so the
    ``download`` task downstream needs nothing else.

    Deferrable by default: the wait costs no worker slot, the triggerer polls every
    ``check_interval`` seconds with the async client.

    An expired or cancelled batch is *not* an error here: what it completed is kept and the rest
    comes back as per-row errors. A batch that failed validation fails the task with the
    service's messages (line numbers refer to the shard file).
    """

    template_fields = ("batch", "conn_id", "check_interval")

    def __init__(
        self,
        *,
        batch: dict[str, Any] | str,
        conn_id: str = "openai_default",
        check_interval: float | str = 60,
        deferrable: bool = True,
        max_consecutive_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", timedelta(days=2))
        super().__init__(**kwargs)
        self.batch = batch
        self.conn_id = conn_id
        self.check_interval = check_interval
        self.deferrable = deferrable
        self.max_consecutive_errors = max_consecutive_errors

    # -- helpers -----------------------------------------------------------------------------
    @property
    def batch_id(self) -> str:
        return self.batch["batch_id"] if isinstance(self.batch, dict) else str(self.batch)

    def _interval(self) -> float:
        interval = float(self.check_interval)
        if interval < 1:
            raise AirflowFailException(f"check_interval must be at least 1 second, got {interval}")
        return interval

    def _finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        self.log.info(progress_line(summary))
        if summary["status"] == "failed":
            details = "; ".join(
                f"line {e.get('line')}: {e.get('code')}: {e.get('message')}"
                if e.get("line")
                else f"{e.get('code')}: {e.get('message')}"
                for e in summary.get("errors") or []
            )
            raise AirflowException(
                f"batch {summary['id']} failed validation: {details or 'no details given'}"
            )
        if summary["status"] in ("expired", "cancelled"):
            self.log.warning(
                "batch %s ended %s; keeping its %d completed requests, the rest come back as errors",
                summary["id"],
                summary["status"],
                summary["request_counts"]["completed"],
            )
        manifest = dict(self.batch) if isinstance(self.batch, dict) else {"batch_id": self.batch_id}
        manifest["batch"] = summary
        return manifest

    # -- execution ---------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        interval = self._interval()
        if not self.deferrable:
            self.poke_interval = interval
            return super().execute(context)
        self.defer(
            trigger=OpenAIBatchTrigger(
                batch_id=self.batch_id,
                conn_id=self.conn_id,
                poll_interval=interval,
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event:
            raise AirflowException(f"no event received while waiting for batch {self.batch_id}")
        if event.get("status") != "done":
            raise AirflowException(event.get("message") or f"waiting for batch {self.batch_id} failed")
        return self._finish(event["batch"])

    def poke(self, context: Any) -> bool | PokeReturnValue:
        from airflow.providers.openai.hooks.openai import OpenAIHook

        summary = batch_summary(OpenAIHook(conn_id=self.conn_id).get_conn().batches.retrieve(self.batch_id))
        self.log.info(progress_line(summary))
        if summary["status"] not in TERMINAL_STATUSES:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._finish(summary))

"""Run notifications: a notifier for the pipeline's success / failure callbacks.

The DAG attaches it as ``on_failure_callback`` of every task (after its retries are spent) and as
``on_success_callback`` of ``merge`` (the run's results have landed).

``RunNotifier`` logs a one-line summary and, when a webhook is configured (environment variable
``OPENAI_BATCH_NOTIFY_WEBHOOK`` or Airflow Variable ``openai_batch_notify_webhook``), POSTs it as
JSON (Slack-compatible ``text`` plus the fields). It never raises: a failed notification must not
fail a run. Any other Airflow notifier (Slack, SMTP, ...) can be used instead, see docs/inbox.md.

Nothing secret leaves through it: every URL in the text, ``input_csv`` and ``reason`` goes through
:func:`batchpipe.paths.redact_url` (a password or query value becomes ``***``), and the webhook's own URL
(for Slack-style hooks the path is the secret) is logged as ``scheme://host:port`` only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.sdk import BaseNotifier

from batchpipe.paths import quote_path, redact_text, url_origin
from openai_batch_airflow.config import WEBHOOK_ENV, WEBHOOK_VARIABLE, variable

log = logging.getLogger(__name__)


def webhook_url() -> str | None:
    url = os.environ.get(WEBHOOK_ENV)
    if url:
        return url
    try:
        return variable(WEBHOOK_VARIABLE)
    except Exception:  # no Variable access where this callback runs
        return None


def results_text(value: Any, most: int = 10) -> str:
    """Where the answers landed, from the finished task's XCom: the pipeline's ``merge`` returns the
    results.csv path; the inbox's ``settle`` returns ``{"results": ["<file>: <results.csv>", ...]}``."""
    if isinstance(value, dict):
        landed = list(value.get("results") or [])
        if not landed:
            return "no results landed"
        more = f"; and {len(landed) - most} more" if len(landed) > most else ""
        return "results: " + "; ".join(landed[:most]) + more
    return f"results at {value}"


class RunNotifier(BaseNotifier):
    """Notify that a run succeeded or a task of it failed (``event``: ``"success"`` or ``"failure"``)."""

    template_fields = ()

    def __init__(self, event: str):
        super().__init__()
        self.event = event

    def message(self, context: Any) -> dict[str, Any]:
        dag_run = context.get("dag_run")
        dag_id = getattr(dag_run, "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
        run_id = getattr(dag_run, "run_id", None) or context.get("run_id")
        conf = dict(getattr(dag_run, "conf", None) or {})
        ti = context.get("ti") or context.get("task_instance")
        reason = context.get("reason") or (
            f"task {ti.task_id} failed" if ti and self.event == "failure" else None
        )
        if self.event == "success" and ti is not None:
            reason = results_text(ti.xcom_pull(task_ids=ti.task_id))
        reason = redact_text(reason) if reason else None
        input_csv = quote_path(conf["input_csv"]) if conf.get("input_csv") else None
        text = f"{dag_id} run {run_id}: {self.event}" + (f" ({reason})" if reason else "")
        if input_csv:
            text += f" — input {input_csv}"
        return {"text": redact_text(text), "dag_id": dag_id, "run_id": run_id, "event": self.event,
                "input_csv": input_csv, "reason": reason}  # fmt: skip

    def notify(self, context: Any) -> None:
        message = self.message(context)
        log.info("notification: %s", message["text"])
        url = webhook_url()
        if not url:
            return
        where = url_origin(url)
        try:
            import httpx

            status = httpx.post(url, json=message, timeout=10).status_code
        except Exception as exc:  # the text of some errors holds the URL: only its origin is kept
            detail = redact_text(str(exc).replace(url, where), origin_only=True)
            log.warning("notification to the webhook at %s failed: %s: %s", where, type(exc).__name__, detail)
            return
        if not 200 <= status < 300:  # not raise_for_status(): its message holds the whole URL
            log.warning("notification to the webhook at %s failed: HTTP %d", where, status)

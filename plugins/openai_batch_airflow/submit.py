"""Upload and create without ever paying twice.

A batch is billed when it is created, so a retry of ``create_batch`` (after a worker crash, a
timeout, or a 5xx whose request actually went through) must find the batch the earlier try made
instead of creating a second one. Two mechanisms, both needed:

* Before calling the API, the task records an *intent* in Airflow's ``task_state_store`` (kept
  across the task's retries): a submission id, and once known the file / batch id. A retry with a
  recorded id re-attaches to it.
* The submission id also travels with the object itself (batch ``metadata``, file name), so when a
  try died between the API call and recording its answer, the retry finds the object by listing
  recent files / batches.

A *cleared* task is a deliberate new submission: clearing raises the task instance's ``max_tries``,
so :func:`generation` changes and the old intent no longer applies.

The openai client retries some failures on its own; for create it does so with ``max_retries=0``
here, and every retry of ours looks for the batch first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: How often one task try attempts a call that fails transiently before giving up to Airflow's retry.
ATTEMPTS = 4


def transient_errors() -> tuple[type[BaseException], ...]:
    import openai

    return (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


def generation(context: Any) -> int:
    """The same number across a task's automatic retries; a new one each time it is cleared."""
    ti = context["ti"]
    return int(ti.max_tries) - int(ti.task.retries or 0)


class Intent:
    """One key of ``task_state_store`` holding what this task submitted (or None: no store)."""

    def __init__(self, store: Any, key: str, generation: int):
        self.store, self.key, self.generation = store, key, generation
        saved = store.get(key) if store is not None else None
        self.saved: dict[str, Any] | None = (
            saved if isinstance(saved, dict) and saved.get("generation") == generation else None
        )

    def start(self) -> dict[str, Any]:
        """The intent to resume, or a new one with a fresh submission id (recorded before the call)."""
        if self.saved is None:
            self.saved = {
                "generation": self.generation,
                "submission": f"g{self.generation}-{uuid.uuid4().hex[:16]}",
                "since": int(time.time()) - 300,
            }
            self._write()
        return self.saved

    def done(self, **ids: str) -> None:
        assert self.saved is not None
        self.saved.update(ids)
        self._write()

    def _write(self) -> None:
        if self.store is not None:
            self.store.set(self.key, self.saved)


def _with_retries(call: Callable[[], Any], find: Callable[[], Any], what: str) -> Any:
    """``call()``, retried up to ATTEMPTS times on transient errors, but only after ``find()`` has
    looked and not found that the failed call went through after all. If looking fails too, the
    error goes up: Airflow retries the task, and the retry looks again before creating anything."""
    errors = transient_errors()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except errors as exc:
            if attempt == ATTEMPTS:
                raise
            delay = min(2.0**attempt, 30.0)
            log.warning("%s failed (%s); checking whether it went through, in %.0fs", what, exc, delay)
            time.sleep(delay)
            found = find()
            if found is not None:
                log.info("%s had gone through: re-attaching to %s", what, found.id)
                return found


def find_file(client: Any, filename: str, since: int) -> Any:
    for f in client.files.list(purpose="batch", order="desc", limit=1000):
        if (f.created_at or 0) < since:
            return None
        if f.filename == filename and f.status != "error":
            return f
    return None


def find_batch(client: Any, submission: str, since: int) -> Any:
    for b in client.batches.list(limit=100):
        if (b.created_at or 0) < since:
            return None
        if (b.metadata or {}).get("submission") == submission:
            return b
    return None


def upload_once(client: Any, path: str | Path, name: str, intent: Intent) -> Any:
    """Upload a shard file once per task generation; return the FileObject."""
    saved = intent.start()
    if saved.get("file_id"):
        try:
            found = client.files.retrieve(saved["file_id"])
            log.info("re-attaching to file %s uploaded by an earlier try", found.id)
            return found
        except Exception as exc:  # deleted or expired: upload again
            log.warning("file %s from an earlier try is gone (%s); uploading again", saved["file_id"], exc)
    filename = f"{name}-{saved['submission']}.jsonl"
    found = find_file(client, filename, saved["since"])
    if found is not None:
        log.info("found file %s uploaded by an earlier try", found.id)
    else:

        def call():
            with open(path, "rb") as fh:
                return client.with_options(max_retries=0).files.create(file=(filename, fh), purpose="batch")

        found = _with_retries(call, lambda: find_file(client, filename, saved["since"]), f"upload of {path}")
    intent.done(file_id=found.id)
    return found


def create_once(client: Any, intent: Intent, metadata: dict[str, str], **create_kwargs: Any) -> Any:
    """Create a batch once per task generation; return the Batch (possibly one an earlier try made)."""
    saved = intent.start()
    if saved.get("batch_id"):
        batch = client.batches.retrieve(saved["batch_id"])
        log.info("re-attaching to batch %s (%s) created by an earlier try", batch.id, batch.status)
        return batch
    found = find_batch(client, saved["submission"], saved["since"])
    if found is None:
        metadata = {**metadata, "submission": saved["submission"]}
        found = _with_retries(
            lambda: client.with_options(max_retries=0).batches.create(metadata=metadata, **create_kwargs),
            lambda: find_batch(client, saved["submission"], saved["since"]),
            "batch create",
        )
    else:
        log.info("found batch %s created by an earlier try", found.id)
    intent.done(batch_id=found.id)
    return found

"""What a task recorded about its submissions, so upload and create never pay twice.

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

The calls themselves are ``OpenAIBatchHook.upload_once`` and ``create_once``
(:mod:`openai_batch_airflow.hooks`): the openai client's own retries are off for them
(``max_retries=0``), and every retry of :func:`with_retries` looks for the object first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: How often one task try attempts a call that fails transiently before giving up to Airflow's retry.
ATTEMPTS = 4


def transient_errors() -> tuple[type[BaseException], ...]:
    import openai

    return (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


#: HTTP statuses that mean "no": trying again will not change the answer. Anything else (408, 409, 429,
#: 5xx, a lost connection) may have gone through or may pass next time: the task's retry looks for what
#: it recorded first (never a second batch), then tries again.
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 415, 422})


def refused(exc: BaseException) -> bool:
    """An API error that trying again will not fix (:data:`REFUSED_STATUSES`)."""
    import openai

    return isinstance(exc, openai.APIStatusError) and exc.status_code in REFUSED_STATUSES


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
        #: An earlier try recorded this intent: what it started may exist without its id being recorded,
        #: so it is looked for before anything is made. A new intent's submission id is fresh: nothing
        #: made before carries it, and nothing is looked for.
        self.resumed = self.saved is not None

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


def with_retries(call: Callable[[], Any], find: Callable[[], Any], what: str) -> Any:
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


def intent(context: Any, key: str) -> Intent:
    """This task's recorded submission ``key`` (in the task's ``task_state_store``, this generation)."""
    return Intent(context.get("task_state_store"), key, generation(context))

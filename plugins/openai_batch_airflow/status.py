"""``BatchStatus``: what each status a batch can report means to the pipeline.

A module of its own, without the openai client, so the waiting operator and the trigger (imported when a
DAG is parsed) name statuses without loading the client; :mod:`openai_batch_airflow.hooks` re-exports it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class BatchStatus(StrEnum):
    """Every status the Batch API documents. A status outside it (a new one, or a proxy's own) is not a
    member: :meth:`of` answers None, and such a batch is waited on as still running."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """The batch never changes again."""
        return self in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)

    @property
    def is_active(self) -> bool:
        """The batch holds enqueued tokens (it counts against the enqueued-token limit)."""
        return self in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)

    @property
    def is_resubmittable(self) -> bool:
        """The batch ended having run its requests: the ones that failed for a retryable reason may be
        sent again in a follow-up batch (a ``failed`` batch never ran; a ``cancelled`` one was stopped)."""
        return self in (BatchStatus.COMPLETED, BatchStatus.EXPIRED)

    @classmethod
    def of(cls, value: Any) -> BatchStatus | None:
        """The member for a status as the API reports it, or None for one it does not document. Read
        without regard to case or surrounding blanks (Azure OpenAI's REST examples say ``"Validating"``,
        ``"Completed"``): a finished batch is never waited on as if still running."""
        if not isinstance(value, str):
            return None
        try:
            return cls(value.strip().lower())
        except ValueError:
            return None

    @classmethod
    def ended(cls, value: Any) -> bool:
        """``value`` is a documented terminal status (an unknown one is treated as still running)."""
        status = cls.of(value)
        return status is not None and status.is_terminal

"""SQLite lookups of many keys at once (the merge's outcomes, the build's request keys, the answer cache).

No Airflow import."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

#: Keys per statement: below SQLite's bound-parameter limit (999 in older builds).
IN_CHUNK = 500


def select_in(db: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> Iterator[tuple]:
    """The rows of ``sql`` for ``keys``: ``sql`` holds ``{marks}`` where the ``IN (…)`` list goes, and
    runs once per :data:`IN_CHUNK` keys."""
    for k in range(0, len(keys), IN_CHUNK):
        part = keys[k : k + IN_CHUNK]
        yield from db.execute(sql.format(marks=",".join("?" * len(part))), part)

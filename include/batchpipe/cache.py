"""The answer cache: successful result lines kept by request key, so that a request sent once is not
paid for again (within a run or across runs).

:func:`request_key` names a request by what is sent, never by where it came from: the SHA-256 of its
request line without the ``custom_id`` (the method, the endpoint and the whole body: model, every
parameter, the prompt text as sent, a ``response_schema``, images as the data URLs that carry their
bytes, never their paths). Two rows with the same key are the same request.

:class:`AnswerCache` keeps the result lines of answered requests in a local folder, in one SQLite
database (``answers.sqlite``, write-ahead log). SQLite was chosen over a folder of files or a home-made
format because it gives what the cache must have without code of ours: each :meth:`AnswerCache.put_many`
is one transaction, so a process killed while writing leaves none of that write behind (the log is
rolled back on the next open) and a half-written entry is never read; writers from several processes
wait for each other (busy timeout) instead of corrupting the file; lookups go by key in chunks, so a
cache of millions of entries is never loaded into memory. Two runs writing the same key keep one entry.
SQLite's locking needs a local disk: the folder must not be on a network file system.

Only answers are kept (HTTP 200 lines); an error is never cached, so a failed request is sent again
next time. Modes: ``read_write`` (look up, then add new answers), ``read_only`` (look up, add nothing),
``refresh`` (look up nothing, add and overwrite).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InputError
from .sql import select_in

CACHE_FILE = "answers.sqlite"
CACHE_MODES = ("read_write", "read_only", "refresh")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
_METHOD = b',"method":'


def request_key(line: bytes) -> str:
    """The request key (64 hex characters) of a request line as the build writes it (``{"custom_id": …,
    "method": …, "url": …, "body": …}``): SHA-256 of everything after the custom_id. The custom_id is a
    JSON string, inside which a ``"`` is always escaped, so the first ``,"method":`` ends it."""
    return request_digest(line).hex()


def request_digest(line: bytes) -> bytes:
    """:func:`request_key` as its 32 bytes."""
    at = line.find(_METHOD)
    if at < 0 or not line.startswith(b'{"custom_id":'):
        raise ValueError("not a request line of the build (custom_id first, then method)")
    return hashlib.sha256(line[at:].rstrip(b"\r\n")).digest()


class AnswerCache:
    """The answers kept in ``folder`` (created if absent); ``mode`` one of :data:`CACHE_MODES`."""

    def __init__(self, folder: str | os.PathLike, mode: str = "read_write") -> None:
        if mode not in CACHE_MODES:
            raise InputError(f"cache_mode: {mode!r} is not one of {', '.join(CACHE_MODES)}")
        self.folder = Path(folder)
        self.mode = mode
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cache_dir {self.folder}: cannot create the folder ({exc.strerror or exc})"
            ) from None
        self.path = self.folder / CACHE_FILE
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._create()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cache_dir {self.folder}: {CACHE_FILE} cannot be used ({exc})") from None

    def _create(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new, empty file
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, line BLOB NOT NULL,"
                " created REAL NOT NULL, endpoint TEXT, model TEXT) WITHOUT ROWID"
            )
            self.db.execute("CREATE INDEX IF NOT EXISTS answers_created ON answers (created)")
            row = self.db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise InputError(
                    f"cache_dir {self.folder}: {CACHE_FILE} is of version {row[0]}, this pipeline reads "
                    f"version {SCHEMA_VERSION} (use another cache_dir, or delete the file to start anew)"
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The kept result line of each key found (none in ``refresh`` mode)."""
        if self.mode == "refresh":
            return {}
        return dict(select_in(self.db, "SELECT key, line FROM answers WHERE key IN ({marks})", list(keys)))

    def put_many(self, entries: Iterable[tuple[str, bytes, str | None, str | None]]) -> int:
        """Keep ``(key, result line, endpoint, model)`` entries in one transaction; how many were new or
        (``refresh``) replaced. Nothing is kept in ``read_only`` mode. A key kept already keeps its entry
        (``refresh``: the new line replaces it)."""
        if self.mode == "read_only":
            return 0
        verb = "INSERT OR REPLACE" if self.mode == "refresh" else "INSERT OR IGNORE"
        sql = f"{verb} INTO answers (key, line, created, endpoint, model) VALUES (?,?,?,?,?)"
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany(sql, ((k, line, now, ep, model) for k, line, ep, model in entries))
            written = self.db.total_changes - before
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return written

    def stats(self) -> dict[str, Any]:
        """``{"path", "entries", "bytes" (of the kept lines), "file_bytes", "oldest", "newest"}``
        (Unix times, None when empty)."""
        entries, size, oldest, newest = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(line)), 0), MIN(created), MAX(created) FROM answers"
        ).fetchone()
        files = [self.path, Path(f"{self.path}-wal")]
        return {
            "path": str(self.path),
            "entries": entries,
            "bytes": size,
            "file_bytes": sum(p.stat().st_size for p in files if p.exists()),
            "oldest": oldest,
            "newest": newest,
        }

    def prune(self, older_than_seconds: float) -> int:
        """Remove the entries kept more than ``older_than_seconds`` ago (and give their pages back to the
        file system); how many were removed."""
        if older_than_seconds < 0:
            raise InputError("prune: the age must be 0 or more")
        cutoff = time.time() - older_than_seconds
        self.db.execute("BEGIN IMMEDIATE")
        try:
            removed = self.db.execute("DELETE FROM answers WHERE created < ?", (cutoff,)).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("PRAGMA incremental_vacuum")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def check(self) -> str:
        """SQLite's own integrity check of the file: ``"ok"`` when it is whole."""
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]

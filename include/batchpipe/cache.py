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

:class:`ObjectAnswerCache` keeps them in object storage instead (a cache shared by workers on several
machines): one object per answer, named by its key under a URL prefix (``<prefix>/answers/<key[:2]>/<key>``).
An object store writes an object whole or not at all, so two runs writing one key leave one whole
answer and a writer killed mid-way leaves none; an entry is also checked when read (one JSON answer
line, newline-ended), so a damaged object is a miss, never an answer. Old entries there are removed by
the bucket's own lifecycle rules (``batchpipe cache prune`` works on local folders).

Only answers are kept (HTTP 200 lines, Anthropic ``succeeded`` ones, the merge counted as answered); an
error is never cached, so a failed request is sent again next time. Modes: ``read_write`` (look up, then
add new answers), ``read_only`` (look up, add nothing), ``refresh`` (look up nothing, send everything, add
and overwrite), ``off`` (no cache, even when one is configured).

:class:`NewAnswers` picks, after a merge, the result lines to keep: the answers the merge put on their own
rows (never an error, never a copy, never an id the service answered twice), each under the key of the
request line that asked it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import msgspec

from .errors import InputError
from .sql import select_in

CACHE_FILE = "answers.sqlite"
CACHE_MODES = ("read_write", "read_only", "refresh")
#: The modes a run may ask for: :data:`CACHE_MODES`, or ``off``.
RUN_CACHE_MODES = (*CACHE_MODES, "off")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
_CUSTOM_ID = re.compile(rb'\{"custom_id":"(?:[^"\\]|\\.)*"')


def request_key(line: bytes) -> str:
    """The request key (64 hex characters) of a request line as the build writes it, custom_id first
    (``{"custom_id": …, "method": …, "url": …, "body": …}``; an Anthropic Message Batches request,
    ``{"custom_id": …, "params": …}``, alike): SHA-256 of everything after the custom_id. The custom_id
    is a JSON string, read to its closing quote (a ``"`` inside it is always escaped)."""
    return request_digest(line).hex()


def request_digest(line: bytes) -> bytes:
    """:func:`request_key` as its 32 bytes."""
    head = _CUSTOM_ID.match(line)
    if head is None or line[head.end() : head.end() + 1] != b",":
        raise ValueError("not a request line of the build (the custom_id first, then the request)")
    return hashlib.sha256(line[head.end() :].rstrip(b"\r\n")).digest()


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
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # on a new file: before WAL writes its header
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._create()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cache_dir {self.folder}: {CACHE_FILE} cannot be used ({exc})") from None

    def _create(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT NOT NULL UNIQUE, line BLOB NOT NULL,"
                " created REAL NOT NULL, endpoint TEXT, model TEXT)"
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
        replaced. Nothing is kept in ``read_only`` mode. A key kept already keeps its entry, unless that
        entry is not a whole answer line (damaged: it would be a miss forever); ``refresh``: the new line
        replaces it."""
        if self.mode == "read_only":
            return 0
        entries = sorted(entries)  # in key order: neighbouring pages of the index
        verb = "INSERT OR REPLACE" if self.mode == "refresh" else "INSERT OR IGNORE"
        sql = "INTO answers (key, line, created, endpoint, model) VALUES (?,?,?,?,?)"
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany(
                f"{verb} {sql}", ((k, line, now, ep, model) for k, line, ep, model in entries)
            )
            written = self.db.total_changes - before
            if written < len(entries) and self.mode == "read_write":  # some were kept already: whole?
                kept = dict(select_in(self.db, "SELECT key, line FROM answers WHERE key IN ({marks})",
                                      [e[0] for e in entries]))  # fmt: skip
                damaged = [e for e in entries if e[0] in kept and not is_answer_line(kept[e[0]])]
                self.db.executemany(
                    f"INSERT OR REPLACE {sql}", ((k, ln, now, ep, m) for k, ln, ep, m in damaged)
                )
                written += len(damaged)
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
        self.db.executescript("PRAGMA incremental_vacuum;")  # run to the end (execute() frees one page)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def check(self) -> str:
        """SQLite's own integrity check of the file: ``"ok"`` when it is whole."""
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


class Cache(Protocol):
    """What the build and the merge need of a cache (:class:`AnswerCache`, :class:`ObjectAnswerCache`)."""

    mode: str

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]: ...

    def put_many(self, entries: Iterable[tuple[str, bytes, str | None, str | None]]) -> int: ...

    def close(self) -> None: ...


def is_answer_line(line: bytes) -> bool:
    """Whether ``line`` is one whole result line that is an answer (an HTTP 200 response and no error; an
    Anthropic ``succeeded`` result), on one line (no CR or LF: a record of ``cached.jsonl`` embeds it):
    what a cache entry must be to be used."""
    if b"\n" in line or b"\r" in line:
        return False
    obj = _decode(line)
    if not isinstance(obj, dict):
        return False
    response = obj.get("response")
    if response is None:  # an Anthropic line (``"response": null`` too, as the merge reads it)
        result = obj.get("result")
        return isinstance(result, dict) and result.get("type") == "succeeded" and obj.get("error") is None
    return isinstance(response, dict) and response.get("status_code") == 200 and obj.get("error") is None


def _decode(line: bytes) -> Any:
    """``line`` decoded as the merge decodes it (msgspec, else the standard library, which also takes
    NaN and numbers out of range); None when it is not JSON."""
    try:
        return _decode_any(line)
    except msgspec.MsgspecError:
        try:
            return json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None


def entry_line(obj: dict[str, Any]) -> bytes:
    """The cache entry of a decoded result line: compact JSON, every non-ASCII character escaped, so the
    entry is ASCII on one line (a CR the service left inside the line is whitespace JSON may carry, but a
    line-based reader would split the record there) and decodes to the same values."""
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


class ObjectAnswerCache:
    """The answers kept as objects under ``root`` (an ``ObjectStoragePath``, or any path-like object with
    ``/``, ``read_bytes``, ``write_bytes`` and ``exists``): ``<root>/answers/<key[:2]>/<key>``, each the
    result line and a newline. Lookups and writes go out ``workers`` at a time."""

    WORKERS = 16

    def __init__(self, root: Any, mode: str = "read_write", workers: int = WORKERS) -> None:
        if mode not in CACHE_MODES:
            raise InputError(f"cache_mode: {mode!r} is not one of {', '.join(CACHE_MODES)}")
        self.root, self.mode, self.workers = root, mode, workers

    def _path(self, key: str) -> Any:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a request key: {key[:80]!r}")
        return self.root / "answers" / key[:2] / key

    def close(self) -> None:
        pass

    def __enter__(self) -> ObjectAnswerCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, key: str) -> bytes | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        line = data[:-1]
        if not data.endswith(b"\n") or not is_answer_line(line):
            return None  # cut short or damaged: a miss, the request is sent
        return line

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        if self.mode == "refresh":
            return {}
        keys = list(dict.fromkeys(keys))
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="batchpipe-cache") as pool:
            found = pool.map(self._get, keys)
            return {k: line for k, line in zip(keys, found, strict=True) if line is not None}

    def _put(self, key: str, line: bytes) -> int:
        path = self._path(key)
        if self.mode == "read_write" and path.exists() and self._get(key) is not None:
            return 0  # kept (a damaged entry is replaced)
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(line.rstrip(b"\r\n") + b"\n")  # one PUT: the object is whole or absent
        return 1

    def put_many(self, entries: Iterable[tuple[str, bytes, str | None, str | None]]) -> int:
        if self.mode == "read_only":
            return 0
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="batchpipe-cache") as pool:
            return sum(pool.map(lambda e: self._put(e[0], e[1]), entries))


class _Request(msgspec.Struct):
    custom_id: Any = None


_decode_any = msgspec.json.Decoder().decode
_decode_request = msgspec.json.Decoder(_Request).decode
_BLOCK = 2000


def _blocks(items: Iterable[Any], size: int = _BLOCK) -> Iterator[list[Any]]:
    block: list[Any] = []
    for item in items:
        block.append(item)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


class _Status(msgspec.Struct):
    status_code: Any = None


class _Result(msgspec.Struct):
    type: Any = None


class _Line(msgspec.Struct):
    custom_id: Any = None
    response: _Status | None = None
    error: Any = None
    result: _Result | None = None  # Anthropic's


def _answered(status: Any, kind: Any, has_response: bool) -> bool:
    """A result line that is an answer: HTTP 200, or (no response) an Anthropic ``succeeded`` result."""
    return status == 200 or (not has_response and kind == "succeeded")


_decode_line = msgspec.json.Decoder(_Line).decode


def _answer_candidates(
    result_paths: Iterable[str | os.PathLike],
) -> Iterator[tuple[str, int, int, int, int]]:
    """``(custom_id, storable, file index, offset, length)`` of each result line that may be that id's
    answer, as the merge reads them: an HTTP 200 line or an Anthropic ``succeeded`` one (``storable`` when
    it also has no error), or a line
    that is not JSON but still names an id (not storable: the merge may have taken another line of that
    id for its answer)."""
    from .merge import _custom_id_in_text

    for f, path in enumerate(result_paths):
        with open(path, "rb") as fh:
            at = 0
            for raw in fh:
                here, at = at, at + len(raw)
                if not raw.strip():
                    continue
                try:
                    line = _decode_line(raw)
                    cid, response, error = line.custom_id, line.response, line.error
                    status = response.status_code if isinstance(response, _Status) else None
                    kind = line.result.type if isinstance(line.result, _Result) else None
                    has_response = response is not None
                except msgspec.MsgspecError:
                    obj = _decode(raw)  # what msgspec refuses, as the merge's fallback reads it
                    if not isinstance(obj, dict):
                        if obj is None:
                            cid = _custom_id_in_text(raw.decode("utf-8", "replace"))
                            if cid is not None:
                                yield cid, 0, f, here, len(raw)
                        continue
                    cid, response, error = obj.get("custom_id"), obj.get("response"), obj.get("error")
                    status = response.get("status_code") if isinstance(response, dict) else None
                    result = obj.get("result")
                    kind = result.get("type") if isinstance(result, dict) else None
                    has_response = obj.get("response") is not None
                if cid is None or not _answered(status, kind, has_response):
                    continue
                storable = isinstance(cid, str) and error is None
                yield (cid if isinstance(cid, str) else str(cid)), int(storable), f, here, len(raw)


class NewAnswers:
    """The answers a run paid for, to be kept in the cache once merged.

    The merge names (:meth:`answered`) the custom_ids whose own result line it put on their row as an
    answer; :meth:`keep` then keeps each such line under its request's key. Held in a SQLite file in
    ``folder`` (removed by :meth:`close`), so a run of millions of rows keeps memory flat."""

    PUT_ENTRIES = 20_000  # entries per write to the cache (one transaction each) ...
    PUT_BYTES = 32 << 20  # ... and at most about this many bytes of lines

    def __init__(self, folder: str | os.PathLike) -> None:
        import tempfile

        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".new-answers-", suffix=".sqlite", dir=folder)
        os.close(fd)
        self.path = Path(name)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE ok (cid TEXT PRIMARY KEY) WITHOUT ROWID")

    def answered(self, custom_ids: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO ok (cid) VALUES (?)", ((c,) for c in custom_ids))

    def keep(
        self,
        cache: Cache,
        shard_paths: Iterable[str | os.PathLike],
        result_paths: list[str | os.PathLike],
        endpoint: str | None = None,
        model: str | None = None,
    ) -> int:
        """Keep in ``cache`` the answered ids' result lines (from ``result_paths``) under the keys of
        their request lines (in ``shard_paths``, the build's first shards). Only an id with exactly one
        line that may be its answer (:func:`_answer_candidates`) is kept: that line is the one the merge
        put on its row. With more (a service repeating itself, an unreadable line naming it), which one
        the merge took is not the cache's to guess: the request is sent again next time. Each line is
        kept as it came, or as :func:`entry_line` when it holds a CR (a record of ``cached.jsonl`` must be
        one line). Returns how many entries were written."""
        if cache.mode == "read_only":
            return 0
        db = self.db
        db.execute("CREATE TABLE cand (cid TEXT, ok INTEGER, f INTEGER, at INTEGER, size INTEGER)")
        for block in _blocks(_answer_candidates(result_paths)):
            db.executemany("INSERT INTO cand VALUES (?,?,?,?,?)", block)
        db.execute("CREATE INDEX cand_cid ON cand (cid)")
        db.execute("CREATE TABLE req (cid TEXT, key TEXT)")
        for path in shard_paths:
            with open(path, "rb") as fh:
                for block in _blocks(fh):
                    keyed = []
                    for raw in block:
                        line = raw.rstrip(b"\r\n")
                        if line:
                            keyed.append((_decode_request(line).custom_id, request_key(line)))
                    db.executemany("INSERT INTO req VALUES (?,?)", keyed)
        db.execute("CREATE INDEX req_cid ON req (cid)")
        chosen = db.execute(
            "SELECT c.f, c.at, c.size, r.key FROM cand c JOIN ok ON ok.cid = c.cid"
            " JOIN req r ON r.cid = c.cid WHERE c.ok = 1"
            " AND (SELECT COUNT(*) FROM cand d WHERE d.cid = c.cid) = 1 ORDER BY c.f, c.at"
        )
        files = [open(p, "rb") for p in result_paths]
        written = 0
        try:
            entries: list[tuple[str, bytes, str | None, str | None]] = []
            held = 0
            for f, at, size, key in chosen:
                files[f].seek(at)
                line = files[f].read(size).rstrip(b"\r\n")
                if b"\r" in line or b"\n" in line:  # a CR inside the line: kept as one ASCII line
                    line = entry_line(_decode(line))
                entries.append((key, line, endpoint, model))
                held += len(line)
                if len(entries) >= self.PUT_ENTRIES or held >= self.PUT_BYTES:  # few, large transactions
                    written += cache.put_many(entries)
                    entries, held = [], 0
            if entries:
                written += cache.put_many(entries)
        finally:
            for fh in files:
                fh.close()
        return written

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> NewAnswers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cached_record(row: int, custom_id: str, line: bytes) -> bytes:
    """A line of the build's ``cached.jsonl``: row ``row`` (custom_id ``custom_id``) is answered by the
    kept result ``line``."""
    return b'{"row":%d,"custom_id":%s,"line":%s}\n' % (row, json.dumps(custom_id).encode(), line)

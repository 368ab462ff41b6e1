"""Where a run's files live: a local folder, or any URL Airflow's ``ObjectStoragePath`` can open.

``output_dir``, ``work_dir`` and ``input_csv`` accept a local path or a URL such as
``s3://bucket/prefix``, ``gs://bucket/prefix`` or ``file:///data/x`` (the scheme's filesystem comes
from the installed provider: ``s3`` from apache-airflow-providers-amazon, ``gs`` from ...-google).
The connection is param ``storage_conn_id``, or named in the URL itself (``s3://my_conn@bucket/x``),
or else the filesystem's own default credentials.

The library (:mod:`batchpipe`) works on local files, so a task with a remote location works in a
private scratch folder: it fetches what it reads and publishes what it writes. Nothing is passed
between tasks through a worker's local disk, so mapped shard tasks may run on different machines.
A local location is used in place (no copies).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from batchpipe.paths import clip as paths_clip
from batchpipe.paths import is_url, quote_path, redact_url, url_problem

log = logging.getLogger(__name__)

#: Where scratch folders go (default: the system temp folder).
SCRATCH_ENV = "OPENAI_BATCH_SCRATCH_DIR"
LOCAL_SCHEMES = ("file", "local")

Location = Any  # pathlib.Path for a local location, airflow.sdk.ObjectStoragePath for a remote one

#: Web URLs are never a location: a file on a web server is downloaded first (and not fetched by a task).
WEB_SCHEMES = ("http", "https")


class UnsupportedScheme(ValueError):
    """A URL whose scheme has no filesystem here (or is a web URL): the message says what is supported."""


def _store_schemes() -> list[str]:
    """The object-storage schemes the installed providers register (``s3``, ``gs``...)."""
    try:
        from airflow.sdk.io.fs import _register_filesystems  # private: only to list them in a message

        return sorted(s for s in _register_filesystems() if s not in LOCAL_SCHEMES)
    except Exception:  # noqa: BLE001 - a message without the list is still a clear message
        return []


def check_scheme(text: str) -> None:
    """Raise :class:`UnsupportedScheme` for a URL no installed filesystem reads (``http://``,
    ``ftp://`` without its provider, a typo such as ``s4://``), naming the supported ones."""
    from airflow.sdk.io.fs import has_fs

    scheme = urlsplit(text).scheme.lower()
    if scheme not in WEB_SCHEMES and has_fs(scheme):
        return
    here = "".join(f"{s}://, " for s in _store_schemes())
    hint = " — download the file first" if scheme in WEB_SCHEMES else ""
    raise UnsupportedScheme(
        f"{quote_path(text)}: scheme {paths_clip(scheme)} is not supported; use a local path or an "
        f"object-storage URL ({here}others such as gs:// through their Airflow provider){hint}"
    )


def is_remote(where: str | os.PathLike | Location) -> bool:
    """True for a URL whose scheme is not ``file://``/``local://`` (those are local paths)."""
    if isinstance(where, Path):
        return False
    text = str(where)
    return is_url(text) and urlsplit(text).scheme.lower() not in LOCAL_SCHEMES


def local_path(where: str | os.PathLike) -> Path:
    """A local path from a plain path or a ``file://`` URL, ``~`` expanded, made absolute."""
    text = str(where)
    if is_url(text):
        text = urlsplit(text).path
    return Path(text).expanduser().resolve()


def location(where: str | os.PathLike | Location, conn_id: str | None = None) -> Location:
    """``where`` as a :class:`~pathlib.Path` (local) or an ``ObjectStoragePath`` (remote).

    ``conn_id`` (if given) replaces a connection named in the URL. A URL with ``?``, ``#`` or a
    password in it raises ValueError (see :func:`batchpipe.paths.url_problem`); one whose scheme no
    installed filesystem reads raises :class:`UnsupportedScheme` (a ValueError too).
    """
    if not is_remote(where):
        return where if isinstance(where, Path) else local_path(where)
    from airflow.sdk import ObjectStoragePath

    if isinstance(where, ObjectStoragePath) and not conn_id:
        return where
    text = str(where)
    check_scheme(text)
    if problem := url_problem(text):
        raise ValueError(f"{redact_url(text)} {problem}")
    if conn_id:  # ObjectStoragePath would let a connection named in the URL win
        parts = urlsplit(text)
        text = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return ObjectStoragePath(text, conn_id=conn_id or None)


def shown(where: Location | str) -> str:
    """How a location is named in logs, XCom, Asset events and reports: through
    :func:`batchpipe.paths.redact_url` (a connection id stays; a password or query value is ``***``)."""
    return redact_url(str(where))


@contextmanager
def scratch() -> Iterator[Path]:
    """A private temporary folder for this task, removed afterwards."""
    base = os.environ.get(SCRATCH_ENV) or None
    if base:
        os.makedirs(base, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="openai-batch-", dir=base)
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fetch(src: Location, into: Path, name: str | None = None) -> Path:
    """A local file with the content of ``src``: ``src`` itself when local, else a copy in ``into``."""
    if not is_remote(src):
        return src
    into.mkdir(parents=True, exist_ok=True)
    dst = into / (name or src.name)
    part = dst.with_name(dst.name + ".part")
    src.fs.get(src.path, str(part))
    os.replace(part, dst)
    return dst


@contextmanager
def local_copy(where: str | Location, conn_id: str | None = None) -> Iterator[Path]:
    """``where`` as a local file for the duration: in place when local, else a scratch copy."""
    with scratch() as tmp:
        yield fetch(location(where, conn_id), tmp)


@contextmanager
def staged(where: Location, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder to write ``where``'s files into: ``where`` itself when local (created), else a
    scratch folder whose files are stored at ``where`` when the block ends without an error (the names in
    ``last`` after the others, in that order: a file whose arrival marks the output complete)."""
    if not is_remote(where):
        where.mkdir(parents=True, exist_ok=True)
        yield where
        return
    with scratch() as tmp:
        yield tmp
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        ordered = [n for n in written if n not in last] + [n for n in last if n in written]
        for name in ordered:
            publish(tmp / name, where / name)
        if ordered:
            log.info("stored %d file(s) in %s", len(ordered), shown(where))


def mirror(where: Location, scratch: Path) -> Path:
    """A local folder standing for the folder ``where``: ``where`` itself when local (created), else
    ``scratch`` (created); its files are brought over with :func:`fetch_missing` and stored back with
    :func:`publish`, which does nothing for a local ``where``."""
    folder = scratch if is_remote(where) else where
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fetch_missing(target: Location, local: Path) -> None:
    """Copy a stored ``target`` to ``local`` when ``local`` is missing (nothing to do for a local
    ``target``: it is ``local``)."""
    if is_remote(target) and not local.exists() and target.exists():
        fetch(target, local.parent, local.name)


def discard(target: Location) -> None:
    """Delete a stored copy in object storage (a local ``target`` is the local file: its owner deletes it)."""
    if is_remote(target) and target.exists():
        target.unlink()


def fetch_input(where: str, conn_id: str | None, into: Path, roots: Any) -> tuple[str, Any]:
    """The input file ``where`` as a local path, and the allowed roots to check it (and what it names)
    against. A local path is used in place. A URL is checked against ``roots`` first, then fetched into
    ``into``; the roots then also admit exactly that copy (relative image paths still have to lie inside
    them). Raises :class:`~batchpipe.errors.InputError` with a clear message."""
    from batchpipe.errors import InputError
    from batchpipe.paths import PathNotAllowed, Roots, check_within

    if not is_remote(where):
        return (str(local_path(where)) if is_url(str(where)) else str(where)), roots
    try:
        check_within(where, roots, "input CSV")
    except PathNotAllowed as exc:
        raise InputError(str(exc)) from None
    try:
        remote = location(where, conn_id)
    except ValueError as exc:  # a scheme nothing here reads (http://...), a '?' or a password in it
        raise InputError(f"input_csv {exc}") from None
    try:
        local = fetch(remote, into)
    except FileNotFoundError:
        raise InputError(f"{quote_path(where)}: input CSV not found") from None
    if roots is not None:
        roots = Roots([*roots, local.resolve()], setting=roots.setting)
    return str(local), roots


def store_folder_of(where: str) -> str | None:
    """The folder URL of a file in object storage (``s3://b/in`` of ``s3://b/in/q.csv``); None when local."""
    return str(where).rsplit("/", 1)[0] if is_remote(where) else None


def input_stem(where: str) -> str:
    """An input file's name without extension, as a folder name: as is for a local path unless it would
    leave the output folder (``...csv`` has the stem ``..``); a URL's made filesystem-safe. A name that
    had to change is :func:`batchpipe.naming.unique_name` of it (a short hash of the original added)."""
    from batchpipe.naming import unique_name

    where = str(where)
    if not is_remote(where):
        stem = Path(where).stem
        return stem if stem.strip(".") and "/" not in stem else unique_name(stem)
    return unique_name(Path(where.rstrip("/").rsplit("/", 1)[-1]).stem)


def remote_location(where: str, conn_id: str | None = None) -> Location | None:
    """``where`` as an ``ObjectStoragePath`` when it is in object storage, None when it is local."""
    return location(where, conn_id) if is_remote(where) else None


def remove_folder_if_empty(folder: Location) -> None:
    """Remove a local ``folder`` when it is empty (object stores have no folders to remove)."""
    if is_remote(folder):
        return
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: something else lives there


def publish(local: Path, dst: Location) -> None:
    """Store the local file ``local`` at ``dst`` (nothing to do when ``dst`` is that same local file).

    A local target is written beside and renamed into place; an object store writes the object whole.
    """
    if not is_remote(dst):
        if Path(local).resolve() == Path(dst).resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f".{dst.name}.part")
        shutil.copyfile(local, part)
        os.replace(part, dst)
        return
    dst.fs.put(str(local), dst.path)


def answer_cache(where: Location, mode: str):
    """The answer cache at ``where``: :class:`batchpipe.cache.AnswerCache` (one SQLite file) in a local
    folder, :class:`batchpipe.cache.ObjectAnswerCache` (an object per answer) under a remote prefix."""
    from batchpipe.cache import AnswerCache, ObjectAnswerCache

    if is_remote(where):
        return ObjectAnswerCache(where, mode)
    return AnswerCache(where, mode)


def url_reader(conn_id: str | None):
    """The ``url_fs`` callable :mod:`batchpipe` takes to read images in object storage:
    URL -> (the Airflow-authenticated fsspec filesystem, path inside it)."""

    def url_fs(url: str) -> tuple[Any, str]:
        where = location(url, conn_id)
        return where.fs, where.path

    return url_fs


def read_text(where: Location) -> str | None:
    """The text of a file, None when it does not exist."""
    try:
        return where.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def read_capped(where: Location, limit: int) -> str:
    """The UTF-8 text of a regular file (or object) of at most ``limit`` bytes; ValueError otherwise (a
    FIFO, a device or a folder would block or mislead a reader; a huge file would fill its memory),
    FileNotFoundError when it is not there. Local files are checked by ``lstat`` (no link followed) and
    read through the descriptor opened without blocking."""
    import stat as st

    if is_remote(where):
        size = where.stat().st_size
        if size > limit:
            raise ValueError(f"larger than {limit:,} bytes")
        with where.open("rb") as fh:
            return fh.read(limit + 1)[:limit].decode("utf-8", "replace")
    info = os.lstat(where)
    if not st.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > limit:
        raise ValueError(f"larger than {limit:,} bytes")
    fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not st.S_ISREG(os.fstat(fh.fileno()).st_mode):  # replaced between the two looks
            raise ValueError("not a regular file")
        return fh.read(limit + 1)[:limit].decode("utf-8", "replace")


def check_writable(folder: Location, local: Callable[[Path], None] | None = None) -> None:
    """Write and delete a small marker object under ``folder``: wrong credentials, a missing bucket or a
    read-only location fail here, before anything is uploaded or paid for. A local folder is checked by
    ``local`` when given, else created."""
    if not is_remote(folder):
        if local is not None:
            local(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        return
    probe = folder / ".write-check"
    probe.write_text("ok")
    probe.unlink()

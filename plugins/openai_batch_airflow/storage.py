"""Where a run's files live: a local folder, or any URL Airflow's ``ObjectStoragePath`` can open.

``output_dir``, ``work_dir`` and ``input_csv`` accept a local path (as always) or a URL such as
``s3://bucket/prefix``, ``gs://bucket/prefix`` or ``file:///data/x`` (the scheme's filesystem comes
from the installed provider: ``s3`` from apache-airflow-providers-amazon, ``gs`` from ...-google).
The connection is param ``storage_conn_id``, or named in the URL itself (``s3://my_conn@bucket/x``),
or else the filesystem's own default credentials.

The library (:mod:`batchpipe`) works on local files, so a task with a remote location works in a
private scratch folder: it fetches what it reads and publishes what it writes. Nothing is passed
between tasks through a worker's local disk, so mapped shard tasks may run on different machines.
A local location is used in place, exactly as before (no copies).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
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
def local_copy(where: str, conn_id: str | None = None) -> Iterator[Path]:
    """``where`` as a local file for the duration: in place when local, else a scratch copy."""
    with scratch() as tmp:
        yield fetch(location(where, conn_id), tmp)


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


def check_writable(folder: Location) -> None:
    """Write and delete a small marker object under ``folder``: wrong credentials, a missing bucket or a
    read-only location fail here, before anything is uploaded or paid for. Local folders are created."""
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
        return
    probe = folder / ".write-check"
    probe.write_text("ok")
    probe.unlink()

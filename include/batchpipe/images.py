"""Turn an image cell into an image URL for a request.

* ``http://`` / ``https://`` (and ``data:image/...``) values are passed through untouched (not read).
* Anything else is a file path; relative paths resolve against the CSV's folder. The file is sent as a
  ``data:<mime>;base64,...`` URL of its exact bytes. The MIME type comes from the magic bytes
  (PNG, JPEG, GIF, WebP); anything else is rejected.
* With ``roots`` (see ``paths.allowed_roots``), a path that resolves (following symlinks and ``..``)
  outside every root makes the row invalid before the file is stat'ed or opened.
* Object storage: a cell that is a URL such as ``s3://bucket/a.png``, or a relative path when the
  base folder is such a URL, is read through ``url_fs`` — a callable the caller supplies that maps the
  URL to ``(filesystem, path)`` with an fsspec-style filesystem (``info``, ``open``); Airflow's
  ``ObjectStoragePath`` gives one. ``..`` is normalised away before the roots (URL prefixes) are
  checked. Without ``url_fs`` such a cell makes its row invalid, and so does a URL ``url_fs`` refuses
  with ValueError (a scheme no installed filesystem reads, e.g. ``ftp://`` without its provider).

Problems raise ``RowError`` (the row is invalid, the run goes on). A message names the cell redacted and
shortened (:func:`batchpipe.paths.quote_path`); files under ``/proc``, ``/sys`` or ``/dev``, FIFOs, devices
and sockets are refused before they are opened (:func:`batchpipe.paths.file_problem`).
"""

from __future__ import annotations

import base64
import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import paths
from .errors import RowError
from .paths import PathNotAllowed, check_within

#: Maps an object-storage URL to ``(fsspec-style filesystem, path inside it)``.
UrlFs = Callable[[str], tuple[Any, str]]

_MAGIC_LEN = 12


def sniff_mime(head: bytes) -> str | None:
    """MIME type from the first bytes of a file, or None if not a supported image."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_url(value: str) -> bool:
    v = value.lower()
    return v.startswith(("http://", "https://", "data:image/"))


def is_store_url(value: str | os.PathLike | None) -> bool:
    """True for an object-storage URL (``s3://``, ``gs://``...); http(s), data: and file:// are not."""
    if value is None or not paths.is_url(value):
        return False
    return urlsplit(str(value)).scheme.lower() not in ("http", "https", "file", "local")


def _join_url(base: str, relative: str) -> str:
    parts = urlsplit(base)
    joined = posixpath.normpath(posixpath.join(parts.path or "/", relative))
    return urlunsplit(parts._replace(path=joined))


def resolve_path(value: str, base_dir: str | os.PathLike | None) -> Path | str:
    """The file an image cell names: a local Path, or a URL string (a store URL cell, or a relative
    cell under a store URL base, ``..`` normalised)."""
    if is_store_url(value):
        return _join_url(value, ".")
    if paths.is_url(value):  # file://
        value = urlsplit(value).path
    p = Path(value).expanduser()
    if p.is_absolute() or base_dir is None:
        return p
    if is_store_url(base_dir):
        return _join_url(str(base_dir), value)
    return Path(base_dir) / p


def _path_for_cell(value: str, base_dir: str | os.PathLike | None, roots: list[Path] | None) -> Path | str:
    """The file an image cell names; with ``roots``, its resolved path, or RowError when outside them."""
    p = resolve_path(value, base_dir)
    if roots is None:
        return p
    try:
        return check_within(p, roots, "image", shown=value)
    except PathNotAllowed as exc:
        raise RowError(str(exc)) from None
    except OSError as exc:  # resolving it was refused (a link through /proc/<pid>/root): only this row
        raise RowError(f"image path cannot be resolved ({exc.strerror or type(exc).__name__})") from None


class _LocalImage:
    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def size(self) -> int:
        if problem := paths.file_problem(self.path):  # /proc, /dev, a FIFO...: never opened
            raise RowError(f"image {self.name} {problem}")
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise RowError(f"image file not found: {self.name}") from None
        except OSError as exc:
            raise RowError(f"cannot read image {self.name}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RowError(f"image path is not a file: {self.name}")
        return st.st_size

    def read(self, n: int = -1) -> bytes:
        try:  # non-blocking open + fstat: a FIFO swapped in since size() cannot block the worker
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise RowError(f"cannot read image {self.name}: {exc.strerror or exc}") from None
        with open(fd, "rb") as fh:
            if problem := paths.stat_problem(os.fstat(fd)):
                raise RowError(f"image {self.name} {problem}")
            try:
                return fh.read(n)
            except OSError as exc:
                raise RowError(f"cannot read image {self.name}: {exc.strerror or exc}") from None


class _StoredImage:
    """An image in object storage, through an fsspec-style filesystem."""

    def __init__(self, fs: Any, path: str, name: str):
        self.fs, self.path, self.name = fs, path, name

    def size(self) -> int:
        # Only what retrying cannot fix makes the row invalid; throttling, resets or expired credentials
        # propagate, so the task fails and its retry builds the row.
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise RowError(f"image file not found: {self.name}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise RowError(f"cannot read image {self.name}: {exc}") from None
        if info.get("type") != "file":
            raise RowError(f"image path is not a file: {self.name}")
        return int(info["size"])

    def read(self, n: int = -1) -> bytes:
        try:
            with self.fs.open(self.path, "rb") as fh:
                return fh.read(n)
        except FileNotFoundError:
            raise RowError(f"image file not found: {self.name}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise RowError(f"cannot read image {self.name}: {exc}") from None


def _source(location: Path | str, name: str, url_fs: UrlFs | None) -> _LocalImage | _StoredImage:
    if isinstance(location, Path):
        return _LocalImage(location, name)
    if problem := paths.url_problem(location):
        raise RowError(f"image {name} {problem}")
    if url_fs is None:
        scheme = urlsplit(location).scheme
        raise RowError(f"image {name}: {scheme}:// URLs are read only through object storage (from Airflow)")
    try:
        fs, path = url_fs(location)
    except ValueError as exc:  # a scheme no filesystem here reads: the message says what is supported
        raise RowError(f"image {name}: {str(exc).partition(': ')[2] or exc}") from None
    return _StoredImage(fs, path, name)


def check_image(
    path: str | os.PathLike, max_image_mb: float | None = None, shown: str | None = None
) -> tuple[str, int]:
    """Check an image file without reading it all: returns ``(mime, nbytes)`` or raises RowError.

    ``shown`` is how the file is named in messages (default: the path; redacted and shortened).
    """
    p = Path(path)
    return _check(_LocalImage(p, paths.quote_path(shown or p)), max_image_mb)


def _check(src: _LocalImage | _StoredImage, max_image_mb: float | None) -> tuple[str, int]:
    nbytes = src.size()
    _check_size(src.name, nbytes, max_image_mb)
    mime = sniff_mime(src.read(_MAGIC_LEN))
    if mime is None:
        raise RowError(f"unsupported image type (not PNG, JPEG, GIF or WebP): {src.name}")
    return mime, nbytes


def _check_size(p: str, nbytes: int, max_image_mb: float | None) -> None:
    if nbytes == 0:
        raise RowError(f"image file is empty: {p}")
    if max_image_mb is not None and nbytes > max_image_mb * 1024 * 1024:
        raise RowError(
            f"image too big: {p} is {nbytes / 1024 / 1024:.1f} MB, the limit is {max_image_mb:g} MB"
        )


def encode_image(
    path: str | os.PathLike, max_image_mb: float | None = None, shown: str | None = None
) -> tuple[str, str, int]:
    """Read an image file and return ``(data_url, mime, nbytes)``; the base64 is of the exact bytes.

    Same checks and messages as :func:`check_image` (stat, size, type), but the file is opened once.
    Thread-safe (no shared state): the build encodes images from a thread pool.
    """
    p = Path(path)
    return _encode(_LocalImage(p, paths.quote_path(shown or p)), max_image_mb)


def _encode(src: _LocalImage | _StoredImage, max_image_mb: float | None) -> tuple[str, str, int]:
    _check_size(src.name, src.size(), max_image_mb)  # before reading: never load an oversized file
    data = src.read()
    _check_size(src.name, len(data), max_image_mb)
    mime = sniff_mime(data[:_MAGIC_LEN])
    if mime is None:
        raise RowError(f"unsupported image type (not PNG, JPEG, GIF or WebP): {src.name}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", mime, len(data)


def data_url_size(nbytes: int) -> int:
    """Bytes of the ``data:`` URL of an ``nbytes`` image (base64 plus the ``data:<mime>;base64,`` prefix)."""
    return 4 * ((nbytes + 2) // 3) + 32


def encoded_size_hint(value: str, base_dir: str | os.PathLike | None) -> int | None:
    """Roughly how many bytes the data URL of an image cell will take (0 for URLs, empty or missing
    files; None for an image in object storage, where a stat would cost a request). Cheap (one
    stat); used to bound the encoded data in flight. Never raises."""
    v = value.strip()
    if not v or is_url(v):
        return 0
    target = resolve_path(v, base_dir)
    if not isinstance(target, Path):
        return None
    try:
        n = os.stat(target).st_size
    except (OSError, ValueError):
        return 0
    return data_url_size(n)


def image_url_for_cell(
    value: str,
    base_dir: str | os.PathLike | None,
    max_image_mb: float | None = None,
    roots: list[Path] | None = None,
    url_fs: UrlFs | None = None,
) -> str | None:
    """The URL to send for an image cell, or None when the cell is empty (text-only request).

    ``roots``: allowed roots for file paths and store URLs (None = no restriction); http(s) and data:
    URLs are never restricted. ``url_fs``: reads store URLs (see the module docstring).
    """
    v = value.strip()
    if not v:
        return None
    if is_url(v):
        return v
    return _encode(_source(_path_for_cell(v, base_dir, roots), paths.quote_path(v), url_fs), max_image_mb)[0]


def check_image_cell(
    value: str,
    base_dir: str | os.PathLike | None,
    max_image_mb: float | None = None,
    roots: list[Path] | None = None,
    url_fs: UrlFs | None = None,
) -> None:
    """Cheap validation of an image cell (stat + magic bytes, no base64). Raises RowError."""
    v = value.strip()
    if not v or is_url(v):
        return
    _check(_source(_path_for_cell(v, base_dir, roots), paths.quote_path(v), url_fs), max_image_mb)

"""Turn an image cell into an image URL for a request.

* ``http://`` / ``https://`` (and ``data:image/...``) values are passed through untouched (not read).
* Anything else is a file path; relative paths resolve against the CSV's folder. The file is sent as a
  ``data:<mime>;base64,...`` URL of its exact bytes. The MIME type comes from the magic bytes
  (PNG, JPEG, GIF, WebP); anything else is rejected.
* With ``roots`` (see ``paths.allowed_roots``), a path that resolves (following symlinks and ``..``)
  outside every root makes the row invalid before the file is stat'ed or opened.

Problems raise ``RowError`` (the row is invalid, the run goes on).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from .errors import RowError
from .paths import PathNotAllowed, check_within

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


def resolve_path(value: str, base_dir: str | os.PathLike | None) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def _path_for_cell(value: str, base_dir: str | os.PathLike | None, roots: list[Path] | None) -> Path:
    """The file an image cell names; with ``roots``, its resolved path, or RowError when outside them."""
    p = resolve_path(value, base_dir)
    if roots is None:
        return p
    try:
        return check_within(p, roots, "image", shown=value)
    except PathNotAllowed as exc:
        raise RowError(str(exc)) from None


def check_image(
    path: str | os.PathLike, max_image_mb: float | None = None, shown: str | None = None
) -> tuple[str, int]:
    """Check an image file without reading it all: returns ``(mime, nbytes)`` or raises RowError.

    ``shown`` is how the file is named in messages (default: the path).
    """
    p = Path(path)
    name = shown or str(p)
    nbytes = _checked_size(p, name, max_image_mb)
    try:
        with open(p, "rb") as fh:
            head = fh.read(_MAGIC_LEN)
    except OSError as exc:
        raise RowError(f"cannot read image {name}: {exc.strerror or exc}") from None
    mime = sniff_mime(head)
    if mime is None:
        raise RowError(f"unsupported image type (not PNG, JPEG, GIF or WebP): {name}")
    return mime, nbytes


def _checked_size(p: Path, name: str, max_image_mb: float | None) -> int:
    """The size of image file ``p`` (shown as ``name``), after the checks both readers share:
    it exists, is a regular file, is not empty and not over ``max_image_mb``. Raises RowError."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise RowError(f"image file not found: {name}") from None
    except OSError as exc:
        raise RowError(f"cannot read image {name}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RowError(f"image path is not a file: {name}")
    _check_size(name, st.st_size, max_image_mb)
    return st.st_size


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
    name = shown or str(p)
    _checked_size(p, name, max_image_mb)  # before reading: never load an oversized file
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise RowError(f"cannot read image {name}: {exc.strerror or exc}") from None
    _check_size(name, len(data), max_image_mb)
    mime = sniff_mime(data[:_MAGIC_LEN])
    if mime is None:
        raise RowError(f"unsupported image type (not PNG, JPEG, GIF or WebP): {name}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", mime, len(data)


def encoded_size_hint(value: str, base_dir: str | os.PathLike | None) -> int:
    """Roughly how many bytes the data URL of an image cell will take (0 for URLs, empty or missing
    files). Cheap (one stat); used to bound the encoded data in flight. Never raises."""
    v = value.strip()
    if not v or is_url(v):
        return 0
    try:
        n = os.stat(resolve_path(v, base_dir)).st_size
    except (OSError, ValueError):
        return 0
    return 4 * ((n + 2) // 3) + 32


def image_url_for_cell(
    value: str,
    base_dir: str | os.PathLike | None,
    max_image_mb: float | None = None,
    roots: list[Path] | None = None,
) -> str | None:
    """The URL to send for an image cell, or None when the cell is empty (text-only request).

    ``roots``: allowed roots for file paths (None = no restriction); URLs are never restricted.
    """
    v = value.strip()
    if not v:
        return None
    if is_url(v):
        return v
    return encode_image(_path_for_cell(v, base_dir, roots), max_image_mb, v)[0]


def check_image_cell(
    value: str,
    base_dir: str | os.PathLike | None,
    max_image_mb: float | None = None,
    roots: list[Path] | None = None,
) -> None:
    """Cheap validation of an image cell (stat + magic bytes, no base64). Raises RowError."""
    v = value.strip()
    if not v or is_url(v):
        return
    check_image(_path_for_cell(v, base_dir, roots), max_image_mb, v)

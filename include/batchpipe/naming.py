"""Folder and object names made from run ids and file names: safe on every file system, readable,
and unique per original text.

:func:`safe_name` alone maps ``batch:1``, ``batch+1`` and ``batch_1`` to the same ``batch_1``, and
``nightly.`` to ``nightly``; two runs would then share (and overwrite, and clean up) one folder.
:func:`unique_name` keeps a text that is already safe as it is and adds a short hash of the original
text whenever sanitising changed it, so different texts never meet in one folder.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``_`` and leading /
    trailing dots and underscores dropped (``run`` when nothing is left). Not unique: see
    :func:`unique_name`."""
    return _UNSAFE.sub("_", text).strip("._") or "run"


def short_hash(text: str, length: int = 8) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


#: A name that already ends like a hashed one is hashed again, so no chosen text can take another's name.
_HASHED = re.compile(r"-[0-9a-f]{8}$")


def unique_name(text: str, max_len: int = 200) -> str:
    """A folder name for ``text``: ``text`` itself when it is already safe, at most ``max_len`` long and does
    not end like a hashed name (``-`` and 8 hex digits); else its :func:`safe_name`, cut to fit, plus ``-``
    and a short hash of ``text``. Two different texts never give the same name (up to the hash); the
    result is at most ``max_len`` characters (ASCII: bytes too, under the usual 255-byte file name limit)
    and never ``.``, ``..``, empty, or holding a path separator."""
    safe = safe_name(text)
    if safe == text and len(text) <= max_len and not _HASHED.search(text):
        return text
    return f"{safe[: max_len - 9].rstrip('._') or 'run'}-{short_hash(text)}"

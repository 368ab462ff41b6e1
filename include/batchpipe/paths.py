"""Allowed roots: which folders the pipeline may read from and write to.

Two settings, each an ``os.pathsep``-separated list of folders (``:`` on Linux):

* ``OPENAI_BATCH_ALLOWED_ROOTS`` — where input CSVs and image files may be read from.
* ``OPENAI_BATCH_OUTPUT_ROOTS`` — where outputs may be written (checked by the caller with
  :func:`output_roots` + :func:`check_within`).

An entry may also be a URL prefix (``s3://bucket/prefix``) for locations in object storage; the
``:`` of ``scheme://`` does not split the list. A URL is inside a URL root when it starts with it at a
``/`` boundary and has no ``..`` segment; a local path is only inside local roots and a URL only
inside URL roots (``file://`` URLs count as local paths).

Unset (or only empty entries) means no restriction. Paths are compared after ``resolve()``, which
follows symlinks and ``..``, so a symlink inside a root that points outside counts as outside. Checking
a path never reads the file: only ``resolve()`` touches the file system.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import InputError

ALLOWED_ROOTS_ENV = "OPENAI_BATCH_ALLOWED_ROOTS"
OUTPUT_ROOTS_ENV = "OPENAI_BATCH_OUTPUT_ROOTS"


class PathNotAllowed(ValueError):
    """A path resolves outside the allowed roots."""


class _FromEnv:
    """Sentinel default of ``allowed_roots=`` keywords: read ``OPENAI_BATCH_ALLOWED_ROOTS`` at call time."""

    def __repr__(self) -> str:
        return "FROM_ENV"


FROM_ENV = _FromEnv()


class Roots(list):
    """A ``list[Path]`` that remembers which setting it came from (used in error messages)."""

    def __init__(self, paths=(), setting: str = ALLOWED_ROOTS_ENV):
        super().__init__(paths)
        self.setting = setting


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(text: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a one-letter scheme would be a Windows drive, so it needs two)."""
    return bool(_URL.match(str(text)))


def _local(text: str) -> bool:
    return not is_url(text) or urlsplit(text).scheme.lower() in ("file", "local")


def _norm_url(text: str) -> str:
    """A URL root or location compared as text: scheme lower-cased, connection id and trailing / dropped."""
    parts = urlsplit(text.strip())
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme.lower()}://{host}{parts.path}".rstrip("/")


def _split(text: str) -> list[str]:
    if os.pathsep == ":":  # keep the ":" of "s3://" inside its entry
        return re.split(r":(?!//)", text)
    return text.split(os.pathsep)


def parse_roots(text: str | None) -> list[Path | str]:
    """Split an ``os.pathsep``-separated list; local entries ``expanduser().resolve()``d, URL entries
    normalised, empties dropped."""
    if not text:
        return []
    roots: list[Path | str] = []
    for part in _split(text):
        part = part.strip()
        if not part:
            continue
        roots.append(
            _resolve(urlsplit(part).path if is_url(part) else part) if _local(part) else _norm_url(part)
        )
    return roots


def allowed_roots(env_var: str = ALLOWED_ROOTS_ENV, extra: str | None = None) -> list[Path] | None:
    """Roots from the environment variable ``env_var`` plus ``extra`` (same format, e.g. the value of an
    Airflow Variable passed in by the caller). None when neither names a folder (= no restriction)."""
    roots = parse_roots(os.environ.get(env_var)) + parse_roots(extra)
    if not roots:
        return None
    unique = list(dict.fromkeys(roots))  # keep order, drop duplicates
    return Roots(unique, setting=env_var)


def output_roots(extra: str | None = None) -> list[Path] | None:
    """:func:`allowed_roots` for ``OPENAI_BATCH_OUTPUT_ROOTS``."""
    return allowed_roots(OUTPUT_ROOTS_ENV, extra)


def _resolve(path: str | os.PathLike) -> Path:
    if is_url(path):
        path = urlsplit(str(path)).path
    return Path(path).expanduser().resolve()


def redact_url(url: str) -> str:
    """``url`` with a password in it replaced by ``***`` (a bare connection id stays)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return url


def url_problem(url: str) -> str | None:
    """Why a storage URL is refused whatever the roots, or None: a ``?`` or ``#`` (the key that is
    opened would differ from the one checked) or a password in it (secrets belong in a connection)."""
    parts = urlsplit(url)
    if "?" in url or "#" in url:
        return "must not contain '?' or '#'"
    if ":" in parts.netloc.rpartition("@")[0]:
        return "must not carry credentials (put them in an Airflow connection)"
    return None


def _check_url(url: str, roots: list[Path | str], what: str, setting: str, shown: str) -> str:
    target = _norm_url(url)
    if ".." in urlsplit(target).path.split("/"):
        raise PathNotAllowed(f"{what} {shown} has a '..' segment")
    for root in roots:
        if isinstance(root, str) and (target == root or target.startswith(root + "/")):
            return url
    listed = ", ".join(str(r) for r in roots) or "(none)"
    raise PathNotAllowed(f"{what} {shown} is outside the allowed roots ({setting}: {listed})")


def check_within(
    path: str | os.PathLike,
    roots: list[Path | str] | None,
    what: str,
    *,
    setting: str | None = None,
    shown: str | None = None,
) -> Path | str:
    """The resolved ``path`` if ``roots`` is None or it lies inside one of them (a root itself counts).

    A remote URL (``s3://...``) is returned as given when it lies inside one of the URL roots.

    Otherwise raise :class:`PathNotAllowed`, e.g. ``input CSV /x/y.csv is outside the allowed roots
    (OPENAI_BATCH_ALLOWED_ROOTS: /a, /b)``. ``what`` says what the path is ("input CSV", "image",
    "output folder"); ``shown`` is how the path is named in the message (default: ``path`` as given);
    ``setting`` is the setting named in the message (default: the one ``roots`` came from, else
    ``OPENAI_BATCH_ALLOWED_ROOTS``). An empty list allows nothing. No file content is read.
    """
    name = shown if shown is not None else str(path)
    if not _local(str(path)):
        if problem := url_problem(str(path)):
            raise PathNotAllowed(f"{what} {redact_url(name)} {problem}")
        if roots is None:
            return str(path)
        setting = setting or getattr(roots, "setting", None) or ALLOWED_ROOTS_ENV
        return _check_url(str(path), roots, what, setting, name)
    try:
        resolved = _resolve(path)
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        if roots is None:
            return Path(os.path.abspath(os.path.expanduser(path)))
        raise PathNotAllowed(f"{what} {name} cannot be resolved ({exc})") from None
    if roots is None:
        return resolved
    for root in roots:
        if isinstance(root, Path) and resolved.is_relative_to(_resolve(root)):
            return resolved
    setting = setting or getattr(roots, "setting", None) or ALLOWED_ROOTS_ENV
    listed = ", ".join(str(r) for r in roots) or "(none)"
    via = f" (resolves to {resolved})" if str(resolved) != name else ""
    raise PathNotAllowed(f"{what} {name}{via} is outside the allowed roots ({setting}: {listed})")


def roots_or_env(roots: list[Path] | None | _FromEnv) -> list[Path] | None:
    """``roots`` as given, or read from ``OPENAI_BATCH_ALLOWED_ROOTS`` now when it is :data:`FROM_ENV`."""
    return allowed_roots() if roots is FROM_ENV else roots


def check_input_csv(csv_path: str | os.PathLike, roots: list[Path] | None) -> Path:
    """:func:`check_within` for an input CSV, raising the fatal :class:`InputError` instead."""
    try:
        return check_within(csv_path, roots, "input CSV")
    except PathNotAllowed as exc:
        raise InputError(str(exc)) from None

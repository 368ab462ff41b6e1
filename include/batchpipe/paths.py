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
a path never reads the file: only ``resolve()`` and ``stat()`` touch the file system.

Showing input in messages: every path or URL that reaches a log, a notification, XCom, an Asset event
or a report goes through :func:`redact_url` (:func:`quote_path` also shortens it; :func:`redact_text` does
it for every URL inside a free text); any other text taken from an input file or cell is shortened with
:func:`clip`.
"""

from __future__ import annotations

import functools
import os
import re
import stat
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


_WEB_SCHEMES = ("http", "https", "ws", "wss", "ftp")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]+://[^\s'\"<>`]+")
#: ``scheme://`` then, on the same line and before any ``/``, a user part with a ``:``, a space or a quote
#: in it and an ``@``: a password, perhaps with a space or a quote that ends the URL match above early.
_USERINFO_IN_TEXT = re.compile(r"""\b([A-Za-z][A-Za-z0-9+.-]+://)[^/@\n]*[:\s'"][^/@\n]*@""")


def _split_userinfo(after: str) -> tuple[str | None, str]:
    """``(user info, the rest)`` of the part of a URL after ``scheme://`` (``(None, after)`` without one).

    A password may hold a ``/`` (AWS secret keys do): ``s3://KEY:a/b@bucket/x`` is split by ``urlsplit``
    as host ``KEY``, port ``a``. So when the host part has a port that is not a number, the user info
    runs to the last ``@`` before any ``?`` or ``#``."""
    head = re.split(r"[/?#]", after, maxsplit=1)[0]
    if "@" in head:
        at = head.rindex("@")
        return head[:at], after[at + 1 :]
    if ":" in head and not head.rpartition(":")[2].isdigit():
        upto = re.split(r"[?#]", after, maxsplit=1)[0]
        if "@" in upto:
            at = upto.rindex("@")
            return upto[:at], after[at + 1 :]
    return None, after


def redact_url(url: str | os.PathLike) -> str:
    """``url`` as it may be shown in a log, a notification, XCom, an Asset event or a report.

    * a password in it → ``s3://***@bucket/x`` (a bare storage connection id stays: ``s3://my_conn@b/x``);
      for web URLs (http, https, ...) any user part is masked, as a bare token there is a secret;
    * every query value and a fragment are masked (``?X-Amz-Signature=***&token=***``, ``#***``): a
      signed or token URL carries its secret there;
    * plain paths (and ``file://`` URLs without these) are returned unchanged.

    A URL too malformed to split shows only its scheme.
    """
    text = str(url)
    if not is_url(text):
        return text
    scheme, _, after = text.partition("://")
    userinfo, rest = _split_userinfo(after)
    if userinfo is not None and (":" in userinfo or scheme.lower() in _WEB_SCHEMES):
        after = "***@" + rest
    try:
        parts = urlsplit(f"{scheme}://{after}")
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return scheme + "://***"
    if parts.query:
        masked = [f"{pair.partition('=')[0]}=***" if pair else "" for pair in parts.query.split("&")]
        parts = parts._replace(query="&".join(masked))
    if parts.fragment:
        parts = parts._replace(fragment="***")
    return urlunsplit(parts)


def url_origin(url: str) -> str:
    """Only ``scheme://host[:port]`` of ``url`` (no user, path or query): how a webhook, whose path is
    its secret, is named in logs."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(malformed URL)"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}" if parts.scheme else "(not a URL)"


def redact_text(text: object, *, origin_only: bool = False) -> str:
    """``str(text)`` with every URL-looking part in it passed through :func:`redact_url` (or reduced to
    :func:`url_origin` when ``origin_only``): for notification texts and exception messages."""
    swap = url_origin if origin_only else redact_url
    text = _USERINFO_IN_TEXT.sub(lambda m: m.group(1) + "***@", str(text))
    return _URL_IN_TEXT.sub(lambda m: swap(m.group(0)), text)


def clip(text: object, width: int = 200) -> str:
    """``text`` shortened to at most ``width`` characters (head and tail kept around ``…``), with control
    characters escaped: how a value taken from an input file or cell is quoted in a message."""
    text = str(text)
    if not text.isprintable():
        text = repr(text)[1:-1]
    if len(text) <= width:
        return text
    if width < 30:
        return text[: width - 1] + "…"
    tail = width // 4
    return text[: width - tail - 1] + "…" + text[-tail:]


def quote_path(path: str | os.PathLike, width: int = 300) -> str:
    """A path or URL from the input (a CSV location, an image cell) as a message quotes it: redacted, then
    clipped."""
    return clip(redact_url(path), width)


def url_problem(url: str) -> str | None:
    """Why a storage URL is refused whatever the roots, or None: a ``?`` or ``#`` (the key that is
    opened would differ from the one checked) or a password in it (secrets belong in a connection)."""
    if "?" in url or "#" in url:
        return "must not contain '?' or '#'"
    userinfo, _ = _split_userinfo(url.partition("://")[2])
    if userinfo is not None and ":" in userinfo:
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
    "output folder"); ``shown`` is how the path is named in the message (default: ``path`` as given;
    either way redacted and shortened by :func:`quote_path`);
    ``setting`` is the setting named in the message (default: the one ``roots`` came from, else
    ``OPENAI_BATCH_ALLOWED_ROOTS``). An empty list allows nothing. No file content is read.
    """
    name = quote_path(shown if shown is not None else path)
    if not _local(str(path)):
        if problem := url_problem(str(path)):
            raise PathNotAllowed(f"{what} {name} {problem}")
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
    via = f" (resolves to {quote_path(resolved)})" if quote_path(resolved) != name else ""
    raise PathNotAllowed(f"{what} {name}{via} is outside the allowed roots ({setting}: {listed})")


def roots_or_env(roots: list[Path] | None | _FromEnv) -> list[Path] | None:
    """``roots`` as given, or read from ``OPENAI_BATCH_ALLOWED_ROOTS`` now when it is :data:`FROM_ENV`."""
    return allowed_roots() if roots is FROM_ENV else roots


#: Pseudo file systems: their files stat as regular files but hold process memory, environment
#: (``/proc/self/environ``: the API key) or devices. Never read as input, whatever the roots say.
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")

_KINDS = [
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


@functools.cache
def _pseudo_devices() -> frozenset[int]:
    """The devices of /proc, /sys and /dev, unless one is no mount of its own (then it is the root's)."""
    devices = set()
    for root in PSEUDO_ROOTS:
        try:
            devices.add(os.stat(root).st_dev)
        except OSError:
            pass
    return frozenset(devices - {os.stat("/").st_dev})


def file_problem(path: str | os.PathLike) -> str | None:
    """Why a local input file must not be opened, or None (also None when it does not exist: opening it
    says so). Refused: anything under ``/proc``, ``/sys`` or ``/dev`` (after following symlinks) or on
    one of their file systems mounted elsewhere, a directory, a FIFO (opening one would block), a device
    or a socket. Only ``stat()`` is used."""
    try:
        real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    except OSError as exc:  # e.g. a link through /proc/<pid>/root that may not be followed
        return f"cannot be resolved ({exc.strerror or type(exc).__name__}; refused)"
    for root in PSEUDO_ROOTS:
        if real == root or real.startswith(root + "/"):
            return f"is not a regular file (it lies under {root}; refused)"
    try:
        st = os.stat(real)
    except OSError:
        return None
    return stat_problem(st)


def stat_problem(st: os.stat_result) -> str | None:
    """:func:`file_problem` for what ``stat()``/``fstat()`` said (an open file is checked again this way)."""
    if st.st_dev in _pseudo_devices():  # the same file system mounted elsewhere (e.g. /host/proc)
        return "is not a regular file (it lies on the file system of /proc, /sys or /dev; refused)"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a CSV file"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a plain file")
        return f"is not a regular file ({kind}; refused)"
    return None


def check_input_csv(csv_path: str | os.PathLike, roots: list[Path] | None) -> Path:
    """:func:`check_within` for an input CSV, raising the fatal :class:`InputError` instead; a local file
    must also pass :func:`file_problem` (checked with ``stat()``, nothing is opened)."""
    try:
        checked = check_within(csv_path, roots, "input CSV")
    except PathNotAllowed as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:  # resolving it was refused: nothing to open either
        why = exc.strerror or type(exc).__name__
        raise InputError(f"{quote_path(csv_path)}: cannot be resolved ({why}); refused") from None
    if isinstance(checked, Path) and (problem := file_problem(checked)):
        raise InputError(f"{quote_path(csv_path)}: {problem}")
    return checked

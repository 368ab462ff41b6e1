"""Read CSV files as text, streaming.

Every cell is a ``str`` exactly as written in the file: ``007`` stays ``007``, an empty cell is ``""``
(never NaN/None), embedded newlines (quoted), commas, quotes and unicode round-trip. A UTF-8 BOM is
dropped. Rows are read one at a time with the ``csv`` module, so memory does not grow with the file.

Row indexes are 0-based data-row indexes (the header is not a row). Completely blank lines are skipped
(as pandas does), so they are not rows either. A row with fewer fields than the header is padded with
``""``; a row with more fields is a fatal ``InputError`` naming the line.

Only regular files are read: a path under ``/proc``, ``/sys`` or ``/dev``, a directory, FIFO, device or
socket is a fatal ``InputError`` before it is opened (``/proc/self/environ`` holds the API key). Messages
quote at most a few header names, shortened (:func:`column_list`, :func:`quote_value`).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator

from . import paths
from .errors import InputError

# Prompts can be long: lift the csv module's default 128 KiB field limit.
csv.field_size_limit(2**31 - 1)

ENCODING = "utf-8-sig"


#: How many column names, and how many characters of each, a message quotes.
MAX_QUOTED_COLUMNS = 10
MAX_QUOTED_NAME = 40


#: What follows ``=`` or ``": "`` in a "column name" (a ``KEY=value`` line of an env file, a JSON config
#: read as a CSV) is masked: there the first line is settings, not names, and may carry a secret.
_SETTING_VALUE = re.compile(r"""(=|:\s*["'])\s*[^\s,;"']+""")


def column_list(names: list[str]) -> str:
    """Column names as a message quotes them: at most :data:`MAX_QUOTED_COLUMNS`, each cut to its first
    :data:`MAX_QUOTED_NAME` characters (no tail), a value after ``=`` or ``": "`` masked, then ``and N
    more``. The header of a file that is not a CSV can be any text (a secret, megabytes): a message
    never echoes it whole."""
    if not names:
        return "(none)"
    shown = ", ".join(_quoted_name(name) for name in names[:MAX_QUOTED_COLUMNS])
    more = len(names) - MAX_QUOTED_COLUMNS
    return shown + (f" and {more} more" if more > 0 else "")


def _quoted_name(name: str) -> str:
    name = _SETTING_VALUE.sub(r"\1***", name)
    name = paths.clip(name, 10**6)  # control characters escaped
    return name if len(name) <= MAX_QUOTED_NAME else name[: MAX_QUOTED_NAME - 1] + "…"


def quote_value(value: str) -> str:
    """A cell value or column name quoted in a message: shortened, control characters escaped."""
    return paths.clip(repr(value), MAX_QUOTED_NAME + 2)


def _open(path: str | os.PathLike):
    """Open a CSV for reading: never a pseudo file, directory, FIFO, device or socket (checked with
    ``stat()`` before and ``fstat()`` after a non-blocking open, so a FIFO swapped in cannot block)."""
    name = paths.quote_path(path)
    if problem := paths.file_problem(path):
        raise InputError(f"{name}: {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot open ({exc.strerror or exc})") from None
    if problem := paths.stat_problem(os.fstat(fd)):  # swapped for something else since the check
        os.close(fd)
        raise InputError(f"{name}: {problem}")
    return open(fd, encoding=ENCODING, newline="")


class _Reader:
    """csv.reader wrapper turning parser problems into InputError with the file and line."""

    def __init__(self, path: str | os.PathLike, fh):
        self.path = paths.quote_path(path)
        self.reader = csv.reader(fh, strict=True)
        self.header: list[str] = []

    def _next(self) -> list[str] | None:
        try:
            return next(self.reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            raise InputError(f"{self.path}: line {self.reader.line_num}: cannot parse CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: not valid UTF-8 text near line {self.reader.line_num + 1} ({exc.reason})"
            ) from None

    def read_header(self) -> list[str]:
        while True:
            row = self._next()
            if row is None:
                raise InputError(f"{self.path}: file is empty (no header row)")
            if row:
                break
        seen: set[str] = set()
        for name in row:
            if name in seen:
                raise InputError(f"{self.path}: duplicate column name {quote_value(name)} in the header")
            seen.add(name)
        self.header = row
        return row

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        width = len(self.header)
        index = 0
        while True:
            row = self._next()
            if row is None:
                return
            if not row:  # blank line
                continue
            if len(row) > width:
                raise InputError(
                    f"{self.path}: line {self.reader.line_num}: row {index} has {len(row)} fields, "
                    f"the header has {width}"
                )
            if len(row) < width:
                row = row + [""] * (width - len(row))
            yield index, row
            index += 1


def read_header(path: str | os.PathLike) -> list[str]:
    """The column names of ``path``. InputError if the file is empty/unreadable."""
    with _open(path) as fh:
        return _Reader(path, fh).read_header()


def iter_rows(
    path: str | os.PathLike,
    start_row: int = 0,
    end_row: int | None = None,
    chunksize: int = 10_000,
    *,
    allowed_roots: list | None = paths.FROM_ENV,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(row_index, {column: text})`` for data rows in ``[start_row, end_row)``.

    Streams the file row by row (``chunksize`` is accepted for API compatibility; the csv module
    reads incrementally anyway). Stops reading at ``end_row``.

    ``allowed_roots``: folders the file must resolve into (None: anywhere; default:
    ``OPENAI_BATCH_ALLOWED_ROOTS``, read now). Outside → InputError, raised by this call itself,
    before the file is opened.
    """
    paths.check_input_csv(path, paths.roots_or_env(allowed_roots))
    return _iter_dicts(path, start_row, end_row)


def _iter_dicts(path, start_row: int, end_row: int | None) -> Iterator[tuple[int, dict[str, str]]]:
    for index, header, row in _iter_lists(path, start_row, end_row):
        yield index, dict(zip(header, row, strict=True))


def _iter_lists(path, start_row: int = 0, end_row: int | None = None):
    with _open(path) as fh:
        reader = _Reader(path, fh)
        header = reader.read_header()
        for index, row in reader.rows():
            if end_row is not None and index >= end_row:
                return
            if index >= start_row:
                yield index, header, row


def count_rows(path: str | os.PathLike) -> int:
    """Number of data rows in the file (full streaming pass)."""
    n = 0
    with _open(path) as fh:
        reader = _Reader(path, fh)
        reader.read_header()
        for _ in reader.rows():
            n += 1
    return n


def no_rows_error(path, start_row: int, end_row: int | None, rows_in_file: int) -> InputError:
    end = "end" if end_row is None else str(end_row)
    return InputError(
        f"{paths.quote_path(path)}: no data rows in range [{start_row}, {end}) — the file has "
        f"{rows_in_file} data row(s)"
    )

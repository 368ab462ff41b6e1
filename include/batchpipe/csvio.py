"""Read CSV files as text, streaming.

Every cell is a ``str`` exactly as written in the file: ``007`` stays ``007``, an empty cell is ``""``
(never NaN/None), embedded newlines (quoted), commas, quotes and unicode round-trip. A UTF-8 BOM is
dropped. Rows are read one at a time with the ``csv`` module, so memory does not grow with the file.

Row indexes are 0-based data-row indexes (the header is not a row). Completely blank lines are skipped
(as pandas does), so they are not rows either. A row with fewer fields than the header is padded with
``""``; a row with more fields is a fatal ``InputError`` naming the row. Every message naming a data row
says it one way (:func:`row_label`): ``data row 7 (0-based; line 9 of the file)``, the line being the
row's first physical line (a quoted cell may span several lines, so it is not always row + 2).

Bytes that are not UTF-8 are a fatal ``InputError`` naming the byte, its physical line and its data row
(found by a second pass: the decoder reads ahead, so where the reader stands says nothing).

Only regular files are read: a path under ``/proc``, ``/sys`` or ``/dev``, a directory, FIFO, device or
socket is a fatal ``InputError`` before it is opened (``/proc/self/environ`` holds the API key). Messages
quote at most a few header names, shortened (:func:`column_list`, :func:`quote_value`).
"""

from __future__ import annotations

import codecs
import csv
import os
import re
from collections.abc import Iterator
from typing import Any

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


def row_label(index: int, line: int | None) -> str:
    """How every message names a data row: ``data row 7 (0-based; line 9 of the file)``. ``line`` is the
    row's first physical line (1-based; None when unknown)."""
    if line is None:
        return f"data row {index} (0-based)"
    return f"data row {index} (0-based; line {line} of the file)"


def _open(path: str | os.PathLike, binary: bool = False):
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
    if binary:
        return open(fd, "rb")
    return open(fd, encoding=ENCODING, newline="")


def _line_breaks(data: bytes) -> int:
    """Line breaks in ``data`` as the csv reader counts them: ``\r\n``, ``\n`` or a lone ``\r``."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _first_bad_byte(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(offset, byte)`` of the first byte of ``path`` that is not UTF-8 (a BOM is skipped); None if
    there is none. Streams the file in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open(path, binary=True) as fh:
        while chunk := fh.read(1 << 20):
            skip = 3 if offset == 0 and chunk.startswith(codecs.BOM_UTF8) else 0
            pending = decoder.getstate()[0]  # an unfinished sequence from the previous chunk
            try:
                decoder.decode(chunk[skip:])
            except UnicodeDecodeError as exc:  # exc.start counts from the start of ``pending``
                return offset + skip - len(pending) + exc.start, exc.object[exc.start]
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # a sequence cut off by the end of the file
        return offset - len(exc.object) + exc.start, exc.object[exc.start]
    return None


def _line_at(path: str | os.PathLike, offset: int) -> int:
    """The 1-based physical line of the byte at ``offset``."""
    breaks = pos = 0
    last = b""  # the previous chunk's last byte: a \r\n may straddle two chunks
    with _open(path, binary=True) as fh:
        while pos < offset and (chunk := fh.read(min(1 << 20, offset - pos))):
            breaks += _line_breaks(last + chunk) - _line_breaks(last)
            last, pos = chunk[-1:], pos + len(chunk)
    return breaks + 1


def _row_of_line(path: str | os.PathLike, line: int) -> tuple[int, int] | None:
    """``(data row, its first line)`` of the row holding physical ``line`` (``(-1, 1)`` for the header),
    read with undecodable bytes replaced (that never moves a line or field break); None if not found."""
    with (
        _open(path, binary=True) as raw,
        open(raw.fileno(), encoding=ENCODING, errors="replace", newline="", closefd=False) as fh,
    ):
        reader = _Reader(path, fh)
        try:
            reader.read_header()
            if line <= reader.reader.line_num:
                return -1, 1
            for index, _row, first in reader.rows(with_lines=True):
                if line <= reader.reader.line_num:
                    return index, first
        except InputError:  # a parse error before that line: say only the line
            return None
    return None


def _not_utf8(path: str | os.PathLike) -> InputError:
    name = paths.quote_path(path)
    advice = "save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet) and try again"
    found = _first_bad_byte(path)
    if found is None:  # the file changed since it failed to decode
        return InputError(f"{name}: not valid UTF-8 text; {advice}")
    offset, byte = found
    line = _line_at(path, offset)
    row = _row_of_line(path, line)
    if row is None:
        where = ""
    elif row[0] < 0:
        where = " (in the header)"
    else:
        where = f" (in {row_label(*row)})"
    return InputError(
        f"{name}: line {line}: byte 0x{byte:02X} is not valid UTF-8{where}; the file is in another "
        f"encoding (Latin-1, Windows-1252...): {advice}"
    )


class _Reader:
    """csv.reader wrapper turning parser problems into InputError with the file, row and line."""

    def __init__(self, path: str | os.PathLike, fh):
        self.source = path
        self.path = paths.quote_path(path)
        self.reader = csv.reader(fh, strict=True)
        self.header: list[str] = []
        self.first_line = 1  # physical line where the last row read began

    def _next(self, what: str = "the header") -> list[str] | None:
        self.first_line = self.reader.line_num + 1
        try:
            return next(self.reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            raise InputError(
                f"{self.path}: line {self.reader.line_num}: cannot parse CSV ({exc}) in {what}"
            ) from None
        except UnicodeDecodeError:
            raise _not_utf8(self.source) from None

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

    def rows(self, with_lines: bool = False) -> Iterator[tuple]:
        """``(index, cells)`` per data row; with ``with_lines``, ``(index, cells, first physical line)``."""
        width = len(self.header)
        index = 0
        while True:
            row = self._next(f"{row_label(index, self.reader.line_num + 1)} or after")
            if row is None:
                return
            if not row:  # blank line
                continue
            if len(row) > width:
                raise InputError(
                    f"{self.path}: {row_label(index, self.first_line)} has {len(row)} fields, "
                    f"the header has {width}"
                )
            if len(row) < width:
                row = row + [""] * (width - len(row))
            yield (index, row, self.first_line) if with_lines else (index, row)
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


def _iter_lists(path, start_row: int = 0, end_row: int | None = None, with_lines: bool = False):
    """``(index, header, cells)`` per selected row; with ``with_lines`` also the row's first physical
    line: ``(index, header, cells, line)``."""
    with _open(path) as fh:
        reader = _Reader(path, fh)
        header = reader.read_header()
        for index, row, line in reader.rows(with_lines=True):
            if end_row is not None and index >= end_row:
                return
            if index >= start_row:
                yield (index, header, row, line) if with_lines else (index, header, row)


def iter_chunks(
    path: str | os.PathLike, start_row: int = 0, end_row: int | None = None, size: int = 20_000
) -> Iterator[list[list[str]]]:
    """The selected rows (data rows ``[start_row, end_row)``, as :func:`_iter_lists` reads them: blank
    lines skipped, short rows padded with ``""``) in lists of up to ``size`` consecutive rows, read in one
    tight loop. A row the fast loop does not take as it is (a CSV error, more fields than the header, not
    UTF-8) sends the file through :func:`_iter_lists`, which raises the same InputError it always does."""
    with _open(path) as fh:
        reader = _Reader(path, fh)
        width = len(reader.read_header())
        index = 0
        chunk: list[list[str]] = []
        try:
            for row in reader.reader:
                if len(row) != width:
                    if not row:  # blank line
                        continue
                    if len(row) > width:
                        raise _Irregular
                    row += [""] * (width - len(row))
                if index >= start_row:
                    if end_row is not None and index >= end_row:
                        break
                    chunk.append(row)
                    if len(chunk) >= size:
                        yield chunk
                        chunk = []
                index += 1
        except (csv.Error, UnicodeDecodeError, _Irregular):
            for _ in _iter_lists(path, start_row, end_row):
                pass
            raise InputError(f"{paths.quote_path(path)}: cannot read the CSV") from None  # not reached
        if chunk:
            yield chunk


#: Bytes Arrow's CSV reader parses at a time. It reads some dozens of blocks ahead, so this bounds the
#: merge's memory (at 4 MB a 150 MB file took 120 MB more than a 15 MB one; at 1 MB, 20 MB more).
ARROW_BLOCK_BYTES = 1 << 20


def arrow_chunks(
    path: str | os.PathLike,
    header: list[str],
    start_row: int = 0,
    end_row: int | None = None,
    size: int = 20_000,
) -> Iterator[Any]:
    """The selected rows as pyarrow Tables of up to ``size`` consecutive rows, every column a string
    (empty stays ``""``, nothing is null), read with Arrow's CSV reader: the header line is skipped and
    ``header`` names the columns; blank lines are skipped; quoted cells may span lines.

    Arrow's reader is not the csv module's: a file it reads otherwise (a short row, a blank line before the
    header, …) raises ``pyarrow.ArrowException`` or yields other cells. Callers prove it read the same rows
    (the merge checks the rows' digest against the build's) and otherwise read with :func:`iter_chunks`."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with _open(path, binary=True) as fh:
        reader = pcsv.open_csv(
            fh,
            read_options=pcsv.ReadOptions(
                column_names=header, skip_rows=1, use_threads=False, block_size=ARROW_BLOCK_BYTES
            ),
            parse_options=pcsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[],
                check_utf8=True,
            ),
        )
        index = 0  # data row of the batch's first row
        pending: list[Any] = []
        held = 0
        for batch in reader:
            n = batch.num_rows
            lo = max(start_row - index, 0)
            hi = n if end_row is None else min(n, end_row - index)
            index += n
            if hi > lo:
                pending.append(batch.slice(lo, hi - lo))
                held += hi - lo
                while held >= size:
                    table = pa.Table.from_batches(pending, reader.schema)
                    yield table.slice(0, size)
                    rest = table.slice(size)
                    pending, held = rest.to_batches(), rest.num_rows
            if end_row is not None and index >= end_row:
                break
        if held:
            yield pa.Table.from_batches(pending, reader.schema)


class _Irregular(Exception):
    """A row :func:`iter_chunks` leaves to the careful reader."""


def line_of_row(path: str | os.PathLike, index: int) -> int | None:
    """The first physical line of data row ``index`` (a second pass, for messages); None if unknown."""
    try:
        for _, _, _, line in _iter_lists(path, index, index + 1, with_lines=True):
            return line
    except InputError:
        pass
    return None


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
    last = f" (0 to {rows_in_file - 1})" if rows_in_file else ""
    return InputError(
        f"{paths.quote_path(path)}: no data rows in range [{start_row}, {end}) (0-based data rows, the "
        f"header is not one) — the file has {rows_in_file} data row(s){last}"
    )

"""``results.csv`` and ``results.parquet``: the merged rows, written with pyarrow as the merge goes
(:class:`ResultFiles`), from the same Arrow arrays.

``results.csv`` (Arrow's CSV writer): RFC 4180 with CRLF line ends; every text cell is quoted (so a cell
holding a comma, quote, CR or LF always reads back whole), numbers (token counts) are not, and a cell with
no value is empty. An answer column holds :func:`batchpipe.schema.cell` text; ``response`` and ``error``
get a leading ``'`` where they start like a formula (``formula_escape``). ``results.parquet`` keeps what
came, unescaped and typed. Its columns, in the order of ``results.csv``:

* the input's own columns as strings, as in the CSV (``007`` stays ``007``, an empty cell is ``""``, never
  null);
* the answer columns of a ``response_schema``, typed from the schema: ``string``, ``double``
  (``number``), ``int64`` (``integer``), ``bool``, ``list<…>`` (an array of one item type), ``struct<…>``
  (an object with properties), and a JSON string where no one type fits (``anyOf``, an object without
  properties, a ``$ref``, mixed types); null where the row has no parsed answer;
* ``response``: string, or ``list<float>`` (float32) for ``/v1/embeddings`` (the vector; the CSV keeps it
  as JSON text; a base64 answer is decoded as little-endian float32);
* ``error``: string (``""`` when answered); ``answered_from``: ``batch`` (its own request, sent in this
  run), ``row N`` (the same request, sent once for data row N) or null (not sent); ``prompt_tokens``,
  ``completion_tokens``, ``total_tokens``: ``int64``, null when unknown (and on a row answered by another
  row's request: it was billed once, on that row).

The merge hands over one chunk of rows at a time (a range of the CSV) and each is written at once (in
Parquet row groups of at most :data:`ROW_GROUP_ROWS`), so memory does not grow with the input (pyarrow
itself takes about 65 MB). The files are written to temporary names and renamed by the caller when the
merge succeeds.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .schema import CheckedSchema, compact_json
from .schema import cell as _cell

ROW_GROUP_ROWS = 20_000
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SCALARS = {"string": "string", "number": "float64", "integer": "int64", "boolean": "bool_"}


def _json_text(value: Any) -> str | None:
    return None if value is None else compact_json(value)


def _same(value: Any) -> Any:
    return value


def _float(value: Any) -> float | None:
    """A JSON number as a double; None for an integer beyond a double's range (the CSV keeps it)."""
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _int64(value: Any) -> int | None:
    """A JSON integer as int64; None beyond its range (the CSV keeps it)."""
    return value if value is None or -(2**63) <= value < 2**63 else None


def converter(node: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(Arrow type, convert)`` for answer values under schema ``node``: a scalar type, a list of one
    item type, a struct of an object's properties; a JSON string where the schema gives no one type."""
    import pyarrow as pa

    kinds: list[str] = []
    if isinstance(node, dict) and "$ref" not in node and "anyOf" not in node:
        kinds = [node["type"]] if isinstance(node.get("type"), str) else list(node.get("type") or [])
        if not kinds and node.get("enum") and all(isinstance(v, str) for v in node["enum"]):
            kinds = ["string"]
    kinds = [k for k in kinds if k != "null"]
    kind = kinds[0] if len(kinds) == 1 else None
    if kind in _SCALARS:
        return getattr(pa, _SCALARS[kind])(), {"number": _float, "integer": _int64}.get(kind, _same)
    if kind == "array":
        item_type, item = converter(node.get("items"))
        if item is _same:  # strings, booleans: the list as it is
            return pa.list_(item_type), _same
        return pa.list_(item_type), lambda v: None if v is None else [item(x) for x in v]
    if kind == "object" and node.get("properties"):
        parts = {name: converter(sub) for name, sub in node["properties"].items()}
        struct_type = pa.struct([pa.field(name, part[0]) for name, part in parts.items()])
        return struct_type, lambda v: None if v is None else {n: f(v.get(n)) for n, (_, f) in parts.items()}
    return pa.string(), _json_text


def _vector(text: str | None) -> list[float] | None:
    try:
        return embedding(text)
    except (ValueError, TypeError):  # not a vector after all: kept as text in results.csv
        return None


def embedding(text: str | None) -> list[float] | None:
    """An embeddings answer as floats: the JSON list the merge keeps as text, or base64 float32."""
    if not text:
        return None
    if text.startswith("["):
        return [float(v) for v in json.loads(text)]
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))


#: OWASP: a cell starting with one of these is a formula to Excel / LibreOffice / Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escaped(texts: list[str | None]) -> tuple[list[str | None], int]:
    """``texts`` with a ``'`` before each that starts like a formula, and how many got one."""
    hits = [i for i, x in enumerate(texts) if x and x.startswith(FORMULA_START)]
    if not hits:
        return texts, 0
    out = list(texts)
    for i in hits:
        out[i] = "'" + out[i]
    return out, len(hits)


class ResultFiles:
    """Write the merged rows to ``csv_path`` and (unless None) ``parquet_path`` (see the module):
    :meth:`write` each chunk of rows, :meth:`close` at the end (:meth:`abort` on failure: partial files are
    removed)."""

    def __init__(
        self,
        csv_path: str | Path,
        parquet_path: str | Path | None,
        header: list[str],
        checked: CheckedSchema | None,
        answer_columns: list[str],
        endpoint: str,
        *,
        formula_escape: bool = True,
    ) -> None:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        self.csv_path = Path(csv_path)
        self.parquet_path = Path(parquet_path) if parquet_path is not None else None
        self.header = list(header)
        self.formula_escape = formula_escape
        nodes = [checked.schema["properties"][name] for name in checked.properties] if checked else []
        self.converters = [converter(node) for node in nodes]
        self.vectors = endpoint == "/v1/embeddings"
        inputs = [pa.field(name, pa.string(), nullable=False) for name in self.header]
        tokens = [pa.field(name, pa.int64()) for name in TOKEN_COLUMNS]
        self.schema = pa.schema(
            inputs
            + [pa.field(name, kind) for name, (kind, _) in zip(answer_columns, self.converters, strict=True)]
            + [pa.field("response", pa.list_(pa.float32()) if self.vectors else pa.string())]
            + [pa.field("error", pa.string(), nullable=False), pa.field("answered_from", pa.string())]
            + tokens
        )
        self.csv_schema = pa.schema(
            inputs
            + [pa.field(name, pa.string()) for name in answer_columns]
            + [pa.field("response", pa.string()), pa.field("error", pa.string())]
            + [pa.field("answered_from", pa.string())]
            + tokens
        )
        self.rows = 0
        self.escaped = 0  # cells that got a leading ' in results.csv
        self.parquet = self.csv = None
        try:
            self.csv = pcsv.CSVWriter(
                str(self.csv_path), self.csv_schema, write_options=pcsv.WriteOptions(eol="\r\n")
            )
            if self.parquet_path is not None:
                self.parquet = pq.ParquetWriter(self.parquet_path, self.schema, compression="zstd")
        except BaseException:
            self.abort()
            raise

    def write(
        self,
        inputs: list[Any],
        n: int,
        values: list[list[Any] | None] | None,
        responses: list[str | None],
        errors: list[str],
        answered_from: list[str | None],
        usage: tuple[list[int | None], list[int | None], list[int | None]],
        *,
        arrays: bool = False,
    ) -> None:
        """A chunk of ``n`` rows: ``inputs``, the rows' input cells (lists of strings; ``arrays``: one
        pyarrow string array per input column instead); and one entry per row in each list: the parsed
        answer values (one per answer column; None: not parsed; ``values`` None without a schema); the raw
        answer (None: none); the error (``""``: none); where the answer came from (``batch``, ``row N``;
        None for a row not sent); and the prompt, completion and total token counts."""
        import pyarrow as pa

        if not n:
            return
        if not arrays:
            inputs = [pa.array(col, pa.string()) for col in zip(*inputs, strict=True)] if self.header else []
        typed, cells = [], []
        if self.converters:  # one list per answer column (None where the row has no parsed answer)
            nothing = [None] * len(self.converters)
            columns = list(zip(*[nothing if v is None else v for v in values], strict=True))
        for (kind, convert), column in zip(self.converters, columns if self.converters else (), strict=True):
            if convert is _same:
                typed.append(pa.array(column, kind))
            else:
                typed.append(pa.array([None if v is None else convert(v) for v in column], kind))
            if convert is _same and pa.types.is_string(kind):  # the answers' own text
                text = column
            else:
                text = [None if v is None else _cell(v) for v in column]
            if self.formula_escape and pa.types.is_string(kind):  # text only: a negative number is a number
                hits = [i for i, v in enumerate(column) if type(v) is str and v.startswith(FORMULA_START)]
                if hits:
                    text = list(text)
                    for i in hits:
                        text[i] = "'" + text[i]
                    self.escaped += len(hits)
            cells.append(pa.array(text, pa.string()))
        counts = [pa.array([v if type(v) is int else None for v in col], pa.int64()) for col in usage]
        csv_errors: list[str | None] = [e or None for e in errors]
        csv_responses = responses
        if self.formula_escape:
            csv_responses, k = _escaped(responses)
            csv_errors, m = _escaped(csv_errors)
            self.escaped += k + m
        text_response = pa.array(csv_responses, pa.string())
        source = pa.array(answered_from, pa.string())
        self.csv.write_table(
            pa.Table.from_arrays(
                inputs + cells + [text_response, pa.array(csv_errors, pa.string()), source] + counts,
                schema=self.csv_schema,
            )
        )
        if self.parquet is not None:
            if self.vectors:
                vectors = [_vector(r) if not e else None for r, e in zip(responses, errors, strict=True)]
                response = pa.array(vectors, self.schema.field("response").type)
            elif csv_responses is responses:
                response = text_response
            else:
                response = pa.array(responses, pa.string())
            error = pa.array(errors, pa.string())
            table = pa.Table.from_arrays(
                inputs + typed + [response, error, source] + counts, schema=self.schema
            )
            self.parquet.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += n

    def close(self) -> None:
        self.csv.close()
        if self.parquet is not None:
            self.parquet.close()

    def abort(self) -> None:
        for writer in (self.csv, self.parquet):
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - a failed write's writer; the file goes anyway
                    pass
        self.csv_path.unlink(missing_ok=True)
        if self.parquet_path is not None:
            self.parquet_path.unlink(missing_ok=True)

"""``results.parquet``: the merged rows with types, written with pyarrow in row groups as the merge goes.

Columns, in the order of ``results.csv``:

* the input's own columns as strings, as in the CSV (``007`` stays ``007``, an empty cell is ``""``, never
  null);
* the answer columns of a ``response_schema``, typed from the schema: ``string``, ``double``
  (``number``), ``int64`` (``integer``), ``bool``, ``list<…>`` (an array of one item type), ``struct<…>``
  (an object with properties), and a JSON string where no one type fits (``anyOf``, an object without
  properties, a ``$ref``, mixed types); null where the row has no parsed answer;
* ``response``: string, or ``list<float>`` (float32) for ``/v1/embeddings`` (the vector; the CSV keeps it
  as JSON text; a base64 answer is decoded as little-endian float32);
* ``error``: string (``""`` when answered); ``prompt_tokens``, ``completion_tokens``, ``total_tokens``:
  ``int64``, null when unknown.

Rows are kept as they come and written in row groups of :data:`ROW_GROUP_ROWS`, so memory does not grow
with the input (pyarrow itself takes about 65 MB). The file is written to a temporary name and renamed by
the caller when the merge succeeds.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .schema import CheckedSchema

ROW_GROUP_ROWS = 20_000
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SCALARS = {"string": "string", "number": "float64", "integer": "int64", "boolean": "bool_"}


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _same(value: Any) -> Any:
    return value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


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
        return getattr(pa, _SCALARS[kind])(), _float if kind == "number" else _same
    if kind == "array":
        item_type, item = converter(node.get("items"))
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


class ParquetRows:
    """Write merged rows to ``path`` (see the module): :meth:`add` each row, :meth:`close` at the end
    (:meth:`abort` on failure: the partial file is removed)."""

    def __init__(
        self,
        path: str | Path,
        header: list[str],
        checked: CheckedSchema | None,
        answer_columns: list[str],
        endpoint: str,
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.header = list(header)
        nodes = [checked.schema["properties"][name] for name in checked.properties] if checked else []
        self.converters = [converter(node) for node in nodes]
        self.vectors = endpoint == "/v1/embeddings"
        fields = [pa.field(name, pa.string(), nullable=False) for name in self.header]
        fields += [
            pa.field(name, kind) for name, (kind, _) in zip(answer_columns, self.converters, strict=True)
        ]
        fields.append(pa.field("response", pa.list_(pa.float32()) if self.vectors else pa.string()))
        fields.append(pa.field("error", pa.string(), nullable=False))
        fields += [pa.field(name, pa.int64()) for name in TOKEN_COLUMNS]
        self.schema = pa.schema(fields)
        self.buffer: list[tuple[Any, ...]] = []
        self.rows = 0
        self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    def add(
        self,
        row: list[str],
        values: list[Any] | None,
        response: str | None,
        error: str,
        tokens: tuple[int | None, int | None, int | None],
    ) -> None:
        """One row: its input cells, its parsed answer values (None: not parsed), the raw answer, the
        error (``""``: none) and the token counts. Kept as it is until the row group is written."""
        self.buffer.append((row, values, response, error, tokens))
        if len(self.buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.buffer:
            return
        rows, values, responses, errors, tokens = zip(*self.buffer, strict=True)
        columns: list[Any] = list(zip(*rows, strict=True)) if self.header else []
        for j, (_, convert) in enumerate(self.converters):
            columns.append([None if v is None else convert(v[j]) for v in values])
        if self.vectors:
            columns.append([_vector(r) if not e else None for r, e in zip(responses, errors, strict=True)])
        else:
            columns.append(responses)
        columns.append(errors)
        for k in range(len(TOKEN_COLUMNS)):
            columns.append([t[k] if isinstance(t[k], int) else None for t in tokens])
        arrays = [pa.array(col, type=field.type) for col, field in zip(columns, self.schema, strict=True)]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(self.buffer)
        self.buffer = []

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.path.unlink(missing_ok=True)

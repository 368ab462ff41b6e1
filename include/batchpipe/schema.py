"""Response schemas: the JSON Schema every answer must follow, checked before anything is sent.

``response_schema`` asks the model for a JSON object of a given shape (OpenAI's strict structured
outputs). The service accepts only a subset of JSON Schema in strict mode and refuses the whole batch
(after the upload, before any answer) for a schema outside it; :func:`check_response_schema` refuses such
a schema first, naming the offending place (``$.properties.address.properties.zip``), and returns the
schema as it is sent: every object with ``additionalProperties: false`` (added where absent, and said so
in the notes).

The subset (OpenAI, "Structured Outputs: supported schemas"): the root is an object (not ``anyOf``) with
``properties``; every object lists every property in ``required`` (optional = a union with ``null``) and
has ``additionalProperties: false``; types string, number, integer, boolean, object, array, null, with
``enum``, ``const`` and ``anyOf``, ``$ref`` into ``$defs``; constraints ``pattern``, ``format`` (a fixed
list), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``/``multipleOf``,
``minItems``/``maxItems``; ``title`` and ``description`` anywhere. Refused: ``allOf``, ``not``, ``if``/
``then``/``else``, ``dependentRequired``/``dependentSchemas``, ``patternProperties``, ``default``, and any
keyword not listed. Limits: 5,000 object properties, 10 levels of object nesting, 1,000 enum values,
120,000 characters of property names, definition names, enum and const values, and 15,000 characters of
values in one string enum of more than 250 values.

The schema must also be valid JSON Schema (draft 2020-12), checked with ``jsonschema``. No Airflow import.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .paths import clip

#: The ``name`` the schema is sent under (``json_schema.name`` / ``text.format.name``).
SCHEMA_NAME = "row_answer"

MAX_PROPERTIES = 5_000
MAX_DEPTH = 10
MAX_ENUM_VALUES = 1_000
MAX_SCHEMA_CHARS = 120_000
BIG_ENUM = 250
BIG_ENUM_CHARS = 15_000

TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})

_ANY = frozenset({"type", "description", "title", "enum", "const", "anyOf", "$ref"})
_BY_TYPE = {
    "string": frozenset({"pattern", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
}
_ROOT_ONLY = frozenset({"$defs", "definitions", "$schema"})
_WHY_REFUSED = {
    "allOf": "strict mode has no allOf; merge the parts into one object",
    "oneOf": "strict mode has no oneOf; use anyOf",
    "not": "strict mode has no not",
    "if": "strict mode has no if/then/else",
    "then": "strict mode has no if/then/else",
    "else": "strict mode has no if/then/else",
    "dependentRequired": "strict mode has no dependentRequired",
    "dependentSchemas": "strict mode has no dependentSchemas",
    "patternProperties": "strict mode has no patternProperties: list the properties",
    "default": "strict mode has no default: every property is required (a null union makes it optional)",
}
_COLUMN_SAFE = re.compile(r"^[^\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class CheckedSchema:
    """A response schema as it is sent (``schema``), its answer columns (the top-level properties, in
    schema order) and what was changed in it (``notes``)."""

    schema: dict[str, Any]
    properties: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    def columns(self, prefix: str = "") -> list[str]:
        """The column each top-level property lands in."""
        return [prefix + name for name in self.properties]


def check_response_schema(schema: Any, what: str = "response_schema") -> CheckedSchema:
    """Check ``schema`` against what strict structured outputs accept (see the module); return it as it
    is sent, or raise :class:`InputError` naming the offending place under ``what``."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InputError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise InputError(f"{what}: must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    _check_valid_json_schema(schema, what)
    if "anyOf" in schema:
        raise InputError(f"{what}: the root may not be anyOf: it must be one object with properties")
    if schema.get("type") != "object":
        raise InputError(
            f'{what}: the root must have "type": "object" (got {clip(repr(schema.get("type")), 40)})'
        )
    if not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise InputError(f'{what}: the root object needs "properties": at least one (each becomes a column)')
    sent = copy.deepcopy(schema)
    walk = _Walk(what, sent)
    walk.node(sent, "$", depth=1, root=True)
    for name, sub in (sent.get("$defs") or {}).items():
        walk.node(sub, f"$.$defs.{name}", depth=1)
    for name, sub in (sent.get("definitions") or {}).items():
        walk.node(sub, f"$.definitions.{name}", depth=1)
    walk.limits()
    properties = tuple(sent["properties"])
    for name in properties:
        if not name.strip() or not _COLUMN_SAFE.match(name):
            raise InputError(f"{what}: property {clip(repr(name), 60)} cannot be a column name")
    return CheckedSchema(sent, properties, tuple(walk.notes))


def check_columns(
    checked: CheckedSchema,
    header: Iterable[str],
    output_columns: Iterable[str],
    prefix: str = "",
    what: str = "response_schema",
) -> list[str]:
    """The answer columns of ``checked`` under ``prefix``; :class:`InputError` when one is also an input
    column or an output column (``response``, ``error``, tokens), naming both."""
    columns = checked.columns(prefix)
    header, output = list(header), list(output_columns)
    for prop, column in zip(checked.properties, columns, strict=True):
        if column in header:
            raise InputError(
                f"{what}: property {prop!r} would land in column {column!r}, which the input CSV already "
                'has; rename one, or set output_prefix (e.g. "answer_")'
            )
        if column in output:
            raise InputError(
                f"{what}: property {prop!r} would land in column {column!r}, which the results use for their "
                f'own ({", ".join(output)}); rename it, or set output_prefix (e.g. "answer_")'
            )
    return columns


def _check_valid_json_schema(schema: dict[str, Any], what: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise InputError(f"{what}: not a valid JSON Schema at {where}: {clip(exc.message, 200)}") from None


class _Walk:
    """One pass over the schema: keywords, strictness, depth; counts for the limits."""

    def __init__(self, what: str, root: dict[str, Any]) -> None:
        self.what, self.root = what, root
        self.notes: list[str] = []
        self.properties = 0
        self.enum_values = 0
        self.chars = 0

    def fail(self, where: str, why: str) -> InputError:
        return InputError(f"{self.what}: {where}: {why}")

    def node(self, node: Any, where: str, depth: int, root: bool = False) -> None:
        if not isinstance(node, dict):
            raise self.fail(where, "must be a schema object")
        types = node.get("type")
        kinds = [types] if isinstance(types, str) else list(types or [])
        for kind in kinds:
            if kind not in TYPES:
                raise self.fail(
                    where, f"type {clip(repr(kind), 40)} is not one of {', '.join(sorted(TYPES))}"
                )
        if not kinds and not any(k in node for k in ("enum", "const", "anyOf", "$ref")):
            raise self.fail(where, "needs a type (or enum, const, anyOf, $ref)")
        allowed = set(_ANY) | (_ROOT_ONLY if root else set())
        for kind in kinds:
            allowed |= _BY_TYPE.get(kind, frozenset())
        for key in node:
            if key in allowed:
                continue
            if key in _WHY_REFUSED:
                raise self.fail(where, f"{key!r} is not allowed ({_WHY_REFUSED[key]})")
            if key in {k for keys in _BY_TYPE.values() for k in keys}:
                raise self.fail(where, f"{key!r} does not apply to type {types!r}")
            raise self.fail(where, f"{clip(repr(key), 60)} is not supported in strict mode")
        if "format" in node and node["format"] not in FORMATS:
            raise self.fail(
                where, f"format {clip(repr(node['format']), 40)} is not one of {', '.join(sorted(FORMATS))}"
            )
        if "enum" in node:
            values = node["enum"]
            self.enum_values += len(values)
            text = sum(len(v) for v in values if isinstance(v, str))
            self.chars += text
            if len(values) > BIG_ENUM and all(isinstance(v, str) for v in values) and text > BIG_ENUM_CHARS:
                why = f"an enum of {len(values)} strings may hold {BIG_ENUM_CHARS:,} characters in all"
                raise self.fail(where, f"{why}, not {text:,}")
        if isinstance(node.get("const"), str):
            self.chars += len(node["const"])
        if "$ref" in node:
            self.ref(node["$ref"], where)
        for i, sub in enumerate(node.get("anyOf") or []):
            self.node(sub, f"{where}.anyOf[{i}]", depth)
        if "object" in kinds:
            self.object(node, where, depth)
        if "array" in kinds and "items" in node:
            self.node(node["items"], f"{where}.items", depth)
        elif "array" in kinds:
            raise self.fail(where, 'an array needs "items"')

    def object(self, node: dict[str, Any], where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, f"objects nest {depth} levels deep here; strict mode allows {MAX_DEPTH}")
        properties = node.get("properties")
        if properties is None:
            properties = node["properties"] = {}
        self.properties += len(properties)
        self.chars += sum(len(name) for name in properties)
        required = node.get("required", [])
        missing = [name for name in properties if name not in required]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (
                f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            )
            optional = 'for an optional one, list it and allow null: "type": ["string", "null"]'
            raise self.fail(
                where,
                f'every property must be listed in "required" (strict mode); missing: {shown}; {optional}',
            )
        unknown = [name for name in required if name not in properties]
        if unknown:
            raise self.fail(
                where,
                f'"required" names {", ".join(repr(u) for u in unknown[:10])}, not among its properties',
            )
        extra = node.get("additionalProperties")
        if extra is None:
            node["additionalProperties"] = False
            self.notes.append(f'{where}: added "additionalProperties": false (strict mode needs it)')
        elif extra is not False:
            raise self.fail(where, '"additionalProperties" must be false (strict mode): list every property')
        for name, sub in properties.items():
            self.node(sub, f"{where}.properties.{name}", depth + 1)

    def ref(self, ref: Any, where: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith(("#/$defs/", "#/definitions/"))):
            raise self.fail(where, f"$ref {clip(repr(ref), 60)} must point into this schema (#/$defs/...)")
        if ref == "#":
            return
        section, _, name = ref[2:].partition("/")
        if name not in (self.root.get(section) or {}):
            raise self.fail(where, f"$ref {clip(repr(ref), 60)} names no definition")

    def limits(self) -> None:
        defs = {**(self.root.get("$defs") or {}), **(self.root.get("definitions") or {})}
        self.chars += sum(len(name) for name in defs)
        if self.properties > MAX_PROPERTIES:
            raise self.fail(
                "$", f"{self.properties:,} object properties in all; strict mode allows {MAX_PROPERTIES:,}"
            )
        if self.enum_values > MAX_ENUM_VALUES:
            raise self.fail(
                "$", f"{self.enum_values:,} enum values in all; strict mode allows {MAX_ENUM_VALUES:,}"
            )
        if self.chars > MAX_SCHEMA_CHARS:
            what = "characters of property names, definition names, enum and const values"
            raise self.fail("$", f"{self.chars:,} {what}; strict mode allows {MAX_SCHEMA_CHARS:,}")


class AnswerColumns:
    """Each answer of a structured run as its columns: the answer's JSON checked against the schema, then
    one cell per top-level property, in schema order (:func:`cell`).

    The answer is decoded with msgspec (the standard library's decoder for what msgspec refuses: its
    message names the problem, and it takes lone surrogates, kept as their ``\\udXXX`` escape; ``NaN``,
    ``Infinity`` and numbers out of a double's range are not JSON numbers) and checked with jsonschema-rs
    (Draft 2020-12, formats not asserted, nothing fetched), whose first error names where and why."""

    def __init__(self, checked: CheckedSchema) -> None:
        import jsonschema_rs
        import msgspec

        self.properties = checked.properties
        self.validator = jsonschema_rs.Draft202012Validator(checked.schema, validate_formats=False)
        self._decode = msgspec.json.Decoder().decode
        self._refused = msgspec.MsgspecError

    def values(self, text: str | None, note: str | None = None) -> tuple[list[Any] | None, str | None, str]:
        """``(values, None, "")`` for an answer that follows the schema (one value per top-level property,
        in schema order; :func:`cell` makes each a CSV cell), else ``(None, code, message)``: code
        ``truncated`` (``note`` says the answer was cut off) or ``schema_mismatch`` (not JSON, or not what
        the schema says, naming where)."""
        if note == "truncated":
            return (
                None,
                "truncated",
                "truncated: the answer was cut off at the token limit before its JSON ended",
            )
        try:
            value = self._decode(text or "")
        except self._refused:
            from .results import without_lone_surrogates

            try:
                value = without_lone_surrogates(
                    json.loads(text or "", parse_constant=_not_a_number, parse_float=_finite)
                )
            except ValueError as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                return None, "schema_mismatch", f"schema_mismatch: the answer is not JSON ({why})"
        if not self.validator.is_valid(value):
            error = next(iter(self.validator.iter_errors(value)))
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.instance_path)
            return None, "schema_mismatch", f"schema_mismatch: at {where}: {clip(error.message, 200)}"
        return [value[name] for name in self.properties], None, ""


def _not_a_number(word: str) -> float:
    raise ValueError(f"{word} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{clip(text, 40)} is out of a number's range")
    return value


_ENCODER = None


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text (msgspec: no spaces, UTF-8 as it is; what ``json.dumps(value,
    ensure_ascii=False, separators=(",", ":"))`` writes, except that a float's exponent has no ``+``)."""
    global _ENCODER
    if _ENCODER is None:
        import msgspec

        _ENCODER = msgspec.json.Encoder()
    return _ENCODER.encode(value).decode("utf-8")


def cell(value: Any) -> str:
    """A JSON value as a CSV cell: strings as they are, null empty, ``true``/``false``, numbers, arrays and
    objects as compact JSON (:func:`compact_json`)."""
    kind = type(value)
    if kind is str:
        return value
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    return compact_json(value)

"""batchpipe.schema: a response schema is refused before anything is sent when strict structured outputs
would refuse it, naming the place; what is sent has additionalProperties: false everywhere."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from batchpipe import InputError
from batchpipe.build import OUTPUT_COLUMNS
from batchpipe.schema import MAX_DEPTH, check_columns, check_response_schema

REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "spam": {"type": "boolean"},
        "product": {
            "type": ["object", "null"],
            "properties": {"name": {"type": "string"}, "price": {"type": ["number", "null"]}},
            "required": ["name", "price"],
        },
    },
    "required": ["sentiment", "score", "topics", "spam", "product"],
}


def test_a_good_schema_is_sent_with_additional_properties_false_everywhere_and_says_so():
    given = copy.deepcopy(REVIEW)
    checked = check_response_schema(given)
    assert given == REVIEW  # the caller's schema is not changed
    assert checked.properties == ("sentiment", "score", "topics", "spam", "product")
    assert checked.columns("answer_") == [f"answer_{p}" for p in checked.properties]
    assert checked.schema["additionalProperties"] is False
    assert checked.schema["properties"]["product"]["additionalProperties"] is False
    assert checked.notes == (
        '$: added "additionalProperties": false (strict mode needs it)',
        '$.properties.product: added "additionalProperties": false (strict mode needs it)',
    )
    assert check_response_schema(json.dumps(REVIEW)).schema == checked.schema  # JSON text from a form or CLI
    again = check_response_schema(checked.schema)
    assert again.schema == checked.schema and again.notes == ()


def with_(path: list, value, base=REVIEW) -> dict:
    schema = copy.deepcopy(base)
    node = schema
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return schema


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ("{not json", "not valid JSON"),
        ({"type": "array", "items": {"type": "string"}}, 'the root must have "type": "object"'),
        ({"anyOf": [{"type": "object", "properties": {}}]}, "the root may not be anyOf"),
        ({"type": "object", "properties": {}}, 'needs "properties": at least one'),
        (with_(["properties", "score", "type"], 5), "not a valid JSON Schema at $.properties.score.type"),
        (
            with_(["properties", "score", "type"], "decimal"),
            "at $.properties.score.type: 'decimal' is not valid",
        ),
        (with_(["properties", "spam", "default"], False), "$.properties.spam: 'default' is not allowed"),
        (
            with_(["properties", "sentiment", "minLength"], 2),
            "$.properties.sentiment: 'minLength' is not supported",
        ),
        (with_(["properties", "spam", "pattern"], "x"), "'pattern' does not apply to type 'boolean'"),
        (with_(["properties", "sentiment", "format"], "iso-4217"), "format 'iso-4217' is not one of"),
        (with_(["allOf"], [{"type": "object"}]), "$: 'allOf' is not allowed"),
        (with_(["required"], ["sentiment", "score"]), "missing: 'topics', 'spam', 'product'"),
        (with_(["required"], [*REVIEW["required"], "ghost"]), "\"required\" names 'ghost'"),
        (with_(["additionalProperties"], True), '"additionalProperties" must be false'),
        (
            with_(["properties", "product", "additionalProperties"], {"type": "string"}),
            '$.properties.product: "additionalProperties" must be false',
        ),
        (with_(["properties", "topics"], {"type": "array"}), '$.properties.topics: an array needs "items"'),
        (with_(["properties", "tag"], {"$ref": "#/$defs/tag"}), "names no definition"),
        (with_(["properties", "tag"], {"$ref": "https://example.com/s.json"}), "must point into this schema"),
        (with_(["properties", "x"], {"description": "anything"}), "$.properties.x: needs a type"),
        (with_(["properties", "bad\nname"], {"type": "string"}), "cannot be a column name"),
    ],
)
def test_a_schema_strict_mode_would_refuse_is_refused_naming_the_place(schema, message):
    if isinstance(schema, dict) and "properties" in schema and schema is not REVIEW:
        schema["required"] = schema.get("required", [])
        for name in schema["properties"]:
            if name not in schema["required"] and "missing:" not in message:
                schema["required"].append(name)
    with pytest.raises(InputError) as exc:
        check_response_schema(schema)
    assert str(exc.value).startswith("response_schema: ") and message in str(exc.value), str(exc.value)


def test_definitions_and_references_are_checked_too():
    schema = with_(["properties", "tag"], {"$ref": "#/$defs/tag"})
    schema["required"].append("tag")
    schema["$defs"] = {
        "tag": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    }
    checked = check_response_schema(schema)
    assert checked.schema["$defs"]["tag"]["additionalProperties"] is False
    schema["$defs"]["tag"]["properties"]["label"]["default"] = ""
    with pytest.raises(InputError, match=r"\$\.\$defs\.tag\.properties\.label: 'default' is not allowed"):
        check_response_schema(schema)


def nested(levels: int) -> dict:
    node: dict = {"type": "string"}
    for _ in range(levels):
        node = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    return node


def test_the_limits_of_strict_mode():
    check_response_schema(nested(MAX_DEPTH))
    with pytest.raises(InputError, match=f"nest {MAX_DEPTH + 1} levels deep"):
        check_response_schema(nested(MAX_DEPTH + 1))
    many = {f"p{i}": {"type": "string"} for i in range(5_001)}
    with pytest.raises(InputError, match="5,001 object properties in all; strict mode allows 5,000"):
        check_response_schema({"type": "object", "properties": many, "required": list(many)})
    enums = {f"e{i}": {"type": "string", "enum": [str(j) for j in range(101)]} for i in range(10)}
    with pytest.raises(InputError, match="1,010 enum values in all"):
        check_response_schema({"type": "object", "properties": enums, "required": list(enums)})
    big = {"type": "string", "enum": [f"{j:060d}" for j in range(260)]}
    with pytest.raises(
        InputError, match="an enum of 260 strings may hold 15,000 characters in all, not 15,600"
    ):
        check_response_schema({"type": "object", "properties": {"big": big}, "required": ["big"]})


def test_an_answer_column_may_not_collide_with_an_input_or_output_column():
    checked = check_response_schema(REVIEW)
    header = ["id", "prompt", "score"]
    with pytest.raises(
        InputError, match="property 'score' would land in column 'score', which the input CSV"
    ):
        check_columns(checked, header, OUTPUT_COLUMNS)
    assert check_columns(checked, header, OUTPUT_COLUMNS, prefix="a_")[1] == "a_score"
    clash = with_(["properties", "error"], {"type": "string"})
    clash["required"].append("error")
    with pytest.raises(InputError, match="column 'error', which the results use for their own"):
        check_columns(check_response_schema(clash), ["id", "prompt"], OUTPUT_COLUMNS)


# -- carried by the options, the validation and every request -------------------------------------------
def sample_csv(tmp_path, header=("id", "review")):
    path = tmp_path / "reviews.csv"
    path.write_text(",".join(header) + "\n001,Great value\n002,Broke after a day\n", encoding="utf-8")
    return path


def test_requests_carry_the_schema_as_each_endpoint_wants_it(tmp_path):
    from batchpipe import BuildOptions, build_jsonl

    sent = check_response_schema(REVIEW).schema
    chat = BuildOptions(prompt_column="review", response_schema=REVIEW)
    out = build_jsonl(sample_csv(tmp_path), chat, tmp_path / "chat")
    lines = [json.loads(x) for x in open(out["shards"][0]["path"], encoding="utf-8")]
    assert [x["body"]["messages"][-1]["content"] for x in lines] == ["Great value", "Broke after a day"]
    assert all(
        x["body"]["response_format"]
        == {"type": "json_schema", "json_schema": {"name": "row_answer", "strict": True, "schema": sent}}
        for x in lines
    )
    responses = BuildOptions(
        prompt_column="review", endpoint="/v1/responses", response_schema=json.dumps(REVIEW)
    )
    out = build_jsonl(
        sample_csv(tmp_path), BuildOptions.from_dict(responses.to_dict()), tmp_path / "responses"
    )
    (line, _) = [json.loads(x) for x in open(out["shards"][0]["path"], encoding="utf-8")]
    assert line["body"]["text"] == {
        "format": {"type": "json_schema", "name": "row_answer", "strict": True, "schema": sent}
    }
    assert "response_format" not in line["body"]


def test_validation_names_the_answer_columns_and_what_was_added(tmp_path):
    from batchpipe import BuildOptions, validate_csv

    summary = validate_csv(sample_csv(tmp_path), BuildOptions(prompt_column="review", response_schema=REVIEW,
                                                              output_prefix="a_"))  # fmt: skip
    assert summary["answer_columns"] == ["a_sentiment", "a_score", "a_topics", "a_spam", "a_product"]
    assert len(summary["schema_notes"]) == 2
    plain = validate_csv(sample_csv(tmp_path), BuildOptions(prompt_column="review"))
    assert plain["answer_columns"] == [] and plain["schema_notes"] == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpoint": "/v1/embeddings"}, "embeddings have no answer to shape"),
        (
            {"extra_body": {"response_format": {"type": "json_object"}}},
            "may not set 'response_format' with a response_schema",
        ),
        (
            {"endpoint": "/v1/responses", "extra_body": {"text": {}}},
            "may not set 'text' with a response_schema",
        ),
        ({"response_schema": "[1"}, "option response_schema: not valid JSON"),
        ({"response_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}, "missing: 'a'"),
        ({"output_prefix": "a\tb"}, "output_prefix"),
    ],
)
def test_options_refuse_a_schema_that_cannot_be_sent_before_reading_the_csv(tmp_path, options, message):
    from batchpipe import BuildOptions, validate_csv

    with pytest.raises(InputError, match=message):
        opts = BuildOptions.from_dict({"prompt_column": "review", "response_schema": REVIEW, **options})
        validate_csv(tmp_path / "never-read.csv", opts)


def test_a_property_named_like_an_input_column_fails_naming_the_file_and_both(tmp_path):
    from batchpipe import BuildOptions, validate_csv

    path = sample_csv(tmp_path, header=("spam", "review"))
    with pytest.raises(InputError) as exc:
        validate_csv(path, BuildOptions(prompt_column="review", response_schema=REVIEW))
    assert str(exc.value).startswith(f"{path}: response_schema: property 'spam' would land in column 'spam'")
    validate_csv(path, BuildOptions(prompt_column="review", response_schema=REVIEW, output_prefix="answer_"))


# -- answers into typed columns ---------------------------------------------------------------------------
def answer_line(cid: str, content: str, finish: str = "stop", refusal: str | None = None) -> dict:
    message = {"role": "assistant", "content": None if refusal else content, "refusal": refusal}
    body = {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}  # fmt: skip
    return {"id": f"r-{cid}", "custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None}


def test_answers_become_typed_columns_and_the_others_say_why_not(tmp_path):
    import csv

    from batchpipe import BuildOptions, build_jsonl, merge_results

    rows = ["Great value", "=cmd|' /C calc'!A0", "not json", "wrong type", "cut off", "refused", "007"]
    src = tmp_path / "reviews.csv"
    src.write_text("id,review\n" + "".join(f'{i:03d},"{r}"\n' for i, r in enumerate(rows)), encoding="utf-8")
    schema = with_(["properties", "note"], {"type": ["string", "null"]})
    schema["required"].append("note")
    opts = BuildOptions(prompt_column="review", response_schema=schema, output_prefix="a_")
    built = build_jsonl(src, opts, tmp_path / "build")
    good = {"sentiment": "positive", "score": 0.9, "topics": ["price", "größe"], "spam": False,
            "product": {"name": "Kettle", "price": None}, "note": None}  # fmt: skip
    lines = [
        answer_line("row-0", json.dumps(good)),
        answer_line(
            "row-1",
            json.dumps({**good, "sentiment": "negative", "product": None, "topics": ['=HYPERLINK("x")']}),
        ),  # fmt: skip
        answer_line("row-2", "Sure! Here is the JSON you asked for"),
        answer_line("row-3", json.dumps({**good, "score": "high"})),
        answer_line("row-4", json.dumps(good)[:30], finish="length"),
        answer_line("row-5", "", refusal="I can't help with that."),
        answer_line("row-6", json.dumps({**good, "score": 1, "spam": True, "note": "=1+1"})),
    ]
    results = tmp_path / "out.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = merge_results(built["manifest"], [results], tmp_path / "results.csv")
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        out = [dict(zip(header, r, strict=True)) for r in reader]
    answer = ["a_sentiment", "a_score", "a_topics", "a_spam", "a_product", "a_note"]
    assert header == ["id", "review", *answer, *OUTPUT_COLUMNS]
    assert [r["id"] for r in out] == [f"{i:03d}" for i in range(7)]  # every row once, in order, 007 stays
    first = ["positive", "0.9", '["price","größe"]', "false", '{"name":"Kettle","price":null}', ""]
    assert [out[0][c] for c in answer] == first
    assert out[0]["response"] == json.dumps(good) and out[0]["error"] == ""
    assert out[1]["a_product"] == "" and out[1]["a_topics"] == '["=HYPERLINK(\\"x\\")"]'
    assert out[6]["a_note"] == "'=1+1" and out[6]["a_score"] == "1" and out[6]["a_spam"] == "true"
    whys = [(2, "schema_mismatch: the answer is not JSON"), (3, 'schema_mismatch: at $.score: "high" is not'),
            (4, "truncated: the answer was cut off"), (5, "refusal: I can't help with that.")]  # fmt: skip
    for i, why in whys:
        assert all(out[i][c] == "" for c in answer) and out[i]["error"].startswith(why), out[i]
    assert out[2]["response"] == "Sure! Here is the JSON you asked for"  # the raw text is kept
    assert out[4]["response"] == json.dumps(good)[:30] and out[4]["total_tokens"] == "25"
    assert report["structured"] == {"columns": answer, "parsed": 3, "not_parsed": 3}
    assert report["answered"] == 3 and report["failed"] == 4
    assert report["errors_by_code"] == {"refusal": 1, "schema_mismatch": 2, "truncated": 1}


def test_an_answer_cut_off_at_the_token_limit_is_marked_on_every_endpoint():
    from batchpipe.results import TRUNCATED, parse_result_line

    text = {"type": "message", "content": [{"type": "output_text", "text": '{"sentiment": "pos'}]}
    for status, note in (("incomplete", TRUNCATED), ("completed", None)):
        body = {
            "status": status,
            "output": [text],
            "usage": {"input_tokens": 3, "output_tokens": 9, "total_tokens": 12},
        }
        line = {"custom_id": "row-0", "response": {"status_code": 200, "body": body}, "error": None}
        o = parse_result_line(line, "/v1/responses")
        assert o.ok and o.response == '{"sentiment": "pos' and o.error_code == note
    chat = answer_line("row-0", "{", finish="length")
    assert parse_result_line(chat, "/v1/chat/completions").error_code == TRUNCATED
    assert parse_result_line(answer_line("row-0", "{}"), "/v1/chat/completions").error_code is None


def test_the_cli_takes_a_schema_from_a_file_or_as_json_and_refuses_a_bad_one(tmp_path, capsys):
    from batchpipe.cli import main

    src = sample_csv(tmp_path)
    (tmp_path / "schema.json").write_text(json.dumps(REVIEW), encoding="utf-8")
    schema_file = str(tmp_path / "schema.json")
    args = [
        "validate",
        str(src),
        "--prompt-column",
        "review",
        "--response-schema",
        schema_file,
        "--output-prefix",
        "a_",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "answer columns: a_sentiment, a_score, a_topics, a_spam, a_product" in out
    assert 'response schema: $: added "additionalProperties": false' in out
    bad = json.dumps(
        {"type": "object", "properties": {"x": {"type": "string", "default": ""}}, "required": ["x"]}
    )
    assert main(["validate", str(src), "--prompt-column", "review", "--response-schema", bad]) == 2
    assert "$.properties.x: 'default' is not allowed" in capsys.readouterr().err
    assert main(["validate", str(src), "--prompt-column", "review", "--response-schema", "nope.json"]) == 2
    assert "--response-schema nope.json: no such file" in capsys.readouterr().err


def test_the_estimate_counts_the_schema_in_every_request(tmp_path):
    from batchpipe import BuildOptions, build_jsonl
    from batchpipe.estimate import estimate_build
    from batchpipe.tokens import count_text_tokens

    src = sample_csv(tmp_path)
    plain = build_jsonl(src, BuildOptions(prompt_column="review"), tmp_path / "plain")
    opts = BuildOptions(prompt_column="review", response_schema=REVIEW)
    shaped = build_jsonl(src, opts, tmp_path / "shaped")
    sent = {"name": "row_answer", "strict": True, "schema": check_response_schema(REVIEW).schema}
    per_request = count_text_tokens(json.dumps(sent, separators=(",", ":")), "gpt-4o")
    before, after = estimate_build(plain["manifest"]), estimate_build(shaped["manifest"])
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2 * per_request > 100


# -- results.parquet -------------------------------------------------------------------------------------
def test_results_parquet_has_the_types_of_the_schema_and_the_csv_cells_as_they_are(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchpipe import BuildOptions, build_jsonl, merge_results
    from batchpipe import parquet as typed

    monkeypatch.setattr(typed, "ROW_GROUP_ROWS", 2)  # several row groups
    src = tmp_path / "reviews.csv"
    src.write_text(
        'id,review,zip\n001,Great,007\n002,"=bad",\n003,,12\n004,Fine,x\n005,Meh,\n', encoding="utf-8"
    )
    schema = with_(["properties", "count"], {"type": ["integer", "null"]})
    schema["required"].append("count")
    built = build_jsonl(src, BuildOptions(prompt_column="review", response_schema=schema), tmp_path / "build")
    good = {"sentiment": "positive", "score": 1, "topics": ["a"], "spam": True,
            "product": {"name": "Kettle", "price": 12.5}, "count": 3}  # fmt: skip
    empty = {**good, "product": None, "count": None, "topics": []}
    lines = [
        answer_line("row-0", json.dumps(good)),
        answer_line("row-1", "nope"),
        answer_line("row-3", json.dumps(empty)),
    ]
    results = tmp_path / "out.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = merge_results(built["manifest"], [results], tmp_path / "results.csv")
    table = pq.read_table(tmp_path / "results.parquet")
    assert report["results_parquet"] == str((tmp_path / "results.parquet").resolve())
    assert pq.ParquetFile(tmp_path / "results.parquet").num_row_groups == 3
    types = {f.name: f.type for f in table.schema}
    assert types == {
        "id": pa.string(), "review": pa.string(), "zip": pa.string(),
        "sentiment": pa.string(), "score": pa.float64(), "topics": pa.list_(pa.string()), "spam": pa.bool_(),
        "product": pa.struct([pa.field("name", pa.string()), pa.field("price", pa.float64())]),
        "count": pa.int64(), "response": pa.string(), "error": pa.string(), "answered_from": pa.string(),
        "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "total_tokens": pa.int64(),
    }  # fmt: skip
    rows = table.to_pylist()
    assert [r["zip"] for r in rows] == ["007", "", "12", "x", ""]  # text as in the CSV, empty never null
    assert rows[0] | {"response": None} == {
        "id": "001", "review": "Great", "zip": "007", "sentiment": "positive", "score": 1.0, "topics": ["a"],
        "spam": True, "product": {"name": "Kettle", "price": 12.5}, "count": 3, "response": None,
        "error": "", "answered_from": "batch",
        "prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25,
    }  # fmt: skip
    assert rows[1]["sentiment"] is None and rows[1]["response"] == "nope"
    assert rows[1]["review"] == "=bad"  # nothing escaped: a program reads it
    assert rows[1]["error"].startswith("schema_mismatch: the answer is not JSON")
    assert (
        rows[2]["error"].startswith("not sent: ") and rows[2]["response"] is None and rows[2]["score"] is None
    )
    assert rows[3]["product"] is None and rows[3]["count"] is None and rows[3]["topics"] == []
    assert rows[4]["error"] == "no result returned for this request" and rows[4]["total_tokens"] is None


def test_results_parquet_without_a_schema_and_embeddings_as_float_vectors(tmp_path):
    import base64
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchpipe import BuildOptions, build_jsonl, merge_results

    src = sample_csv(tmp_path)
    built = build_jsonl(
        src, BuildOptions(prompt_column="review", endpoint="/v1/embeddings"), tmp_path / "build"
    )
    packed = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    lines = []
    for cid, vector in (("row-0", [0.25, -0.5]), ("row-1", packed)):
        data = [{"object": "embedding", "index": 0, "embedding": vector}]
        usage = {"prompt_tokens": 2, "total_tokens": 2}
        body = {"object": "list", "data": data, "model": "text-embedding-3-small", "usage": usage}
        lines.append({"custom_id": cid, "response": {"status_code": 200, "body": body}, "error": None})
    results = tmp_path / "out.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    merge_results(built["manifest"], [results], tmp_path / "results.csv")
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema.field("response").type == pa.list_(pa.float32())
    assert table.column("response").to_pylist() == [[0.25, -0.5], [0.5, -1.0, 2.0]]
    assert table.column_names == ["id", "review", "response", "error", *OUTPUT_COLUMNS[2:]]


def test_report_html_shows_the_structured_counts_with_the_column_names_escaped(tmp_path):
    from batchpipe import BuildOptions, build_jsonl, merge_results
    from batchpipe.report import write_report_html

    schema = {"type": "object", "properties": {"<b>tag</b>": {"type": "string"}}, "required": ["<b>tag</b>"]}
    built = build_jsonl(sample_csv(tmp_path), BuildOptions(prompt_column="review", response_schema=schema),
                        tmp_path / "build")  # fmt: skip
    results = tmp_path / "out.jsonl"
    lines = [answer_line("row-0", json.dumps({"<b>tag</b>": "x"})), answer_line("row-1", "{")]
    results.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = merge_results(built["manifest"], [results], tmp_path / "results.csv")
    page = write_report_html(tmp_path / "results.csv", report, tmp_path / "report.html").read_text(
        encoding="utf-8"
    )
    assert '<table class="structured">' in page and "<td>1</td><td>1</td>" in page
    assert "&lt;b&gt;tag&lt;/b&gt;" in page and "<b>tag</b>" not in page


# -- AnswerColumns: each answer decoded, checked and cut into values ----------------------------------------
def _answers():
    from batchpipe.schema import AnswerColumns

    return AnswerColumns(check_response_schema(REVIEW))


GOOD = {"sentiment": "positive", "score": 0.5, "topics": ["a"], "spam": False, "product": None}


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ({**GOOD, "sentiment": "great"}, 'at $.sentiment: "great" is not one of'),
        ({**GOOD, "score": 2}, "at $.score: 2 is greater than the maximum of 1"),
        ({**GOOD, "topics": [1]}, 'at $.topics[0]: 1 is not of type "string"'),
        ({**GOOD, "extra": 1}, "Additional properties are not allowed ('extra' was unexpected)"),
        ({k: v for k, v in GOOD.items() if k != "spam"}, 'at $: "spam" is a required property'),
        ({**GOOD, "product": {"name": "x", "price": 1, "colour": "red"}}, "at $.product: Additional"),
        ({**GOOD, "score": float("nan")}, "the answer is not JSON (NaN is not a JSON number)"),
    ],
)
def test_an_answer_is_checked_against_the_schema_and_the_reason_named(answer, why):
    values, code, message = _answers().values(json.dumps(answer))
    assert (values, code) == (None, "schema_mismatch")
    assert message.startswith("schema_mismatch: ") and why in message, message


def test_an_answer_with_lone_surrogates_keeps_them_as_escapes_and_can_be_written():
    text = json.dumps({**GOOD, "topics": ["\ud800 half", "ok"]})  # ensure_ascii: "\\ud800" in the text
    values, code, message = _answers().values(text)
    assert code is None and values[2] == ["\\ud800 half", "ok"]
    "".join(values[2]).encode("utf-8")  # writable as UTF-8
    assert _answers().values(json.dumps(GOOD))[0] == ["positive", 0.5, ["a"], False, None]
    assert (
        "1e999 is out of a number's range" in _answers().values(json.dumps(GOOD).replace("0.5", "1e999"))[2]
    )


def test_numbers_beyond_int64_or_a_double_stay_in_the_csv_and_are_null_in_parquet(tmp_path):
    import pyarrow.parquet as pq

    from batchpipe import BuildOptions, build_jsonl, merge_results

    src = tmp_path / "in.csv"
    src.write_text("review\nfine\nhuge\n", encoding="utf-8")
    schema = {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "score": {"type": "number"}},
        "required": ["count", "score"],
    }
    built = build_jsonl(src, BuildOptions(prompt_column="review", response_schema=schema), tmp_path / "b")
    huge = "1" + "0" * 400
    lines = [
        answer_line("row-0", '{"count": 3, "score": 0.5}'),
        answer_line("row-1", f'{{"count": {huge}, "score": {huge}}}'),
    ]
    results = tmp_path / "out.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = merge_results(built["manifest"], [results], tmp_path / "results.csv")
    assert report["answered"] == 2
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["count"], r["score"]) for r in rows] == [("3", "0.5"), (huge, huge)]  # the CSV keeps them
    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [(r["count"], r["score"]) for r in table] == [(3, 0.5), (None, None)]  # beyond int64 / a double

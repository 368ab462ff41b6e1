"""Structured answers through the whole pipeline: ``dag.test()`` against the local batch server (real HTTP,
the real client), with a response schema and images; the schema's refusals before anything is uploaded."""

from __future__ import annotations

import csv
import json

from conftest import run_pipeline as run

SECRET = "sk-structured-secret-7f21"

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "urgent": {"type": "boolean"},
        "summary": {"type": ["string", "null"]},
    },
    "required": ["sentiment", "score", "tags", "urgent", "summary"],
}
ANSWER = ["sentiment", "score", "tags", "urgent", "summary"]


def results(tmp_path, stem="questions") -> tuple[list[str], list[dict], dict]:
    (path,) = (tmp_path / "out" / stem).glob("*/results.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [dict(zip(header, r, strict=True)) for r in reader]
    return header, rows, json.loads((path.parent / "report.json").read_text())


def test_a_schema_run_with_images_lands_typed_columns_on_every_row(dag, srv, tmp_path, sample):
    text = sample.read_text(encoding="utf-8").replace(
        "Name three primary colours.", "Name three [[not json]]"
    )
    sample.write_text(text, encoding="utf-8")
    with open(sample, newline="", encoding="utf-8") as fh:
        given = list(csv.DictReader(fh))
    dr, tis = run(dag, tmp_path, sample, id_column="id", response_schema=SCHEMA, keep_temp_files=True)
    header, rows, report = results(tmp_path)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert header == ["id", "prompt", "image", "zip", *ANSWER, "response", "error", "answered_from",
                      "prompt_tokens", "completion_tokens", "total_tokens"]  # fmt: skip
    assert [r["id"] for r in rows] == [g["id"] for g in given]  # every row once, in order
    assert [r["zip"] for r in rows] == [g["zip"] for g in given]  # 007 stays 007, empty stays empty
    parsed = [r for r in rows if r["sentiment"]]
    assert report["structured"] == {"columns": ANSWER, "parsed": len(parsed), "not_parsed": 1}
    with_image = 0
    for r in parsed:
        assert r["error"] == "" and json.loads(r["response"])["summary"] == r["summary"]
        assert r["summary"].startswith(f"ECHO: {r['prompt']}")  # the right answer on the right row
        if r["image"]:
            with_image += 1
            assert " [image image/" in r["summary"]  # the image went out with its row
        assert r["sentiment"] in ("positive", "neutral", "negative") and 0 <= float(r["score"]) <= 1
        assert isinstance(json.loads(r["tags"]), list) and r["urgent"] in ("true", "false")
    assert with_image >= 3
    (plain,) = [r for r in rows if r["id"] == "q002"]
    assert all(plain[c] == "" for c in ANSWER) and plain["response"].startswith(
        "ECHO: Name three [[not json]]"
    )
    assert plain["error"].startswith("schema_mismatch: the answer is not JSON")
    # results.parquet: the same rows, the answer columns typed
    import pyarrow as pa
    import pyarrow.parquet as pq

    (typed,) = (tmp_path / "out" / "questions").glob("*/results.parquet")
    table = pq.read_table(typed)
    assert table.column_names == header
    kinds = {n: table.schema.field(n).type for n in ANSWER}
    assert kinds == {"sentiment": pa.string(), "score": pa.float64(), "tags": pa.list_(pa.string()),
                     "urgent": pa.bool_(), "summary": pa.string()}  # fmt: skip
    back = table.to_pylist()
    assert [r["zip"] for r in back] == [r["zip"] for r in rows] and [r["id"] for r in back] == [
        r["id"] for r in rows
    ]
    for r, b in zip(rows, back, strict=True):
        assert (b["score"] is None) == (r["score"] == "") and (
            b["score"] is None or b["score"] == float(r["score"])
        )
        assert b["urgent"] is None or ("true" if b["urgent"] else "false") == r["urgent"]
        # what went out: every request line carries the schema as chat completions want it
    (work,) = (tmp_path / "out" / "questions").glob("*/work")
    line = json.loads((work / "shard-00000.jsonl").read_text(encoding="utf-8").splitlines()[0])
    fmt = line["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == {**SCHEMA, "additionalProperties": False}


def test_a_schema_strict_mode_refuses_fails_validation_before_anything_is_uploaded(
    dag, srv, tmp_path, sample, capfd
):
    bad = {**SCHEMA, "properties": {**SCHEMA["properties"], "zip": {"type": "string"}},
           "required": [*SCHEMA["required"], "zip"]}  # fmt: skip
    dr, tis = run(dag, tmp_path, sample, response_schema=bad)
    assert dr.state == "failed" and tis[("validate_csv", -1)].state == "failed"
    assert srv.client().files.list().data == []
    logged = "".join(capfd.readouterr())
    assert (
        "response_schema: property 'zip' would land in column 'zip', which the input CSV already has"
        in logged
    )
    dr, tis = run(dag, tmp_path, sample, response_schema=bad, output_prefix="answer_")
    assert dr.state == "success"
    header, rows, _ = results(tmp_path)
    assert "answer_zip" in header and rows[0]["answer_zip"].startswith("ECHO: ")

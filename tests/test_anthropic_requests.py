"""Requests written for Anthropic's Message Batches (library, no Airflow; ``provider: anthropic``): the
request shape (system top-level, base64 image blocks before the text, ``max_tokens``, a schema as
``output_config``), each line valid under the API reference (a hand-written schema: the SDK's types do not
validate), ids Anthropic takes, the options it refuses, the approximate estimate, repeats sent once."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from batchpipe import BuildOptions, build_jsonl, merge_results
from batchpipe.errors import InputError
from batchpipe.estimate import estimate_build
from batchpipe.tokens import anthropic_image_tokens
from test_dedupe import read_csv, write_csv

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "tests" / "data" / "anthropic_batch_request.schema.json").read_text())
SCHEMA_ANSWER = {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
                 "required": ["label"], "additionalProperties": False}  # fmt: skip


def claude(**more) -> BuildOptions:
    return BuildOptions(provider="anthropic", model="claude-sonnet-4-5", max_tokens=200, **more)


def lines(build: dict) -> list[dict]:
    return [json.loads(x) for s in build["shards"] for x in Path(s["path"]).read_text("utf-8").splitlines()]


def test_requests_follow_the_api_reference_with_images_system_and_schema(tmp_path):
    shutil.copytree(REPO / "data" / "sample" / "images", tmp_path / "images")
    rows = [["What is this?", "images/red_circle.png"], ["And this, «ünïcode»?", "images/green_triangle.jpg"],
            ["Text only\nwith a newline", ""]]  # fmt: skip
    src = write_csv(tmp_path / "in.csv", ["prompt", "image"], rows)
    opts = claude(image_column="image", system_prompt="Be brief.", response_schema=SCHEMA_ANSWER)
    b = build_jsonl(src, opts, tmp_path / "b", allowed_roots=None)
    sent = lines(b)
    assert [r["custom_id"] for r in sent] == ["row-0", "row-1", "row-2"]
    for r in sent:
        jsonschema.validate(r, SCHEMA)  # raises naming the place
        p = r["params"]
        assert (p["model"], p["max_tokens"], p["system"]) == ("claude-sonnet-4-5", 200, "Be brief.")
        assert p["output_config"]["format"]["schema"]["properties"]["label"]["enum"] == ["a", "b"]
    first = sent[0]["params"]["messages"][0]["content"]
    assert [block["type"] for block in first] == ["image", "text"]  # the image before the text
    assert first[0]["source"]["media_type"] == "image/png"
    assert (
        base64.b64decode(first[0]["source"]["data"]) == (tmp_path / "images" / "red_circle.png").read_bytes()
    )
    assert sent[1]["params"]["messages"][0]["content"][0]["source"]["media_type"] == "image/jpeg"
    assert sent[1]["params"]["messages"][0]["content"][1]["text"] == "And this, «ünïcode»?"  # byte for byte
    assert sent[2]["params"]["messages"][0]["content"] == "Text only\nwith a newline"  # text only: a string
    assert "temperature" not in json.dumps(sent) and "method" not in sent[0]


def test_the_contract_schema_catches_what_the_api_refuses():
    good = {"custom_id": "row-1", "params": {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}]}}  # fmt: skip
    jsonschema.validate(good, SCHEMA)
    for broken in (
        {**good, "custom_id": "has space"},
        {**good, "custom_id": "x" * 65},
        {**good, "custom_id": "row-1\n"},
        {**good, "params": {**good["params"], "temperature": 0.2}},
        {**good, "params": {k: v for k, v in good["params"].items() if k != "max_tokens"}},
        {**good, "params": {**good["params"], "messages": [{"role": "system", "content": "no"}]}},
        {**good, "params": {**good["params"], "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}]}},
    ):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_ids_anthropic_cannot_take_make_their_rows_invalid_with_the_reason(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["id", "prompt"],
                    [["ok_1", "a"], ["has space", "b"], ["x" * 65, "c"], ["ok-2", "d"]])  # fmt: skip
    b = build_jsonl(src, claude(id_column="id"), tmp_path / "b", allowed_roots=None)
    assert [r["custom_id"] for r in lines(b)] == ["ok_1", "ok-2"]
    assert b["invalid"] == 2
    bad = [json.loads(x) for x in Path(b["invalid_path"]).read_text().splitlines()]
    assert all("is not one Anthropic takes" in r["error"] and r["column"] == "id" for r in bad)
    assert "leave id_column empty" in bad[0]["error"]
    res = tmp_path / "results.jsonl"  # Anthropic's result lines join back onto the rows by id
    res.write_text("".join(json.dumps({"custom_id": cid, "result": {"type": "succeeded", "message": {
        "content": [{"type": "text", "text": f"answer {cid}"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2}}}}) + "\n" for cid in ("ok-2", "ok_1")))  # fmt: skip
    merge_results(b["manifest"], [res], tmp_path / "r" / "results.csv", allowed_roots=None)
    out = read_csv(tmp_path / "r" / "results.csv")
    assert [(r["id"], r["response"], r["error"][:9]) for r in out] == [
        ("ok_1", "answer ok_1", ""), ("has space", "", "not sent:"), ("x" * 65, "", "not sent:"),
        ("ok-2", "answer ok-2", ""),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"max_tokens": None}, "Anthropic requires max_tokens"),
        ({"temperature": 0.5}, "takes no temperature"),
        ({"endpoint": "/v1/embeddings"}, "Anthropic batches take messages"),
        ({"extra_body": {"system": "x"}}, "may not set 'system'"),
        ({"extra_body": {"output_config": {}}}, "may not set 'output_config'"),
        ({"provider": "bedrock"}, "must be one of openai, azure_openai, anthropic"),
        ({"extra_body": {"temperature": 0.2}}, "may not set 'temperature' for Anthropic: Anthropic's API"),
        ({"extra_body": {"top_k": 5}}, "may not set 'top_k'"),
        ({"extra_body": {"store": True}}, "not allowed inside an Anthropic batch"),
        ({"extra_body": {"response_format": {}}}, "an OpenAI parameter"),
    ],
)
def test_options_anthropic_refuses_before_anything_is_read(options, says):
    opts = BuildOptions.from_dict({"provider": "anthropic", "model": "claude-x", "max_tokens": 10, **options})
    with pytest.raises(InputError, match=says):
        opts.validate()


def test_images_over_5_mb_are_refused_for_anthropic_whatever_max_image_mb_says():
    assert claude().image_limit_mb == 3.75 and claude(max_image_mb=2).image_limit_mb == 2  # 5 MB of base64
    assert BuildOptions().image_limit_mb == 20.0


def test_the_estimate_is_approximate_and_counts_images_by_anthropics_formula(tmp_path):
    shutil.copytree(REPO / "data" / "sample" / "images", tmp_path / "images")
    rows = [["one", "images/red_circle.png"], ["two", ""], ["one", "images/red_circle.png"]]
    src = write_csv(tmp_path / "in.csv", ["prompt", "image"], rows)
    b = build_jsonl(src, claude(image_column="image"), tmp_path / "b", allowed_roots=None)
    assert b["duplicates"] == 1 and len(lines(b)) == 2  # the repeat is sent once here too
    est = estimate_build(b["manifest"])
    assert est["requests"] == 2 and est["images"] == 1
    assert est["image_tokens"] == anthropic_image_tokens(96, 96) == 13
    assert 0 < est["text_tokens"] < 40 and est["output_tokens_max"] == 400
    assert any("approximate" in note for note in est["notes"])
    assert anthropic_image_tokens(200, 200) == 54 and anthropic_image_tokens(1000, 1000) == 1334
    assert anthropic_image_tokens(1092, 1092) == 1590  # the vision guide's largest square not downscaled
    assert anthropic_image_tokens(4000, 3000) <= 1600  # downscaled first: long edge 1,568, ~1.2 MP


def test_cli_build_for_anthropic(tmp_path, capsys):
    from batchpipe.cli import main

    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])
    argv = [
        "build",
        str(src),
        "--out-dir",
        str(tmp_path / "b"),
        "--provider",
        "anthropic",
        "--model",
        "claude-x",
    ]
    assert main([*argv, "--json"]) == 2  # max_tokens is required
    assert "Anthropic requires max_tokens" in capsys.readouterr().err
    assert main([*argv, "--max-tokens", "50", "--json"]) == 0
    for r in lines(json.loads(capsys.readouterr().out)):
        jsonschema.validate(r, SCHEMA)


def test_images_given_as_data_urls_are_checked_from_their_bytes(tmp_path):
    import io

    from PIL import Image

    def data_url(image, fmt: str, label: str) -> str:
        buf = io.BytesIO()
        image.save(buf, fmt)
        return f"data:{label};base64," + base64.b64encode(buf.getvalue()).decode()

    small = Image.new("RGB", (40, 30), "red")
    rows = [
        ["png said to be jpeg", data_url(small, "PNG", "image/jpeg")],
        ["upper case", data_url(small, "PNG", "image/png").replace("data:", "DATA:", 1)],
        ["too tall", data_url(Image.new("RGB", (10, 9000)), "PNG", "image/png")],
        ["not base64", "data:image/png;base64,@@@@"],
        ["no type said", "data:;base64," + base64.b64encode(b"x").decode()],
        ["a web image", "https://example.com/cat.png"],
    ]
    src = write_csv(tmp_path / "in.csv", ["prompt", "image"], rows)
    b = build_jsonl(src, claude(image_column="image"), tmp_path / "b", allowed_roots=None)
    sent = {r["params"]["messages"][0]["content"][1]["text"]: r for r in lines(b)}
    for r in sent.values():
        jsonschema.validate(r, SCHEMA)
    image = {text: r["params"]["messages"][0]["content"][0]["source"] for text, r in sent.items()}
    assert image["png said to be jpeg"]["media_type"] == "image/png"  # read from the bytes
    assert image["upper case"]["media_type"] == "image/png"
    assert image["a web image"] == {"type": "url", "url": "https://example.com/cat.png"}
    bad = {
        json.loads(x)["row"]: json.loads(x)["error"] for x in Path(b["invalid_path"]).read_text().splitlines()
    }
    assert "Anthropic takes at most 8000 px a side" in bad[2]
    assert set(bad) == {2, 3, 4} and all(r for r in bad.values())


def test_odd_anthropic_result_lines_never_crash():
    from batchpipe.results import TRUNCATED, parse_result_line

    for kind in (["expired"], {"a": 1}, None, 7):
        assert (
            parse_result_line({"custom_id": "row-0", "result": {"type": kind}}, "").error_code
            == "malformed_result"
        )
    line = {
        "custom_id": "row-0",
        "result": {
            "type": "succeeded",
            "message": {
                "content": [{"type": "text", "text": "cut"}],
                "stop_reason": "model_context_window_exceeded",
                "usage": {},
            },
        },
    }
    assert parse_result_line(line, "").error_code == TRUNCATED

"""validate_csv and build_jsonl: fatal errors, row errors, request bodies, sharding."""

import base64
import csv
import json

import pytest
from PIL import Image

from batchpipe import BuildOptions, InputError, build_jsonl, validate_csv
from batchpipe.build import make_body, uses_max_completion_tokens


def write_csv(path, rows, header=None):
    header = header or list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def all_requests(result):
    return [r for s in result["shards"] for r in read_jsonl(s["path"])]


@pytest.fixture
def text_csv(tmp_path):
    rows = [{"id": f"a{i}", "prompt": f"question {i}", "zip": f"{i:03d}"} for i in range(25)]
    return write_csv(tmp_path / "in.csv", rows)


# ------------------------------------------------------------------ fatal errors


def test_missing_prompt_column(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"id": "1", "text": "x"}])
    with pytest.raises(InputError, match=r"in\.csv: column 'prompt' not found \(columns: id, text\)"):
        validate_csv(p, BuildOptions())


def test_missing_image_and_id_column(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"id": "1", "prompt": "x"}])
    with pytest.raises(InputError, match=r"in\.csv: column 'image' not found \(columns: id, prompt\)"):
        validate_csv(p, BuildOptions(image_column="image"))
    with pytest.raises(InputError, match=r"in\.csv: column 'key' not found"):
        build_jsonl(p, BuildOptions(id_column="key"), tmp_path / "w")


def test_unknown_template_placeholder(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"id": "1", "prompt": "x"}])
    with pytest.raises(InputError, match=r"in\.csv: prompt_template placeholder \{city\} is not a column"):
        validate_csv(p, BuildOptions(prompt_template="Weather in {city}?"))


def test_template_unbalanced_brace(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"id": "1", "prompt": "x"}])
    with pytest.raises(InputError, match="unmatched"):
        validate_csv(p, BuildOptions(prompt_template="Hi {prompt"))


def test_no_rows_in_range(tmp_path, text_csv):
    with pytest.raises(
        InputError, match=r"in\.csv: no data rows in range \[30, end\) \(0-based.* 25 data row"
    ):
        validate_csv(text_csv, BuildOptions(start_row=30))
    with pytest.raises(InputError, match=r"25 data row"):
        build_jsonl(text_csv, BuildOptions(start_row=30), tmp_path / "w")
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,prompt\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"h\.csv: no data rows .* 0 data row"):
        validate_csv(header_only, BuildOptions())


def test_start_not_before_end(text_csv):
    with pytest.raises(InputError, match="end_row=3 must be greater than start_row=5"):
        validate_csv(text_csv, BuildOptions(start_row=5, end_row=3))


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"}, {"id": "x", "prompt": "c"}]
    p = write_csv(tmp_path / "in.csv", rows)
    both = r"data row 0 \(0-based; line 2 of the file\) and data row 2 \(0-based; line 4 of the file\)"
    with pytest.raises(InputError, match=r"in\.csv: column 'id': duplicate id 'x' in " + both):
        validate_csv(p, BuildOptions(id_column="id"))
    with pytest.raises(InputError, match=both):
        build_jsonl(p, BuildOptions(id_column="id"), tmp_path / "w")
    # outside the selected range, duplicates do not matter
    assert validate_csv(p, BuildOptions(id_column="id", end_row=2))["valid"] == 2


def test_output_column_clash(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"prompt": "a", "response": "old"}])
    with pytest.raises(InputError, match=r"in\.csv: the input already has column\(s\) 'response'"):
        validate_csv(p, BuildOptions())


def test_unparsable_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('prompt,x\n"a,b\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv: line"):
        validate_csv(p, BuildOptions())


# ------------------------------------------------------------------ row-level problems


def test_row_level_invalids(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    rows = [
        {"id": "r0", "prompt": "fine", "image": ""},
        {"id": "r1", "prompt": "", "image": ""},
        {"id": "r2", "prompt": "   ", "image": ""},
        {"id": "r3", "prompt": "look", "image": "missing.png"},
        {"id": "r4", "prompt": "look", "image": "bad.png"},
        {"id": "r5", "prompt": "look", "image": "ok.png"},
        {"id": "", "prompt": "no id", "image": ""},
    ]
    p = write_csv(tmp_path / "in.csv", rows)
    opts = BuildOptions(image_column="image", id_column="id")
    s = validate_csv(p, opts)
    assert s["rows_in_file"] == 7 and s["rows_selected"] == 7 and s["valid"] == 2 and s["invalid"] == 5
    assert s["columns"] == ["id", "prompt", "image"]
    by_row = {e["row"]: e for e in s["first_invalid"]}
    assert by_row[1] == {"row": 1, "line": 3, "column": "prompt", "error": "empty prompt"}
    assert by_row[3]["column"] == "image" and "not found: missing.png" in by_row[3]["error"]
    assert "unsupported image type" in by_row[4]["error"]
    assert by_row[6] == {"row": 6, "line": 8, "column": "id", "error": "empty id"}
    json.dumps(s)

    out = build_jsonl(p, opts, tmp_path / "w")
    assert (out["rows"], out["valid"], out["invalid"]) == (7, 2, 5)
    assert [r["custom_id"] for r in all_requests(out)] == ["r0", "r5"]
    inv = read_jsonl(tmp_path / "w" / "invalid.jsonl")
    assert [(r["row"], r["custom_id"]) for r in inv] == [
        (1, "r1"),
        (2, "r2"),
        (3, "r3"),
        (4, "r4"),
        (6, "row-6"),
    ]
    assert all(r["error"] for r in inv)


MULTILINE = 'id,prompt,image\nm0,"a question\nover\nthree lines",\nm1,,\n\nm2,ok,\nm1,again,\n'


@pytest.mark.parametrize("image", [False, True])
def test_rows_are_named_by_index_and_physical_line(tmp_path, image):
    """A quoted cell spanning lines and a blank line come first: the line is not row + 2."""
    p = tmp_path / "ml.csv"
    p.write_text(MULTILINE, encoding="utf-8")
    opts = BuildOptions(id_column="id", end_row=3, image_column="image" if image else None)
    s = validate_csv(p, opts, allowed_roots=None)
    assert s["first_invalid"] == [{"row": 1, "line": 5, "column": "prompt", "error": "empty prompt"}]
    out = build_jsonl(p, opts, tmp_path / "w", allowed_roots=None)
    assert out["first_invalid"] == s["first_invalid"]
    (inv,) = read_jsonl(tmp_path / "w" / "invalid.jsonl")
    assert (inv["row"], inv["line"]) == (1, 5)
    dup = r"duplicate id 'm1' in data row 1 \(0-based; line 5 of the file\) and data row 3 \(0-based; line 8 "
    with pytest.raises(InputError, match=dup):
        validate_csv(p, BuildOptions(id_column="id", image_column=opts.image_column), allowed_roots=None)
    with pytest.raises(InputError, match=dup):
        build_jsonl(p, BuildOptions(id_column="id", image_column=opts.image_column), tmp_path / "w2")


def test_zero_valid_rows_gives_no_shards(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"prompt": ""}, {"prompt": ""}])
    out = build_jsonl(p, BuildOptions(), tmp_path / "w")
    assert out["shards"] == [] and out["valid"] == 0 and out["invalid"] == 2
    assert not list((tmp_path / "w").glob("shard-*"))


def test_too_long_id(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"id": "x" * 513, "prompt": "a"}, {"id": "y" * 512, "prompt": "b"}])
    s = validate_csv(p, BuildOptions(id_column="id"))
    assert s["valid"] == 1 and "at most 512" in s["first_invalid"][0]["error"]


# ------------------------------------------------------------------ requests


def test_custom_ids_prompts_byte_for_byte_and_range(tmp_path):
    prompts = ["  spaced  ", "multi\nline\r\nprompt", 'quote " and, comma', "日本語 🚀", "007"]
    p = write_csv(tmp_path / "in.csv", [{"prompt": t} for t in prompts])
    out = build_jsonl(p, BuildOptions(), tmp_path / "w")
    reqs = all_requests(out)
    assert [r["custom_id"] for r in reqs] == [f"row-{i}" for i in range(5)]
    assert [r["body"]["messages"][0]["content"] for r in reqs] == prompts
    raw = (tmp_path / "w" / "shard-00000.jsonl").read_text(encoding="utf-8")
    assert "日本語 🚀" in raw  # not \u-escaped
    out = build_jsonl(p, BuildOptions(start_row=1, end_row=3), tmp_path / "w2")
    assert [r["custom_id"] for r in all_requests(out)] == ["row-1", "row-2"]
    assert out["rows"] == 2


def test_end_row_means_first_n(text_csv, tmp_path):
    out = build_jsonl(text_csv, BuildOptions(end_row=10), tmp_path / "w")
    assert out["rows"] == 10 and all_requests(out)[-1]["custom_id"] == "row-9"


def test_template_rendering(tmp_path):
    rows = [{"city": "Paris", "zip": "007", "day": ""}]
    p = write_csv(tmp_path / "in.csv", rows)
    out = build_jsonl(
        p,
        BuildOptions(
            prompt_template="Weather in {city} ({zip}) on {day}? {{literal}} }}", system_prompt="Be brief."
        ),
        tmp_path / "w",
    )
    body = all_requests(out)[0]["body"]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris (007) on ? {literal} }"},
    ]


def test_chat_body_with_image_and_text_only(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.jpg", "JPEG")
    rows = [{"prompt": "what?", "img": "b.jpg"}, {"prompt": "text only", "img": ""}]
    p = write_csv(tmp_path / "in.csv", rows)
    opts = BuildOptions(
        image_column="img",
        image_detail="low",
        max_tokens=50,
        temperature=0.2,
        extra_body={"seed": 7, "temperature": 0.0},
    )
    reqs = all_requests(build_jsonl(p, opts, tmp_path / "w"))
    assert reqs[0]["method"] == "POST" and reqs[0]["url"] == "/v1/chat/completions"
    content = reqs[0]["body"]["messages"][0]["content"]
    url = "data:image/jpeg;base64," + base64.b64encode((tmp_path / "b.jpg").read_bytes()).decode()
    assert content == [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
    ]
    assert reqs[0]["body"]["max_tokens"] == 50 and reqs[0]["body"]["seed"] == 7
    assert reqs[0]["body"]["temperature"] == 0.0  # extra_body merged last
    assert reqs[1]["body"]["messages"] == [{"role": "user", "content": "text only"}]


@pytest.mark.parametrize(
    "model, key",
    [
        ("gpt-4o", "max_tokens"),
        ("gpt-4.1-mini", "max_tokens"),
        ("o1", "max_completion_tokens"),
        ("o3-mini", "max_completion_tokens"),
        ("o4-mini", "max_completion_tokens"),
        ("gpt-5", "max_completion_tokens"),
        ("gpt-5-nano", "max_completion_tokens"),
    ],
)
def test_max_tokens_key(model, key):
    body = make_body(BuildOptions(model=model, max_tokens=99), "hi", None)
    assert body[key] == 99
    other = {"max_tokens", "max_completion_tokens"} - {key}
    assert not other & set(body)
    assert uses_max_completion_tokens(model) == (key == "max_completion_tokens")


def test_responses_body():
    o = BuildOptions(endpoint="/v1/responses", system_prompt="sys", max_tokens=16, image_detail="high")
    assert make_body(o, "hi", None) == {
        "model": "gpt-4o",
        "input": "hi",
        "instructions": "sys",
        "max_output_tokens": 16,
    }
    b = make_body(o, "look", "https://x/y.png")
    assert b["input"] == [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"},
            ],
        }
    ]


def test_embeddings_body(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"prompt": "embed me"}])
    o = BuildOptions(endpoint="/v1/embeddings", model="text-embedding-3-small", max_tokens=5)
    req = all_requests(build_jsonl(p, o, tmp_path / "w"))[0]
    assert req["url"] == "/v1/embeddings"
    assert req["body"] == {"model": "text-embedding-3-small", "input": "embed me"}


# ------------------------------------------------------------------ sharding


def test_shards_by_count(text_csv, tmp_path):
    out = build_jsonl(text_csv, BuildOptions(id_column="id", max_requests_per_batch=7), tmp_path / "w")
    assert [s["requests"] for s in out["shards"]] == [7, 7, 7, 4]
    assert [(s["first_row"], s["last_row"]) for s in out["shards"]] == [(0, 6), (7, 13), (14, 20), (21, 24)]
    assert [s["index"] for s in out["shards"]] == [0, 1, 2, 3]
    assert out["shards"][3]["path"].endswith("shard-00003.jsonl")
    ids = [r["custom_id"] for r in all_requests(out)]
    assert ids == [f"a{i}" for i in range(25)] and len(set(ids)) == 25
    for s in out["shards"]:
        data = open(s["path"], "rb").read()
        assert len(data) == s["bytes"]
        assert {json.loads(x)["body"]["model"] for x in data.splitlines()} == {"gpt-4o"}
    manifest = json.loads((tmp_path / "w" / "build_manifest.json").read_text())
    assert manifest["options"]["max_requests_per_batch"] == 7 and manifest["shards"] == out["shards"]
    assert manifest["rows"] == 25 and manifest["csv"] == str(text_csv.resolve())
    assert len(json.dumps(out)) < 4000  # small enough for XCom


def test_shards_by_bytes(text_csv, tmp_path):
    one = build_jsonl(text_csv, BuildOptions(end_row=1), tmp_path / "one")["shards"][0]["bytes"]
    limit = one * 3 + 5  # every line has the same length here: 3 lines fit, 4 do not
    out = build_jsonl(text_csv, BuildOptions(end_row=10, max_batch_bytes=limit), tmp_path / "w")
    assert [s["requests"] for s in out["shards"]] == [3, 3, 3, 1]
    assert all(s["bytes"] <= limit for s in out["shards"])


def test_line_bigger_than_limit_is_row_error(tmp_path):
    p = write_csv(tmp_path / "in.csv", [{"prompt": "short"}, {"prompt": "x" * 500}, {"prompt": "ok"}])
    out = build_jsonl(p, BuildOptions(max_batch_bytes=300), tmp_path / "w")
    assert out["valid"] == 2 and out["invalid"] == 1
    assert (
        out["first_invalid"][0]["row"] == 1
        and "larger than max_batch_bytes=300" in out["first_invalid"][0]["error"]
    )


def test_rebuild_removes_stale_shards(text_csv, tmp_path):
    build_jsonl(text_csv, BuildOptions(max_requests_per_batch=5), tmp_path / "w")
    assert len(list((tmp_path / "w").glob("shard-*.jsonl"))) == 5
    out = build_jsonl(text_csv, BuildOptions(), tmp_path / "w")
    assert len(out["shards"]) == 1 and len(list((tmp_path / "w").glob("shard-*"))) == 1


def test_group_shards_keeps_order_and_bounds_the_groups():
    from batchpipe.build import SHARD_GROUPS, group_shards

    assert group_shards([], 64) == []
    assert group_shards([0, 1, 2], 64) == [[0], [1], [2]]  # one shard per group while they fit
    assert group_shards(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    shards = list(range(1_100))
    groups = group_shards(shards)
    assert len(groups) == SHARD_GROUPS == 64
    assert [s for g in groups for s in g] == shards  # every shard once, in order
    assert {len(g) for g in groups} == {17, 18}
    assert group_shards(list(range(5)), 1) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError):
        group_shards([1], 0)

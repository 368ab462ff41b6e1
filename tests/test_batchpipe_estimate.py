"""Offline cost estimates: prices table, overrides, token split, bounds, budget, CLI."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from batchpipe import BuildOptions, InputError, build_jsonl
from batchpipe.cli import main
from batchpipe.estimate import (
    DEFAULT_EXPECTED_OUTPUT_TOKENS,
    estimate_build,
    exceeds_budget,
    load_prices,
    price_for,
    write_estimate,
)
from batchpipe.tokens import (
    UnknownModel,
    request_prompt_tokens,
    request_text_tokens,
    request_token_breakdown,
)

CHAT = "/v1/chat/completions"


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def csv_path(tmp_path):
    Image.new("RGB", (1024, 1024), (10, 200, 30)).save(tmp_path / "square.png")
    rows = [
        {"prompt": "What is the capital of France?", "image": ""},
        {"prompt": "Describe this picture in one sentence.", "image": "square.png"},
        {"prompt": "Name three prime numbers.", "image": ""},
        {"prompt": "", "image": ""},  # invalid: empty prompt
        {"prompt": "Translate 'good morning' into German.", "image": ""},
    ]
    return write_csv(tmp_path / "in.csv", rows)


def opts(**kw):
    base = {"image_column": "image", "image_detail": "high", "model": "gpt-4o", "max_tokens": 50}
    base.update(kw)
    return BuildOptions(**base)


def shard_bodies(build):
    for shard in build["shards"]:
        with open(shard["path"], encoding="utf-8") as fh:
            for raw in fh:
                yield json.loads(raw)["body"]


# --------------------------------------------------------------------------- prices


def test_price_file_has_the_reference_prices():
    prices = load_prices()
    assert prices["currency"] == "USD" and prices["per"] == 1_000_000
    assert prices["batch_discount"] == 0.5
    assert prices["as_of"] and prices["source"]
    assert prices["models"]["gpt-4o"] == {"input": 2.5, "output": 10.0}
    assert prices["models"]["gpt-4o-mini"] == {"input": 0.15, "output": 0.6}
    assert prices["models"]["text-embedding-3-small"]["output"] is None


def test_price_lookup_exact_then_snapshot_suffix():
    prices = load_prices()
    assert price_for(prices, "gpt-4o")["model"] == "gpt-4o"
    assert price_for(prices, "gpt-4o-2024-08-06")["model"] == "gpt-4o"
    assert price_for(prices, "GPT-4.1-mini-2025-04-14")["model"] == "gpt-4.1-mini"
    assert price_for(prices, "gpt-4o-mini")["input"] == 0.15  # not gpt-4o's
    assert price_for(prices, "ft:gpt-4o-mini-2024-07-18:org::abc") is None  # never guessed
    assert price_for(prices, "gpt-99") is None


def test_override_merges_models_and_discount():
    p = load_prices({"models": {"my-model": {"input": 1.0, "output": 3.0}}, "batch_discount": 0.4})
    assert p["models"]["my-model"] == {"input": 1.0, "output": 3.0}
    assert p["models"]["gpt-4o"]["input"] == 2.5  # untouched
    assert p["batch_discount"] == 0.4
    p = load_prices('{"models": {"gpt-4o": {"input": 5}}}')
    assert p["models"]["gpt-4o"] == {"input": 5, "output": 10.0}  # merged per field
    assert load_prices("")["models"]["gpt-4o"]["input"] == 2.5


def test_override_from_file_and_bad_overrides(tmp_path):
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"models": {"x-1": {"input": 0.5, "output": 1}}}))
    assert load_prices(str(f))["models"]["x-1"]["input"] == 0.5
    with pytest.raises(InputError, match="not valid JSON"):
        load_prices("{nope")
    with pytest.raises(InputError, match="unknown key"):
        load_prices({"gpt-4o": {"input": 1}})  # missing the "models" wrapper
    with pytest.raises(InputError, match="input"):
        load_prices({"models": {"m": {"input": "cheap"}}})
    with pytest.raises(InputError, match="batch_discount"):
        load_prices({"batch_discount": 2})
    with pytest.raises(InputError, match="neither"):
        load_prices(str(tmp_path / "missing.json"))


# --------------------------------------------------------------------------- token split


def test_breakdown_sums_to_request_prompt_tokens(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(), tmp_path / "b")
    images = 0
    for body in shard_bodies(build):
        text, image = request_token_breakdown(body, CHAT, "gpt-4o")
        assert text + image == request_prompt_tokens(body, CHAT, "gpt-4o")
        assert text == request_text_tokens(body, CHAT, "gpt-4o")
        if image:
            images += 1
            assert image == 765
    assert images == 1


def test_text_tokens_do_not_need_an_image_rule():
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                ],
            }
        ]
    }
    with pytest.raises(UnknownModel):
        request_token_breakdown(body, CHAT, "mystery-model")
    assert request_text_tokens(body, CHAT, "mystery-model") > 0
    resp = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]}
    assert request_token_breakdown(resp, "/v1/responses", "gpt-4o") == (
        request_prompt_tokens(resp, "/v1/responses", "gpt-4o") - 85,
        85,
    )


# --------------------------------------------------------------------------- estimate


def test_estimate_numbers(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(max_requests_per_batch=2), tmp_path / "b")
    e = estimate_build(build["manifest"])
    prompt = sum(request_prompt_tokens(b, CHAT, "gpt-4o") for b in shard_bodies(build))
    assert (e["model"], e["endpoint"]) == ("gpt-4o", CHAT)
    assert (e["rows"], e["requests"], e["invalid"]) == (5, 4, 1)
    assert e["prompt_tokens"] == prompt
    assert e["image_tokens"] == 765 and e["images"] == 1
    assert e["text_tokens"] == prompt - 765
    # expected output: 200 per request, capped by max_tokens=50; worst case 4 x 50
    assert e["output_tokens_expected"] == 4 * 50
    assert e["output_tokens_max"] == 4 * 50
    batch = round((prompt * 2.5 + 200 * 10.0) / 1e6 * 0.5, 6)
    assert e["cost"]["batch"] == {"expected": batch, "max": batch}
    assert e["cost"]["standard"]["max"] == round((prompt * 2.5 + 200 * 10.0) / 1e6, 6)
    assert e["price"]["model"] == "gpt-4o" and e["price"]["input"] == 2.5
    assert [s["requests"] for s in e["shards"]] == [2, 2]
    assert sum(s["prompt_tokens"] for s in e["shards"]) == prompt
    assert {"index", "requests", "prompt_tokens"} <= set(e["shards"][0])
    json.dumps(e)  # JSON-able
    # the build folder may be given instead of the manifest file
    assert estimate_build(tmp_path / "b") == e


def test_expected_output_tokens_argument(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(max_tokens=1000), tmp_path / "b")
    e = estimate_build(build["manifest"], expected_output_tokens=300)
    assert e["output_tokens_expected"] == 4 * 300
    assert e["output_tokens_max"] == 4 * 1000
    assert e["cost"]["batch"]["expected"] < e["cost"]["batch"]["max"]
    assert estimate_build(build["manifest"])["output_tokens_expected"] == 4 * DEFAULT_EXPECTED_OUTPUT_TOKENS
    with pytest.raises(InputError):
        estimate_build(build["manifest"], expected_output_tokens=-1)


def test_unset_max_tokens_is_unbounded(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(max_tokens=None), tmp_path / "b")
    e = estimate_build(build["manifest"])
    assert e["output_tokens_max"] is None
    assert e["cost"]["batch"]["max"] is None and e["cost"]["standard"]["max"] is None
    assert e["cost"]["batch"]["expected"] > 0
    assert any("max_tokens" in n and "no upper bound" in n for n in e["notes"])


def test_max_tokens_from_extra_body_bounds_the_output(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(max_tokens=None, extra_body={"max_tokens": 7}), tmp_path / "b")
    e = estimate_build(build["manifest"])
    assert e["output_tokens_max"] == 4 * 7
    assert e["output_tokens_expected"] == 4 * 7


def test_unknown_model_has_no_price(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(model="acme-llm-7"), tmp_path / "b")
    e = estimate_build(build["manifest"])
    assert e["price"] is None and e["cost"] is None
    assert any("no price known for model 'acme-llm-7'" in n for n in e["notes"])
    # no image rule either: the image is not counted, and the estimate says so
    assert e["image_tokens"] == 0 and e["images"] == 1
    assert any("1 images not counted" in n for n in e["notes"])
    assert e["text_tokens"] == e["prompt_tokens"] > 0


def test_override_prices_in_estimate(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(model="acme-llm-7", image_column=None), tmp_path / "b")
    prices = load_prices({"models": {"acme-llm-7": {"input": 1.0, "output": 2.0}}, "batch_discount": 0.25})
    e = estimate_build(build["manifest"], prices)
    p = e["prompt_tokens"]
    assert e["cost"]["standard"]["max"] == round((p * 1.0 + 4 * 50 * 2.0) / 1e6, 6)
    assert e["cost"]["batch"]["max"] == round((p * 1.0 + 4 * 50 * 2.0) / 1e6 * 0.75, 6)
    assert e["price"]["batch_discount"] == 0.25


def test_embeddings_have_no_output(tmp_path):
    p = write_csv(tmp_path / "e.csv", [{"prompt": "alpha beta"}, {"prompt": "gamma"}])
    build = build_jsonl(
        p, BuildOptions(endpoint="/v1/embeddings", model="text-embedding-3-small"), tmp_path / "b"
    )
    e = estimate_build(build["manifest"])
    assert e["output_tokens_expected"] == 0 and e["output_tokens_max"] == 0
    assert e["cost"]["batch"]["max"] == round(e["prompt_tokens"] * 0.02 / 1e6 * 0.5, 6)
    assert not any("max_tokens" in n for n in e["notes"])


# --------------------------------------------------------------------------- budget, files


def _fake(batch_max, batch_expected=0.5):
    return {
        "model": "gpt-4o",
        "cost": {
            "batch": {"expected": batch_expected, "max": batch_max},
            "standard": {"expected": 2 * batch_expected, "max": None if batch_max is None else 2 * batch_max},
        },
    }


def test_exceeds_budget():
    assert exceeds_budget(_fake(1.0), 5) is None
    assert exceeds_budget(_fake(1.0), None) is None
    msg = exceeds_budget(_fake(12.5), 10)
    assert "$12.50" in msg and "$10.00" in msg and "worst-case" in msg
    msg = exceeds_budget(_fake(None, batch_expected=3.25), 2)
    assert "$3.25" in msg and "$2.00" in msg and "unbounded" in msg and "max_tokens" in msg
    assert exceeds_budget(_fake(None, batch_expected=1.0), 2) is None
    msg = exceeds_budget({"model": "x", "cost": None}, 1)
    assert "unknown" in msg and "$1.00" in msg


def test_exceeds_budget_small_figures(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(), tmp_path / "b")
    e = estimate_build(build["manifest"])
    worst = e["cost"]["batch"]["max"]
    assert exceeds_budget(e, worst) is None
    msg = exceeds_budget(e, worst / 2)
    assert f"${worst:.6f}".rstrip("0") in msg and f"${worst / 2:.6f}".rstrip("0").rstrip(".") in msg


def test_write_estimate(csv_path, tmp_path):
    build = build_jsonl(csv_path, opts(), tmp_path / "b")
    e = estimate_build(build["manifest"])
    jp, mp = write_estimate(e, tmp_path / "out")
    assert json.loads(jp.read_text()) == e
    md = mp.read_text()
    assert jp.name == "estimate.json" and mp.name == "estimate.md"
    for needle in ("| rows | 5", f"| prompt tokens | {e['prompt_tokens']:,}", "image tokens | 765", "Batch"):
        assert needle in md


# --------------------------------------------------------------------------- CLI


def test_cli_estimate(csv_path, tmp_path, capsys):
    args = [
        "estimate",
        str(csv_path),
        "--image-column",
        "image",
        "--image-detail",
        "high",
        "--max-tokens",
        "50",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prompt tokens" in out and "image tokens | 765" in out

    assert main([*args, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["image_tokens"] == 765 and e["over_budget"] is None

    assert main([*args, "--max-cost-usd", "0.000001"]) == 3
    captured = capsys.readouterr()
    assert "exceeds the budget of $0.000001" in captured.err

    assert main([*args, "--max-cost-usd", "100", "--out-dir", str(tmp_path / "keep")]) == 0
    assert (tmp_path / "keep" / "estimate.json").is_file()
    assert (tmp_path / "keep" / "estimate.md").is_file()
    assert (tmp_path / "keep" / "build_manifest.json").is_file()


def test_cli_estimate_prices_and_errors(csv_path, tmp_path, capsys):
    prices = '{"models": {"acme-1": {"input": 1, "output": 1}}}'
    assert main(["estimate", str(csv_path), "--model", "acme-1", "--prices", prices, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["price"]["model"] == "acme-1" and e["cost"] is not None
    assert main(["estimate", str(csv_path), "--model", "acme-1", "--max-cost-usd", "5"]) == 3
    assert "cost unknown" in capsys.readouterr().err
    assert main(["estimate", str(csv_path), "--prices", "{bad"]) == 2
    assert main(["estimate", str(csv_path), "--prompt-column", "nope"]) == 2

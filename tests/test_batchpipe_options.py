"""BuildOptions defaults, from_dict/to_dict and validation."""

import pytest

from batchpipe import BuildOptions, InputError


def test_defaults_round_trip():
    o = BuildOptions()
    assert o.prompt_column == "prompt" and o.model == "gpt-4o" and o.endpoint == "/v1/chat/completions"
    assert o.max_requests_per_batch == 50_000 and o.max_batch_bytes == 199_000_000 and o.max_image_mb == 20.0
    assert o.start_row == 0 and o.end_row is None
    assert BuildOptions.from_dict(o.to_dict()) == o
    o.validate()


def test_from_dict_ignores_unknown_and_coerces():
    o = BuildOptions.from_dict(
        {
            "model": "gpt-4o-mini",
            "bogus": 1,
            "end_row": "10",
            "max_tokens": "",
            "image_column": "",
            "extra_body": '{"seed": 1}',
            "temperature": "0.5",
        }
    )
    assert o.model == "gpt-4o-mini" and o.end_row == 10 and o.max_tokens is None
    assert o.image_column is None and o.extra_body == {"seed": 1} and o.temperature == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_row": -1}, "start_row"),
        ({"start_row": 5, "end_row": 5}, "end_row=5 must be greater than start_row=5"),
        ({"end_row": 0}, "end_row"),
        ({"endpoint": "/v1/completions"}, "endpoint"),
        ({"image_detail": "medium"}, "image_detail"),
        ({"endpoint": "/v1/embeddings", "image_column": "img"}, "images cannot be sent"),
        ({"max_requests_per_batch": 0}, "max_requests_per_batch"),
        ({"max_requests_per_batch": 50_001}, "max_requests_per_batch"),
        ({"max_batch_bytes": 0}, "max_batch_bytes"),
        ({"max_image_mb": 0}, "max_image_mb"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"extra_body": [1]}, "extra_body"),
        ({"model": ""}, "model"),
    ],
)
def test_validate_rejects(kwargs, match):
    with pytest.raises(InputError, match=match):
        BuildOptions(**kwargs).validate()


def test_bad_extra_body_json():
    with pytest.raises(InputError, match="extra_body"):
        BuildOptions.from_dict({"extra_body": "{nope"})


@pytest.mark.parametrize("key", ["model", "messages", "input", "instructions", "n", "stream"])
def test_extra_body_may_not_replace_what_the_pipeline_owns(key):
    # model: gpt-4o-mini priced and budgeted, gpt-4o sent; messages/input: every row the same prompt
    o = BuildOptions(model="gpt-4o-mini", extra_body={key: "gpt-4o" if key == "model" else 2})
    with pytest.raises(InputError, match=f"extra_body may not set '{key}'"):
        o.validate()
    BuildOptions(extra_body={"seed": 1, "response_format": {"type": "json_object"}}).validate()

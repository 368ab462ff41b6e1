"""Issue 12, items 5 and 6 in the Airflow layer: an ``input_csv`` (or image cell) whose URL scheme has no
filesystem here fails with a message saying what is supported, not a raw ``No filesystem registered``;
the validate task's log names invalid rows by 0-based index and physical line. The task functions are
called as the DAG calls them (no mocks: Airflow's own filesystem registry is asked)."""

from __future__ import annotations

import logging

import pytest

from conftest import local_openai


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    """The local batch server behind ``openai_default``: validate asks it whether the model exists."""
    with local_openai(tmp_path_factory.mktemp("server"), "sk-input-messages-secret") as srv:
        yield srv


@pytest.fixture
def params(tmp_path):
    return {
        "input_csv": str(tmp_path / "in.csv"),
        "output_dir": str(tmp_path / "out"),
        "prompt_column": "prompt",
        "model": "gpt-4o-mini",
    }


@pytest.mark.parametrize("url", ["http://example.com/q.csv", "https://example.com/q.csv", "nosuch://b/q.csv"])
def test_an_input_csv_with_an_unsupported_scheme_fails_validate_clearly(params, url):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.tasks import validate

    params["input_csv"] = url
    with pytest.raises(AirflowFailException) as caught:  # fails at once: a retry cannot fix it
        validate(params, "manual__1")
    message = str(caught.value)
    scheme = url.split(":")[0]
    assert message.startswith(f"input_csv {url}: scheme {scheme} is not supported; use a local path or an "
                              "object-storage URL (s3://"), message  # fmt: skip
    assert "No filesystem registered" not in message and "Unsupported filesystem" not in message
    if scheme.startswith("http"):
        assert "download the file first" in message


def test_location_refuses_a_scheme_without_a_filesystem():
    from openai_batch_airflow import storage

    for url in ("http://h/x", "ftp://h/x", "nosuch://b/x"):
        with pytest.raises(storage.UnsupportedScheme, match=r"scheme \w+ is not supported") as caught:
            storage.location(url)
        assert isinstance(caught.value, ValueError)  # callers that catch ValueError still do
    assert storage.location("s3://bucket/x").path.endswith("x")  # the amazon provider is installed
    with pytest.raises(storage.UnsupportedScheme) as caught:  # a URL of megabytes is quoted shortened
        storage.location("http://h/" + "k" * 100_000)
    assert len(str(caught.value)) < 1000


@pytest.mark.parametrize("cell", ["nosuch://b/a.png", "ftp://h/a.png"])
def test_an_image_cell_with_an_unsupported_scheme_makes_only_its_row_invalid(
    srv, params, tmp_path, cell, caplog
):
    from openai_batch_airflow.config import build_options
    from openai_batch_airflow.tasks import validate

    (tmp_path / "in.csv").write_text(f'id,prompt,image\na,"two\nlines",{cell}\nb,fine,\n', encoding="utf-8")
    params["image_column"] = "image"
    with caplog.at_level(logging.WARNING, logger="openai_batch_airflow.tasks"):
        summary = validate(params, "manual__2")
    assert (summary["valid"], summary["invalid"]) == (1, 1)
    (problem,) = summary["first_invalid"]
    assert problem["row"] == 0 and problem["line"] == 2 and problem["column"] == "image"
    assert f"image {cell}: scheme {cell.split(':')[0]} is not supported" in problem["error"], problem
    assert "data row 0 (0-based; line 2 of the file) [image]: image" in caplog.text, caplog.text
    from batchpipe.build import build_jsonl
    from openai_batch_airflow import storage

    out = build_jsonl(params["input_csv"], build_options(params), tmp_path / "w", allowed_roots=None,
                      url_fs=storage.url_reader(None))  # fmt: skip
    assert out["valid"] == 1 and out["first_invalid"] == summary["first_invalid"]

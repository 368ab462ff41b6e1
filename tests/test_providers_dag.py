"""The pipeline on Azure OpenAI and Anthropic Message Batches: ``dag.test()`` against the local batch server,
which speaks Azure's URLs and ``api-key`` header and Anthropic's ``/v1/messages/batches``, over real HTTP.

The CSV is the hidden pattern of the OpenAI tests: quotes, newlines and unicode in prompts, leading zeros,
an empty cell, images by a relative and an absolute path, a row the build rejects, a row the service
rejects, and a row range."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import REPO

SECRET = "sk-provider-test-secret-4242"
ANTHROPIC_HEADERS = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
SAMPLE_IMAGES = REPO / "data" / "sample" / "images"


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    """The local batch server behind ``azure_openai_default`` (Azure's v1 URL, ``api-key`` header) and
    ``anthropic_default`` (Message Batches), one key for both."""
    from local_batch_server.testing import running_server

    config = {"validating_seconds": 0.2, "in_progress_seconds": 0.5, "finalizing_seconds": 0.2,
              "api_key": SECRET}  # fmt: skip
    with running_server(
        tmp_path_factory.mktemp("server"), config=config, admin_token="admin-token-for-dag-tests"
    ) as srv:
        os.environ["AIRFLOW_CONN_AZURE_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "azure_openai_batch", "host": srv.root_url, "password": SECRET}
        )
        os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(
            {"conn_type": "anthropic", "host": srv.root_url, "password": SECRET}
        )
        try:
            yield srv
        finally:
            os.environ.pop("AIRFLOW_CONN_AZURE_OPENAI_DEFAULT", None)
            os.environ.pop("AIRFLOW_CONN_ANTHROPIC_DEFAULT", None)


@pytest.fixture
def srv(server):
    server.reset()
    return server


def anthropic_batches(srv) -> list[dict]:
    """Every Message Batch the server holds, newest first."""
    r = httpx.get(f"{srv.root_url}/v1/messages/batches", params={"limit": 1000}, headers=ANTHROPIC_HEADERS)
    r.raise_for_status()
    return r.json()["data"]


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def hidden_pattern(folder: Path) -> tuple[Path, list[dict[str, str]]]:
    """The CSV (and its images): rows 1..9 are the run's range (``start_row`` 1, ``end_row`` 10)."""
    images = folder / "images"
    images.mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "red_circle.png", images / "red circle.png")
    outside = folder.parent / f"{folder.name}-abs"
    outside.mkdir()
    shutil.copy(SAMPLE_IMAGES / "green_triangle.jpg", outside / "tri.jpg")
    rows = [
        {"id": "r000", "prompt": "out of range", "image": "", "zip": "1"},
        {"id": "r001", "prompt": "He said \"yes\", then 'no'", "image": "", "zip": "007"},
        {"id": "r002", "prompt": "line one\nline two\r\nline three", "image": "", "zip": ""},
        {"id": "r003", "prompt": "Ünïcödé 日本語 עברית 🚀 café", "image": "", "zip": "00042"},
        {"id": "r004", "prompt": "What shape is this?", "image": "images/red circle.png", "zip": "02139"},
        {"id": "r005", "prompt": "And this one?", "image": str(outside / "tri.jpg"), "zip": "0"},
        {"id": "r006", "prompt": "a missing picture", "image": "images/nope.png", "zip": "1"},
        {"id": "r007", "prompt": "please [[reject]] this", "image": "", "zip": "2"},
        {"id": "r008", "prompt": "", "image": "", "zip": "3"},
        {"id": "r009", "prompt": "  leading and trailing blanks  ", "image": "", "zip": "0001"},
        {"id": "r010", "prompt": "out of range too", "image": "", "zip": "4"},
    ]
    path = folder / "hidden.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "prompt", "image", "zip"])
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run(dag, tmp_path: Path, csv_path: Path, **conf):
    conf = {"input_csv": str(csv_path), "output_dir": str(tmp_path / "out"), "image_column": "image",
            "check_interval": 1, **conf}  # fmt: skip
    dr = dag.test(run_conf=conf)
    tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    found = list((tmp_path / "out").glob("*/*/results.csv"))
    return dr, tis, found


PROVIDER_CONF = {
    "azure_openai": {"provider": "azure_openai", "model": "my-gpt-4o-mini-batch"},
    "anthropic": {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 400},
}


@pytest.mark.parametrize("provider", ["azure_openai", "anthropic"])
def test_hidden_pattern_every_row_once_in_order_right_answer(dag, srv, tmp_path, provider):
    csv_path, rows = hidden_pattern(tmp_path / "in")
    dr, tis, found = run(dag, tmp_path, csv_path, start_row=1, end_row=10, **PROVIDER_CONF[provider])
    states = {k: ti.state for k, ti in tis.items()}
    assert dr.state == "success", states  # rows with errors are results, as on OpenAI
    assert len(found) == 1, found
    got = read_csv(found[0])
    selected = rows[1:10]
    assert [r["id"] for r in got] == [r["id"] for r in selected]  # every row once, in order
    for out, src in zip(got, selected, strict=True):
        assert {k: out[k] for k in src} == src  # the cells as they were: 007 stays 007, empty stays empty
    by_id = {r["id"]: r for r in got}
    for rid in ("r001", "r002", "r003", "r009"):
        src = next(r for r in selected if r["id"] == rid)
        assert by_id[rid]["response"] == "ECHO: " + src["prompt"], rid
        assert by_id[rid]["error"] == "" and int(by_id[rid]["prompt_tokens"]) > 0
    assert (
        by_id["r004"]["response"]
        == "ECHO: What shape is this? [image image/png sha256="
        + sha16(tmp_path / "in" / "images" / "red circle.png")
        + "]"
    )
    tri = sha16(tmp_path / "in-abs" / "tri.jpg")
    assert by_id["r005"]["response"] == f"ECHO: And this one? [image image/jpeg sha256={tri}]"
    assert by_id["r006"]["response"] == "" and "nope.png" in by_id["r006"]["error"]
    assert by_id["r008"]["response"] == "" and "prompt" in by_id["r008"]["error"].lower()
    assert by_id["r007"]["response"] == "" and by_id["r007"]["error"]
    report = json.loads((found[0].parent / "report.json").read_text())
    assert (report["rows"], report["answered"], report["invalid"], report["failed"]) == (9, 6, 2, 1)
    if provider == "anthropic":
        assert "invalid_request_error" in by_id["r007"]["error"]
        assert [b["request_counts"]["succeeded"] for b in anthropic_batches(srv)] == [6]
    else:
        assert "400" in by_id["r007"]["error"]
        assert len(srv.client(api_key=SECRET).batches.list(limit=100).data) == 1
    # the key is in no file the run wrote
    for path in found[0].parent.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_anthropic_batch_expiring_half_done_keeps_the_half_and_resubmits_the_rest(dag, srv, tmp_path):
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    src = tmp_path / "many.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt"])
        writer.writerows([[f"question {i:02d}"] for i in range(10)])
    dr, tis, found = run(dag, tmp_path, src, image_column="", **PROVIDER_CONF["anthropic"])
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    got = read_csv(found[0])
    assert [r["response"] for r in got] == [f"ECHO: question {i:02d}" for i in range(10)]
    assert all(r["error"] == "" for r in got)
    first, followup = reversed(anthropic_batches(srv))  # oldest first
    assert first["request_counts"] == {"processing": 0, "succeeded": 5, "errored": 0, "canceled": 0,
                                       "expired": 5}  # fmt: skip
    # only the five that expired went again: the answered half was kept, not paid for twice
    assert followup["request_counts"]["succeeded"] == 5 and sum(followup["request_counts"].values()) == 5
    report = json.loads((found[0].parent / "report.json").read_text())
    assert report["answered"] == 10 and len(report["batch_ids"]) == 2


def test_anthropic_create_whose_answer_is_lost_is_found_not_made_twice(dag, srv, tmp_path):
    # the service creates the batch, then the answer is lost (a 500 after the work was done)
    srv.set_config({"http_faults": [{"method": "POST", "path": "^/v1/messages/batches$", "status": 500,
                                     "after": True, "times": 1}]})  # fmt: skip
    src = tmp_path / "few.csv"
    src.write_text("prompt\nalpha\nbeta\ngamma\n", encoding="utf-8")
    # max_enqueued_tokens does not apply to Anthropic (no token estimate rides with its batches): ignored
    dr, tis, found = run(
        dag, tmp_path, src, image_column="", max_enqueued_tokens=1, **PROVIDER_CONF["anthropic"]
    )
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert [r["response"] for r in read_csv(found[0])] == ["ECHO: alpha", "ECHO: beta", "ECHO: gamma"]
    assert len(anthropic_batches(srv)) == 1  # found by listing, re-attached: one batch, paid once


def test_anthropic_answers_kept_in_the_cache_are_not_paid_for_again(dag, srv, tmp_path):
    src = tmp_path / "again.csv"
    src.write_text("prompt\nred\ngreen\nblue\n", encoding="utf-8")
    cache = str(tmp_path / "cache")
    conf = {**PROVIDER_CONF["anthropic"], "image_column": "", "cache_dir": cache}
    dr1, _, _ = run(dag, tmp_path / "1", src, **conf)
    dr2, tis2, found2 = run(dag, tmp_path / "2", src, **conf)
    assert dr1.state == dr2.state == "success"
    rows = read_csv(found2[0])
    assert [r["response"] for r in rows] == ["ECHO: red", "ECHO: green", "ECHO: blue"]
    assert {r["answered_from"] for r in rows} == {"cache"}
    assert len(anthropic_batches(srv)) == 1  # the second run sent nothing

"""Object storage: ``input_csv``, ``work_dir`` and ``output_dir`` as ``s3://`` URLs through Airflow's
``ObjectStoragePath``, against a local S3-compatible server (moto, started here on 127.0.0.1), with the
real ``openai`` client against the local batch server. What lands in S3 is read back with boto3."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest

from conftest import REPO, local_openai
from s3_local import client as s3_client
from s3_local import local_s3

SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, airflow_db):
    with local_s3(tmp_path_factory.mktemp("s3")) as (endpoint, bucket):
        client = s3_client(endpoint)
        client.bucket = bucket
        yield client


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    config = {"validating_seconds": 0.2, "in_progress_seconds": 0.4, "finalizing_seconds": 0.2}
    with local_openai(tmp_path_factory.mktemp("server"), "sk-s3-tests", config) as srv:
        yield srv


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Where tasks keep their scratch copies; every test checks nothing is left behind."""
    folder = tmp_path / "scratch"
    monkeypatch.setenv("OPENAI_BATCH_SCRATCH_DIR", str(folder))
    yield folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def get(s3, key: str) -> bytes:
    return s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def run(dag, conf: dict):
    dr = dag.test(run_conf=conf)
    return dr, {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}


def put_text_csv(s3, key: str, n: int, repeat: dict[int, int] | None = None) -> list[list[str]]:
    """``n`` rows; ``repeat``: row -> an earlier row whose prompt it asks again."""
    rows = [[f"q{i:03d}", f"question number {i}", f"{i:03d}", "" if i % 3 else "x"] for i in range(n)]
    for row, earlier in (repeat or {}).items():
        rows[row][1] = rows[earlier][1]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "prompt", "zip", "note"])
    writer.writerows(rows)
    s3.put_object(Bucket=s3.bucket, Key=key, Body=buf.getvalue().encode())
    return rows


# -- the storage helpers ----------------------------------------------------------------------------


def test_storage_helpers_round_trip_through_s3(s3, tmp_path):
    from openai_batch_airflow import storage

    base = storage.location(f"s3://{s3.bucket}/helpers", "s3_test")
    assert storage.is_remote(base) and str(base) == f"s3://s3_test@{s3.bucket}/helpers"
    assert not storage.is_remote("/tmp/x") and not storage.is_remote(f"file://{tmp_path}")
    assert storage.location(f"file://{tmp_path}/a") == tmp_path / "a"

    local = tmp_path / "a.jsonl"
    local.write_bytes(b'{"x": 1}\n' * 1000)
    storage.publish(local, base / "sub" / "a.jsonl")
    assert get(s3, "helpers/sub/a.jsonl") == local.read_bytes()
    # the URL with the connection inside it names the same object
    again = storage.location(f"s3://s3_test@{s3.bucket}/helpers/sub/a.jsonl")
    copy = storage.fetch(again, tmp_path / "copy")
    assert copy.read_bytes() == local.read_bytes() and copy.parent == tmp_path / "copy"
    assert storage.read_text(base / "missing.json") is None
    storage.check_writable(base)
    assert keys(s3, "helpers/") == ["helpers/sub/a.jsonl"]  # the write check leaves nothing


def test_work_clean_up_in_s3_removes_only_what_the_run_wrote(s3, tmp_path):
    from openai_batch_airflow import storage
    from openai_batch_airflow.tasks import remove_work_files

    run = storage.location(f"s3://{s3.bucket}/cleanup/run", "s3_test")  # a work folder = the run folder
    local = tmp_path / "x"
    local.write_text("x")
    mine = ["shard-00000.jsonl", "shard-00000.r1.jsonl", "build_manifest.json", "invalid.jsonl",
            "results/shard-00000.r0.batch_1.output.jsonl"]  # fmt: skip
    theirs = ["results.csv", "report.json", "report.html", "estimate.json", "estimate.md"]
    for name in mine + theirs:
        storage.publish(local, run / name)
    assert remove_work_files(run) == len(mine)
    assert keys(s3, "cleanup/") == sorted(f"cleanup/run/{n}" for n in theirs)
    assert remove_work_files(storage.location(f"s3://{s3.bucket}/cleanup/none", "s3_test")) == 0


# -- whole runs -------------------------------------------------------------------------------------


def test_s3_input_work_and_output_every_row_back_once(dag, srv, s3, scratch, tmp_path, monkeypatch):
    rows = put_text_csv(s3, "inbox/many.csv", 24, repeat={20: 2})  # row 20 asks row 2's question again
    before = {b.id for b in srv.client().batches.list(limit=100).data}
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/inbox/many.csv",
            "output_dir": f"s3://{s3.bucket}/results",
            "work_dir": f"s3://{s3.bucket}/work",
            "storage_conn_id": "s3_test",
            "id_column": "id",
            "max_requests_per_batch": 6,
            "check_interval": 1,
        },
    )
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert sorted(i for (task, i) in tis if task == "wait_for_batch") == [0, 1, 2, 3]
    new = [b for b in srv.client().batches.list(limit=100).data if b.id not in before]
    assert sorted(b.request_counts.total for b in new) == [5, 6, 6, 6]

    landed = keys(s3, "results/")
    (csv_key,) = [k for k in landed if k.endswith("/results.csv")]
    folder = csv_key.rsplit("/", 1)[0]
    assert folder.startswith("results/many/")
    assert landed == [f"{folder}/{n}" for n in ("estimate.json", "estimate.md", "report.html", "report.json",
                                                "results.csv", "results.parquet")]  # fmt: skip
    out = csv_rows(get(s3, csv_key))
    assert [[r["id"], r["prompt"], r["zip"], r["note"]] for r in out] == rows  # 007 stays 007, "" stays ""
    assert all(r["response"] == f"ECHO: {r['prompt']}" and r["error"] == "" for r in out)
    assert [(i, r["answered_from"]) for i, r in enumerate(out) if r["answered_from"] != "batch"] == [
        (20, "row 2")
    ]
    report = json.loads(get(s3, f"{folder}/report.json"))
    assert report["answered"] == 24 and sorted(report["batch_ids"]) == sorted(b.id for b in new)
    assert report["answered_from_rows"] == 1  # sent once: duplicates.jsonl went through S3 to the merge
    url = f"s3://s3_test@{s3.bucket}/{folder}"
    assert (report["results_csv"], report["report"]) == (f"{url}/results.csv", f"{url}/report.json")
    html = get(s3, f"{folder}/report.html").decode()
    # the run's report tab reads the page where it landed, through the run's storage connection
    from openai_batch_airflow.ui import read_report_html

    summary = tis[("merge", -1)].xcom_pull(task_ids="merge", key="batch_report")
    assert summary["report_html"] == f"{url}/report.html" and summary["answered"] == 24
    conf = dict(dr.conf)
    assert read_report_html(conf, dr.run_id, summary) == html
    # a record naming another file, or the same file for another run, is refused
    for elsewhere in (f"{url}/report.json", f"s3://s3_test@{s3.bucket}/inbox/report.html", "/etc/passwd"):
        with pytest.raises(ValueError, match="no report.html"):
            read_report_html(conf, dr.run_id, {**summary, "report_html": elsewhere})
    with pytest.raises(ValueError, match="no report.html"):
        read_report_html(conf, "another_run", summary)
    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOTS", str(tmp_path))  # the bucket is no longer an output root
    with pytest.raises(ValueError, match="outside the allowed roots"):
        read_report_html(conf, dr.run_id, summary)
    assert f"results: {url}/results.csv" in html and "openai-batch-" not in html  # no scratch paths
    assert keys(s3, "work/") == []  # keep_temp_files off: the run's work folder is gone
    # the XCom manifests name S3 locations, never local files
    merged = tis[("merge", -1)].xcom_pull(task_ids="merge")
    assert merged == f"s3://s3_test@{s3.bucket}/{csv_key}"
    groups = tis[("build_jsonl", -1)].xcom_pull(task_ids="build_jsonl")
    shards = [s for g in groups for s in g["shards"]]
    assert len(shards) == 4
    assert all(s["path"].startswith(f"s3://s3_test@{s3.bucket}/work/many/") for s in shards)
    assert not (tmp_path / "out").exists()


def test_s3_answer_cache_an_object_per_answer_and_a_second_run_sends_nothing(dag, srv, s3, scratch):
    rows = put_text_csv(s3, "inbox/again.csv", 9, repeat={8: 1})
    conf = {
        "input_csv": f"s3://{s3.bucket}/inbox/again.csv",
        "output_dir": f"s3://{s3.bucket}/results",
        "work_dir": f"s3://{s3.bucket}/work",
        "cache_dir": f"s3://{s3.bucket}/cache",
        "storage_conn_id": "s3_test",
        "id_column": "id",
        "check_interval": 1,
    }
    before = {b.id for b in srv.client().batches.list(limit=100).data}
    dr, tis = run(dag, conf)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    entries = keys(s3, "cache/")
    assert len(entries) == 8  # one object per distinct request answered
    assert all(k.startswith("cache/answers/") and k.split("/")[3][:2] == k.split("/")[2] for k in entries)
    assert all(json.loads(get(s3, k))["response"]["status_code"] == 200 for k in entries)
    first = [k for k in keys(s3, "results/again/") if k.endswith("/results.csv")]

    dr, tis = run(dag, conf)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert [b for b in srv.client().batches.list(limit=100).data if b.id not in before][1:] == []  # one batch
    (csv_key,) = [k for k in keys(s3, "results/again/") if k.endswith("/results.csv") and k not in first]
    out = csv_rows(get(s3, csv_key))
    assert [r["id"] for r in out] == [r[0] for r in rows]
    assert all(r["response"] == f"ECHO: {r['prompt']}" for r in out)
    assert [r["answered_from"] for r in out] == ["cache"] * 8 + ["row 1"]
    assert keys(s3, "cache/") == entries and keys(s3, "work/") == []


def test_s3_keep_temp_files_leaves_shards_and_downloads_in_the_work_folder(dag, srv, s3, scratch):
    put_text_csv(s3, "keep/k.csv", 5)
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://s3_test@{s3.bucket}/keep/k.csv",  # the connection inside the URL
            "output_dir": f"s3://s3_test@{s3.bucket}/keep-out",
            "max_requests_per_batch": 3,
            "check_interval": 1,
            "keep_temp_files": True,
        },
    )
    assert dr.state == "success"
    work = [k.rsplit("/", 1)[1] for k in keys(s3, "keep-out/") if "/work/" in k]
    batch_of = {int(b.metadata["shard"]): b.id for b in srv.client().batches.list().data}
    assert sorted(work) == [
        "build_manifest.json",
        "invalid.jsonl",
        "shard-00000.jsonl",
        f"shard-00000.r0.{batch_of[0]}.output.jsonl",
        "shard-00001.jsonl",
        f"shard-00001.r0.{batch_of[1]}.output.jsonl",
    ]


def put_sample(s3, prefix: str) -> None:
    """The sample CSV and its images folder under ``prefix`` in the bucket."""
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            s3.put_object(
                Bucket=s3.bucket, Key=f"{prefix}/{path.relative_to(SAMPLE)}", Body=path.read_bytes()
            )


def sample_results(s3, prefix: str) -> tuple[list[dict[str, str]], dict]:
    (csv_key,) = [k for k in keys(s3, prefix) if k.endswith("results.csv")]
    out = csv_rows(get(s3, csv_key))
    with open(SAMPLE / "questions.csv", newline="", encoding="utf-8") as fh:
        assert [r["id"] for r in out] == [r["id"] for r in csv.DictReader(fh)]  # every row once, in order
    return out, json.loads(get(s3, csv_key.replace("results.csv", "report.json")))


def test_s3_images_beside_the_csv_and_resubmission_after_expiry(dag, srv, s3, scratch):
    """CSV and images in S3 (relative image paths resolve in the CSV's S3 folder); the first batch
    expires half done and the rest goes out again from the shard stored in S3."""
    put_sample(s3, "img")
    srv.set_config({"expire_fraction": 0.5, "expire_batches": 1})
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/img/questions.csv",
            "image_column": "image",
            "output_dir": f"s3://{s3.bucket}/img-out",
            "storage_conn_id": "s3_test",
            "check_interval": 1,
        },
    )
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    made = list(reversed(srv.client().batches.list(limit=100).data))
    assert [b.status for b in made] == ["expired", "completed"]
    out, report = sample_results(s3, "img-out/")
    assert report["answered"] == 27 and report["failed"] == 1 and report["invalid"] == 2
    assert sorted(report["batch_ids"]) == sorted(b.id for b in made)
    circle = next(r for r in out if r["image"] == "images/red_circle.png")
    assert circle["response"].startswith("ECHO:") and circle["error"] == ""
    # the sample's missing image is reported with the cell as written
    assert any(r["error"].startswith("not sent: image file not found: images/") for r in out)


def test_s3_csv_with_a_local_image_folder(dag, srv, s3, scratch, tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "in")
    s3.put_object(Bucket=s3.bucket, Key="loc/questions.csv", Body=(SAMPLE / "questions.csv").read_bytes())
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/loc/questions.csv",
            "image_column": "image",
            "image_base_dir": str(tmp_path / "in"),
            "output_dir": f"s3://{s3.bucket}/loc-out",
            "storage_conn_id": "s3_test",
            "check_interval": 1,
        },
    )
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    out, report = sample_results(s3, "loc-out/")
    assert report["answered"] == 27 and report["invalid"] == 2
    circle = next(r for r in out if r["image"] == "images/red_circle.png")
    assert circle["response"].startswith("ECHO:") and circle["error"] == ""


# -- failures before any money is spent -------------------------------------------------------------


def test_missing_bucket_fails_validate_before_any_upload(dag, srv, s3, scratch, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("prompt\nhello\n")
    dr, tis = run(
        dag,
        {
            "input_csv": str(src),
            "output_dir": "s3://no-such-bucket/results",
            "storage_conn_id": "s3_test",
        },
    )
    assert dr.state == "failed"
    assert tis[("validate_csv", -1)].state == "failed" and tis[("validate_csv", -1)].try_number == 1
    assert srv.client().files.list().data == []


def test_missing_input_object_names_the_url(dag, srv, s3, scratch, capfd):
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/nowhere/x.csv",
            "output_dir": f"s3://{s3.bucket}/x-out",
            "storage_conn_id": "s3_test",
        },
    )
    assert dr.state == "failed" and tis[("validate_csv", -1)].try_number == 1
    assert f"s3://{s3.bucket}/nowhere/x.csv: input CSV not found" in "".join(capfd.readouterr())


def test_output_url_outside_the_output_roots_fails_before_upload(dag, srv, s3, scratch, monkeypatch, capfd):
    put_text_csv(s3, "roots/r.csv", 2)
    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOTS", f"s3://{s3.bucket}/allowed")
    monkeypatch.setenv("OPENAI_BATCH_ALLOWED_ROOTS", f"s3://{s3.bucket}/roots")
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/roots/r.csv",
            "output_dir": f"s3://{s3.bucket}/elsewhere",
            "storage_conn_id": "s3_test",
        },
    )
    assert dr.state == "failed" and tis[("validate_csv", -1)].state == "failed"
    logged = "".join(capfd.readouterr())
    assert f"is outside the allowed roots (OPENAI_BATCH_OUTPUT_ROOTS: s3://{s3.bucket}/allowed)" in logged
    assert keys(s3, "elsewhere/") == [] and srv.client().files.list().data == []


def test_s3_estimate_only_lands_the_estimate_and_sends_nothing(dag, srv, s3, scratch):
    put_text_csv(s3, "est/e.csv", 4)
    dr, tis = run(
        dag,
        {
            "input_csv": f"s3://{s3.bucket}/est/e.csv",
            "output_dir": f"s3://{s3.bucket}/est-out",
            "storage_conn_id": "s3_test",
            "estimate_only": True,
        },
    )
    assert dr.state == "success"
    assert tis[("merge", -1)].state == "skipped"
    landed = [k.rsplit("/", 1)[1] for k in keys(s3, "est-out/")]
    assert landed == ["estimate.json", "estimate.md"]  # no work folder left behind
    (key,) = [k for k in keys(s3, "est-out/") if k.endswith("estimate.json")]
    assert json.loads(get(s3, key))["requests"] == 4
    assert srv.client().files.list().data == [] and srv.client().batches.list().data == []


def test_location_rules(s3, tmp_path):
    from openai_batch_airflow import storage

    def _input_stem(params):
        return storage.input_stem(params["input_csv"])

    # an explicit connection replaces one named in the URL
    assert storage.location(f"s3://other@{s3.bucket}/x", "s3_test").conn_id == "s3_test"
    assert storage.location(f"s3://s3_test@{s3.bucket}/x").conn_id == "s3_test"
    for bad in (f"s3://{s3.bucket}/x#y", f"s3://key:secret@{s3.bucket}/x"):
        with pytest.raises(ValueError) as caught:
            storage.location(bad, "s3_test")
        assert "secret" not in str(caught.value)
    # local run folders keep the input's own name; URLs are made filesystem-safe, and unique: a name that
    # had to change gets a short hash of the original, so "my prompts" and "my_prompts" never meet
    assert _input_stem({"input_csv": "/data/my prompts.csv"}) == "my prompts"
    assert _input_stem({"input_csv": "s3://b/in/my_prompts.csv"}) == "my_prompts"
    spaced = _input_stem({"input_csv": "s3://b/in/my prompts.csv"})
    assert spaced.startswith("my_prompts-") and len(spaced) == len("my_prompts-") + 8


def test_file_url_input_and_a_password_in_the_output_url(dag, srv, s3, scratch, tmp_path, capfd):
    src = tmp_path / "in.csv"
    src.write_text("prompt,n\nhello,007\n")
    dr, _ = run(dag, {"input_csv": f"file://{src}", "output_dir": str(tmp_path / "out"), "check_interval": 1})
    assert dr.state == "success"
    (results,) = (tmp_path / "out" / "in").glob("*/results.csv")
    assert [(r["n"], r["response"]) for r in csv_rows(results.read_bytes())] == [("007", "ECHO: hello")]

    dr, tis = run(dag, {"input_csv": str(src), "output_dir": f"s3://AKIAX:s3cr3t@{s3.bucket}/out"})
    assert dr.state == "failed" and tis[("validate_csv", -1)].try_number == 1
    logged = "".join(capfd.readouterr())
    assert "must not carry credentials" in logged and "s3cr3t" not in logged


# -- the inbox in S3 --------------------------------------------------------------------------------


def test_s3_inbox_claims_each_csv_once_and_its_run_reads_it_from_s3(dag, srv, s3, scratch):
    """The inbox DAG's claim step on s3://: exclusive marker objects instead of a rename; the conf it
    hands the pipeline names S3 locations, and that run lands its results in S3. A bad sidecar fails
    only its own file (issue 11 item 3), a sidecar without its CSV is moved aside (item 16)."""
    from batchpipe.inbox import settle_objects
    from openai_batch_airflow import inbox as ib
    from openai_batch_airflow import storage

    put_text_csv(s3, "drop/alpha.csv", 3)
    put_text_csv(s3, "drop/beta.csv", 2)
    put_text_csv(s3, "drop/bad.csv", 2)
    s3.put_object(Bucket=s3.bucket, Key="drop/beta.json", Body=b'{"id_column": "id"}')
    s3.put_object(Bucket=s3.bucket, Key="drop/bad.json", Body=b'{"modle": "x"}')
    s3.put_object(Bucket=s3.bucket, Key="drop/late.json", Body=b'{"model": "x"}')  # its CSV: long gone
    params = {
        "inbox": f"s3://{s3.bucket}/drop",
        "defaults": {"storage_conn_id": "s3_test", "output_dir": f"s3://{s3.bucket}/inbox-out",
                     "check_interval": 1},
        "min_age_seconds": 0,
        "stable_seconds": 0.2,
    }  # fmt: skip
    claimed = ib.claim(params, "scheduled__2026-11-30T02:00:00+00:00", set(ib.PIPELINE_PARAMS))
    work = claimed["work"]
    assert [w["claimed"]["name"] for w in work] == ["alpha.csv", "beta.csv"]
    claim = claimed["claim"]
    assert claim.startswith("scheduled__2026-11-30T02_00_00_00_00-")  # the run id, safe, + a short hash
    assert [(f["name"], f["where"]) for f in claimed["failed"]] == [
        ("bad.csv", f"s3://s3_test@{s3.bucket}/drop/failed/{claim}/bad.csv"),
        ("late.json", f"s3://s3_test@{s3.bucket}/drop/failed/{claim}/late.json"),
    ]
    assert "unknown settings modle" in claimed["failed"][0]["error"]
    assert keys(s3, "drop/") == [
        f"drop/failed/{claim}/bad.csv",
        f"drop/failed/{claim}/bad.csv.error.txt",
        f"drop/failed/{claim}/bad.json",
        f"drop/failed/{claim}/late.json",
        f"drop/failed/{claim}/late.json.error.txt",
        f"drop/processing/{claim}/alpha.csv",
        f"drop/processing/{claim}/beta.csv",
        f"drop/processing/{claim}/beta.json",
    ]  # originals and claim markers gone
    beta = work[1]["conf"]
    assert beta["input_csv"] == f"s3://s3_test@{s3.bucket}/drop/processing/{claim}/beta.csv"
    assert beta["image_base_dir"] == f"s3://s3_test@{s3.bucket}/drop" and beta["id_column"] == "id"
    assert ib.claim(params, "scheduled__later", set(ib.PIPELINE_PARAMS))["work"] == []  # nothing twice

    dr, _ = run(dag, beta)
    assert dr.state == "success"
    (csv_key,) = [k for k in keys(s3, "inbox-out/") if k.endswith("results.csv")]
    assert [r["id"] for r in csv_rows(get(s3, csv_key))] == ["q000", "q001"]

    store = storage.location(params["inbox"], "s3_test")
    rel = ib._relative(store, work[1]["claimed"])  # what the settle task does with a claimed item
    assert rel == {
        "name": "beta.csv",
        "csv": f"processing/{claim}/beta.csv",
        "sidecar": f"processing/{claim}/beta.json",
        "error": None,
    }
    assert settle_objects(store.fs, rel, store.path, claim, "done") == f"done/{claim}/beta.csv"
    assert f"drop/done/{claim}/beta.json" in keys(s3, "drop/")


def test_s3_inbox_leaves_an_object_being_replaced_and_refuses_a_done_object(s3):
    """Issue 11 items 18 and 17 on S3: an object rewritten between the two looks (its ETag changes)
    waits for the next run; an object named ``done`` fails the claim before anything moves."""
    import threading

    from openai_batch_airflow import inbox as ib

    params = {"inbox": f"s3://{s3.bucket}/busy", "defaults": {"storage_conn_id": "s3_test"},
              "min_age_seconds": 0, "stable_seconds": 0.5}  # fmt: skip
    put_text_csv(s3, "busy/steady.csv", 2)
    stop = threading.Event()

    def rewrite():
        n = 1
        while not stop.is_set():
            put_text_csv(s3, "busy/growing.csv", n)
            n += 1
            stop.wait(0.05)

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        claimed = ib.claim(params, "manual__busy", set(ib.PIPELINE_PARAMS))
    finally:
        stop.set()
        thread.join()
    assert [w["claimed"]["name"] for w in claimed["work"]] == ["steady.csv"]
    assert "busy/growing.csv" in keys(s3, "busy/")
    (later,) = ib.claim(params, "manual__later", set(ib.PIPELINE_PARAMS))["work"]
    assert later["claimed"]["name"] == "growing.csv"

    put_text_csv(s3, "busy/new.csv", 2)
    s3.put_object(Bucket=s3.bucket, Key="busy/done", Body=b"oops")
    with pytest.raises(Exception, match="busy/done: a file named 'done' is in the way"):
        ib.claim(params, "manual__refused", set(ib.PIPELINE_PARAMS))
    assert "busy/new.csv" in keys(s3, "busy/")

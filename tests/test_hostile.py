"""Hostile inputs and a lying service (issue 11): nothing lost, nothing on the wrong row. Whole runs with
``dag.test()`` against the local batch server, plus the Airflow-layer helpers they rely on."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, local_openai

SECRET = "sk-hostile-tests-secret-51f0"


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    with local_openai(tmp_path_factory.mktemp("server"), SECRET) as srv:
        yield srv


@pytest.fixture
def sample(tmp_path) -> Path:
    shutil.copytree(REPO / "data" / "sample", tmp_path / "in")
    return tmp_path / "in" / "questions.csv"


def run(dag, tmp_path, csv_path, **conf):
    conf = {
        "input_csv": str(csv_path),
        "output_dir": str(tmp_path / "out"),
        "image_column": "image",
        "check_interval": 1,
        **conf,
    }
    dr = dag.test(run_conf=conf)
    tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    return dr, {key: ti.state for key, ti in tis.items()}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- run folders ----------------------------------------------------------------------------------
def test_run_ids_that_differ_only_in_punctuation_get_their_own_folders(tmp_path):
    from openai_batch_airflow.tasks import run_dir, work_location

    params = {"input_csv": str(tmp_path / "q.csv"), "output_dir": str(tmp_path / "out")}
    ids = ["batch:1", "batch+1", "batch_1", "nightly.", "nightly", "manual__2026-11-30T05:00:00+00:00"]
    folders = [run_dir(params, i) for i in ids]
    assert len(set(folders)) == len(ids), folders
    assert run_dir(params, "nightly") == tmp_path / "out" / "q" / "nightly"  # safe ids stay readable
    works = [work_location({**params, "work_dir": str(tmp_path / "w")}, i) for i in ids]
    assert len(set(works)) == len(ids)


@pytest.mark.parametrize("name", ["...csv", "..csv", ".csv"])
def test_an_input_named_dots_never_writes_outside_the_output_folder(tmp_path, name):
    from openai_batch_airflow.tasks import run_dir, work_location

    out = tmp_path / "out"
    params = {"input_csv": str(tmp_path / "in" / name), "output_dir": str(out)}
    for where in (run_dir(params, "r"), work_location({**params, "work_dir": str(tmp_path / "w")}, "r")):
        resolved = Path(where).resolve()
        assert resolved.parent.parent in (out.resolve(), (tmp_path / "w").resolve()), where
        assert resolved.parent.name not in ("", ".", "..")


def test_work_clean_up_removes_only_what_the_run_wrote(tmp_path):
    from openai_batch_airflow.tasks import remove_work_files

    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    mine = ["shard-00000.jsonl", "shard-00001.r1.jsonl", "invalid.jsonl", "build_manifest.json",
            "results/shard-00000.r0.b.output.jsonl", "results/shard-00000.r0.b.error.jsonl"]  # fmt: skip
    theirs = ["results.csv", "report.json", "report.html", "estimate.json", "estimate.md", "notes.txt",
              "results/keep.csv", "my-shard-00000.jsonl"]  # fmt: skip
    for name in mine + theirs:
        (run / name).write_text("x")
    assert remove_work_files(run) == len(mine)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(theirs)
    # a work folder holding nothing else goes away entirely
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "shard-00000.jsonl").write_text("x")
    (work / "results" / "shard-00000.r0.b.output.jsonl").write_text("x")
    remove_work_files(work)
    assert not work.exists()


def test_work_dir_equal_to_output_dir_keeps_the_results(dag, server, tmp_path, sample):
    server.reset()
    out = tmp_path / "out"
    dr, states = run(dag, tmp_path, sample, work_dir=str(out), max_requests_per_batch=10)
    assert dr.state == "success", states
    (folder,) = (out / "questions").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["estimate.json", "estimate.md", "report.html", "report.json", "results.csv"], names
    rows = read_rows(folder / "results.csv")
    assert len(rows) == 30 and sum(1 for r in rows if r["response"]) == 27
    assert json.loads((folder / "report.json").read_text())["answered"] == 27


def test_extra_body_cannot_send_another_model_than_the_one_priced(dag, server, tmp_path, sample):
    server.reset()
    conf = {"model": "gpt-4o-mini", "extra_body": {"model": "gpt-4o"}, "max_cost_usd": 1}
    dr, states = run(dag, tmp_path, sample, **conf)
    assert dr.state == "failed" and states[("validate_csv", -1)] == "failed", states
    assert server.client().files.list().data == []  # nothing uploaded, nothing billed

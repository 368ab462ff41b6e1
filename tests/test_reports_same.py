"""``batchpipe merge`` and the DAG finish report.json / report.html with one library function
(:func:`batchpipe.report.finish_report`): the same files give the same report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from batchpipe.cli import main
from conftest import REPO, local_openai

#: The only fields that differ: where the files were written (each names its own results.csv and
#: report.json; the CLI wrote elsewhere on purpose, so that both reports can be compared).
PATH_FIELDS = ("results_csv", "results_parquet", "report")


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    with local_openai(tmp_path_factory.mktemp("server"), "sk-reports-same") as srv:
        yield srv


def _result_order(path: Path) -> tuple[int, int, int]:
    """As the DAG merges them: by shard, then round, output before error."""
    m = re.fullmatch(r"shard-(\d+)\.r(\d+)\.[^.]+\.(output|error)\.jsonl", path.name)
    assert m, path.name
    return int(m[1]), int(m[2]), m[3] == "error"


def test_batchpipe_merge_writes_the_report_the_dag_wrote(dag, server, tmp_path, capsys):
    shutil.copytree(REPO / "data" / "sample", tmp_path / "in")
    dr = dag.test(
        run_conf={
            "input_csv": str(tmp_path / "in" / "questions.csv"),
            "output_dir": str(tmp_path / "out"),
            "image_column": "image",
            "check_interval": 1,
            "max_tokens": 100,
            "max_requests_per_batch": 15,
            "keep_temp_files": True,
        }
    )
    assert dr.state == "success", {ti.task_id: ti.state for ti in dr.get_task_instances()}
    (folder,) = (tmp_path / "out" / "questions").iterdir()
    dag_report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert len(dag_report["batches"]) == 2 and dag_report["cost_usd"]["actual_batch"] > 0
    files = sorted((folder / "work" / "results").glob("*.jsonl"), key=_result_order)
    assert len(files) == 3  # two outputs, one error file (the rejected row)

    out = tmp_path / "cli" / "results.csv"
    capsys.readouterr()
    code = main(
        ["merge", "--build-dir", str(folder / "work"), *map(str, files), "--out", str(out)]
        + ["--estimate", str(folder / "estimate.json"), "--batches", str(folder / "report.json")]
    )
    assert code == 0, capsys.readouterr().err
    cli_report = json.loads(out.with_name("report.json").read_text(encoding="utf-8"))
    assert json.loads(capsys.readouterr().out) == cli_report  # what it prints is what it wrote

    assert {k: v for k, v in cli_report.items() if k not in PATH_FIELDS} == {
        k: v for k, v in dag_report.items() if k not in PATH_FIELDS
    }
    assert (dag_report["results_csv"], dag_report["report"]) == (
        str(folder / "results.csv"),
        str(folder / "report.json"),
    )
    assert (cli_report["results_csv"], cli_report["report"]) == (
        str(out.resolve()),
        str(out.with_name("report.json").resolve()),
    )
    assert out.read_bytes() == (folder / "results.csv").read_bytes()
    assert dag_report["results_parquet"] == str(folder / "results.parquet")
    assert cli_report["results_parquet"] == str(out.with_suffix(".parquet").resolve())
    import pyarrow.parquet as pq

    assert pq.read_table(out.with_suffix(".parquet")).equals(pq.read_table(folder / "results.parquet"))
    # the page too: the same but for where results.csv is
    dag_page = (folder / "report.html").read_text(encoding="utf-8")
    cli_page = out.with_name("report.html").read_text(encoding="utf-8")
    assert str(folder / "results.csv") in dag_page and str(out.resolve()) in cli_page
    assert cli_page.replace(str(out.resolve()), "RESULTS") == dag_page.replace(
        str(folder / "results.csv"), "RESULTS"
    )

"""What a run tells its user (issue 12): the final batch status said once, the results path as the merge's
last word, an unknown batch status never polled in silence. Whole runs with ``dag.test()`` against the
local batch server."""

from __future__ import annotations

import re

SECRET = "sk-run-messages-secret"


def run(dag, tmp_path, csv_path, **conf):
    conf = {"input_csv": str(csv_path), "output_dir": str(tmp_path / "out"), "image_column": "image",
            "check_interval": 1, **conf}  # fmt: skip
    return dag.test(run_conf=conf)


def test_the_final_status_is_said_once_and_the_results_path_last(dag, srv, tmp_path, sample, capfd, caplog):
    caplog.set_level("INFO")
    dr = run(dag, tmp_path, sample)
    assert dr.state == "success"
    logged = "".join(capfd.readouterr())  # the trigger's and the sensor's lines
    (batch_id,) = set(re.findall(r"batch (batch_\w+): status=completed", logged))
    assert logged.count(f"batch {batch_id}: status=completed") == 1, logged
    (results,) = (tmp_path / "out" / "questions").glob("*/results.csv")
    merge_said = [r.getMessage() for r in caplog.records if r.name == "openai_batch_airflow.tasks"]
    assert merge_said[-1] == f"results.csv: {results}"

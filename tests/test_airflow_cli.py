"""`airflow dags test` from a shell, with nothing but the documented environment (issue #2, must show 2)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from local_batch_server.testing import running_server

pytestmark = pytest.mark.slow
SECRET = "sk-cli-test-do-not-log-7f3a"


def test_airflow_dags_test_cli_with_only_the_documented_environment(tmp_path):
    data = tmp_path / "in"
    shutil.copytree(REPO / "data" / "sample", data)
    bin_dir = Path(sys.executable).parent
    with running_server(tmp_path / "server") as server:
        env = {
            "HOME": str(tmp_path / "home"),  # AIRFLOW_HOME defaults to ~/airflow
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "AIRFLOW__CORE__DAGS_FOLDER": "dags",
            "AIRFLOW__CORE__PLUGINS_FOLDER": "plugins",
            "PYTHONPATH": str(REPO),
        }
        subprocess.run(["airflow", "db", "migrate"], cwd=REPO, env=env, check=True, capture_output=True)
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai", "host": server.base_url, "password": SECRET}
        )
        conf = {
            "input_csv": str(data / "questions.csv"),
            "output_dir": str(tmp_path / "out"),
            "prompt_column": "prompt",
            "image_column": "image",
            "check_interval": 1,
            "max_requests_per_batch": 10,
        }
        proc = subprocess.run(
            ["airflow", "dags", "test", "openai_batch_pipeline", "-c", json.dumps(conf)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-5000:]
        assert "state=success" in output
        assert SECRET not in output
        batches = server.client().batches.list(limit=20).data
        assert len(batches) == 3  # 28 sendable rows, 10 per batch

    (results,) = (tmp_path / "out" / "questions").glob("*/results.csv")
    with open(results, newline="", encoding="utf-8") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 30
    assert rows["q002"]["zip"] == "007" and rows["q002"]["response"] == "ECHO: Name three primary colours."
    assert rows["q014"]["response"] == "" and "HTTP 400" in rows["q014"]["error"]
    assert SECRET not in results.read_text() + (results.parent / "report.json").read_text()

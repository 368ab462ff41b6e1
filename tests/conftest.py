"""Test set-up: a private AIRFLOW_HOME (SQLite) for the whole session, set before Airflow is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # airflow_stack, shared with `make demo`; s3_local, with the bench
_HOME = Path(tempfile.mkdtemp(prefix="obp-airflow-home-"))

# Airflow reads its configuration from the environment at import time: set it all here.
os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # the DAG's retry delay, short so tests of task retries do not wait 30 s
        "OPENAI_BATCH_RETRY_DELAY_SECONDS": "1",
    }
)
# A developer's real key must never be used by the tests.
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)
for _var in (
    "OPENAI_BATCH_ALLOWED_ROOTS",
    "OPENAI_BATCH_OUTPUT_ROOTS",
    "OPENAI_BATCH_OUTPUT_DIR",
    "OPENAI_BATCH_CACHE_DIR",
):
    os.environ.pop(_var, None)

_db_ready = False


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the session's SQLite metadata DB once (only tests that run Airflow ask for it)."""
    global _db_ready
    if not _db_ready:
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
        )
        _db_ready = True
    return _HOME


@contextmanager
def local_openai(tmp_dir: Path, password: str, config: dict | None = None):
    """The local batch server, with the ``openai_default`` connection pointing at it for dag.test()."""
    from local_batch_server.testing import running_server

    with running_server(tmp_dir, config=config) as srv:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai", "host": srv.base_url, "password": password}
        )
        try:
            yield srv
        finally:
            os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)


@pytest.fixture
def srv(server):
    """The module's ``server`` (the local batch server; each module starts its own), reset, with short
    batch phases. A module may define its own ``srv`` instead."""
    server.reset()
    server.set_config({"validating_seconds": 0.2, "in_progress_seconds": 0.4, "finalizing_seconds": 0.2})
    return server


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, airflow_db):
    """The local batch server for one test module, with the ``openai_default`` connection pointing at it;
    its key is the module's ``SECRET`` (so a module can prove that very key never leaks). A module that
    needs another set-up defines its own ``server``."""
    secret = getattr(request.module, "SECRET", "sk-local-test-secret")
    with local_openai(tmp_path_factory.mktemp("server"), secret) as srv:
        yield srv


def run_pipeline(dag, tmp_path: Path, csv_path: Path, **conf) -> tuple:
    """``dag.test()`` of the pipeline on ``csv_path`` (images in column ``image``, results under
    ``tmp_path/out``, polled every second), ``conf`` over that. Returns the run and its task instances by
    ``(task_id, map_index)``."""
    conf = {"input_csv": str(csv_path), "output_dir": str(tmp_path / "out"), "image_column": "image",
            "check_interval": 1, **conf}  # fmt: skip
    dr = dag.test(run_conf=conf)
    return dr, {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}


@pytest.fixture
def sample(tmp_path) -> Path:
    """A copy of the demo sample (``data/sample``: 30 rows, images, 2 invalid rows, 1 the server rejects);
    returns its ``questions.csv``."""
    shutil.copytree(REPO / "data" / "sample", tmp_path / "in")
    return tmp_path / "in" / "questions.csv"


@pytest.fixture
def dag():
    """A fresh ``openai_batch_pipeline`` per test: dag.test() leaves a run's conf in the DAG's params."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["openai_batch_pipeline"]


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    """The local batch server alone, for one test module: no Airflow DB, no default connection (tests of
    the hook, the trigger and the operator name their own with :func:`connection`)."""
    from local_batch_server.testing import running_server

    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


def connection(monkeypatch, server, conn_id: str, password: str) -> str:
    """An ``openai`` connection ``conn_id`` to ``server`` (an environment variable for this test)."""
    conn = {"conn_type": "openai", "host": server.base_url, "password": password}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


class StateStore:
    """An in-memory task_state_store (get / set, values through JSON), kept across "tries" like Airflow's."""

    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value):
        self.data[key] = json.loads(json.dumps(value))

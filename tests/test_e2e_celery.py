"""The whole pipeline on the distributed topology, as processes on loopback: Airflow on its own
PostgreSQL database, the CeleryExecutor with a Redis broker, two Celery workers, and scheduler,
dag-processor, triggerer and api-server as separate processes.

One run of ``openai_batch_pipeline`` split into 5 shards (30 rows, 6 requests per batch) must
finish with a complete results.csv, and both workers must have run some of its tasks: each worker
is its own Celery node (``w1@host``, ``w2@host``) with its own log, and every task instance's
Celery task id (``task_instance.external_executor_id``) must appear as received in exactly one of
the two workers' logs, with each worker having received at least one.

A second run keeps its work folder and results in S3 (a local moto server): the shard tasks on the
two workers then share nothing but the object store.

Skipped only when PostgreSQL or Redis do not answer on 127.0.0.1.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import socket
import time

import pytest

from airflow_stack import AirflowStack
from conftest import REPO
from local_batch_server.testing import running_server
from s3_local import client as s3_client
from s3_local import local_s3

pytestmark = pytest.mark.slow
DAG_ID = "openai_batch_pipeline"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 7
WORKERS = ("w1", "w2")
RECEIVED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] received")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def services():
    missing = [
        name for name, port in (("PostgreSQL", PG_PORT), ("Redis", REDIS_PORT)) if not _answers(PG_HOST, port)
    ]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not answering on 127.0.0.1")


def _admin():
    import psycopg2

    con = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=10)
    con.autocommit = True
    return con


@pytest.fixture(scope="module")
def database(services):
    name = f"obp_e2e_{secrets.token_hex(4)}"
    con = _admin()
    try:
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        con.close()
    try:
        yield name
    finally:
        con = _admin()
        try:
            with con.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            con.close()


@pytest.fixture(scope="module")
def broker(services):
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory, services):
    with local_s3(tmp_path_factory.mktemp("s3"), conn_id="s3_e2e") as (endpoint, bucket):
        yield endpoint, bucket, os.environ["AIRFLOW_CONN_S3_E2E"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, database, broker, s3):
    tmp = tmp_path_factory.mktemp("celery")
    shutil.copytree(REPO / "data" / "sample", tmp / "in")
    pg = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
    with running_server(tmp / "server", config={"in_progress_seconds": 0.5}) as server:
        conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-e2e-celery"}
        stack = AirflowStack(
            tmp / "airflow",
            sql_alchemy_conn=pg,
            extra_env={
                "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn),
                "AIRFLOW_CONN_S3_E2E": s3[2],
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            },
        )
        stack.tmp = tmp
        stack.s3 = s3
        with stack:  # stops every process it started, also on failure
            stack.migrate()
            stack.start("api-server", "scheduler", "dag-processor", "triggerer")
            for name in WORKERS:
                stack.start_celery_worker(name, concurrency=2)
            stack.wait_healthy()
            _wait_workers_ready(stack)
            stack.wait_dag(DAG_ID)
            yield stack


def _wait_workers_ready(stack: AirflowStack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in WORKERS:
            if stack.procs[name].poll() is not None:
                raise RuntimeError(f"celery worker {name} exited:\n{stack.log_tail(name)}")
        if all(re.search(rf"{name}@\S+ ready", stack.log_tail(name, 400)) for name in WORKERS):
            return
        time.sleep(1)
    raise TimeoutError("\n".join(f"--- {n} ---\n{stack.log_tail(n)}" for n in WORKERS))


def _received(stack: AirflowStack, name: str) -> set[str]:
    text = (stack.logs / f"{name}.log").read_text(errors="replace")
    return set(RECEIVED.findall(text))


def test_five_shards_on_two_celery_workers_give_a_complete_result(stack):
    tmp = stack.tmp
    conf = {
        "input_csv": str(tmp / "in" / "questions.csv"),
        "output_dir": str(tmp / "out"),
        "image_column": "image",
        "check_interval": 1,
        "max_requests_per_batch": 6,
    }
    run_id = stack.trigger(DAG_ID, conf, run_id="celery_e2e")
    state = stack.wait_run(DAG_ID, run_id, timeout=150)
    logs = "".join(f"\n--- {n} ---\n{stack.log_tail(n)}" for n in (*WORKERS, "scheduler"))
    assert state == "success", (stack.task_states(DAG_ID, run_id), logs)

    # 5 shards, each through upload / create_batch / wait_for_batch / download
    tis = stack.task_states(DAG_ID, run_id)
    for task_id in ("upload", "create_batch", "wait_for_batch", "download"):
        assert [s for t, _, s in tis if t == task_id] == ["success"] * 5, tis

    (results,) = (tmp / "out" / "questions").glob(f"{run_id}/results.csv")
    with open(results, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and sum(1 for r in rows if r["response"]) == 27
    assert stack.xcom(DAG_ID, run_id, "merge") == str(results)
    _assert_both_workers_ran_tasks(stack, run_id)


def _assert_both_workers_ran_tasks(stack: AirflowStack, run_id: str) -> None:
    # Which worker ran what: each task instance's Celery task id, as received in a worker's log.
    celery_ids = {
        (task_id, map_index): ext
        for task_id, map_index, ext in stack._query(
            "SELECT task_id, map_index, external_executor_id FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            DAG_ID,
            run_id,
        )
    }
    assert all(celery_ids.values()), celery_ids
    received = {name: _received(stack, name) for name in WORKERS}
    ran_on = {}
    for key, ext in celery_ids.items():
        on = [name for name in WORKERS if ext in received[name]]
        assert len(on) == 1, (key, ext, on)
        ran_on[key] = on[0]
    per_worker = {name: sorted(k for k, w in ran_on.items() if w == name) for name in WORKERS}
    print("task instances per worker:", per_worker)
    assert all(per_worker.values()), per_worker  # both workers ran tasks of this run


def test_work_and_results_in_s3_with_shards_on_both_workers(stack):

    endpoint, bucket, _ = stack.s3
    tmp = stack.tmp
    conf = {
        "input_csv": str(tmp / "in" / "questions.csv"),  # a folder every worker mounts, as in compose
        "image_column": "image",
        "work_dir": f"s3://{bucket}/work",
        "output_dir": f"s3://{bucket}/results",
        "storage_conn_id": "s3_e2e",
        "check_interval": 1,
        "max_requests_per_batch": 6,
        "keep_temp_files": True,
    }
    run_id = stack.trigger(DAG_ID, conf, run_id="celery_e2e_s3")
    state = stack.wait_run(DAG_ID, run_id, timeout=150)
    logs = "".join(f"\n--- {n} ---\n{stack.log_tail(n)}" for n in (*WORKERS, "scheduler"))
    assert state == "success", (stack.task_states(DAG_ID, run_id), logs)

    s3 = s3_client(endpoint)
    key = f"results/questions/{run_id}/results.csv"
    rows = list(csv.DictReader(io.StringIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode())))
    assert len(rows) == 30 and sum(1 for r in rows if r["response"]) == 27
    assert stack.xcom(DAG_ID, run_id, "merge") == f"s3://s3_e2e@{bucket}/{key}"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"work/questions/{run_id}/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))
    outputs = [n for n in names if n.endswith(".output.jsonl")]  # shard-<i>.r0.<batch id>.output.jsonl
    assert [n.split(".")[0] for n in outputs] == [f"shard-{i:05d}" for i in range(5)]
    assert not (tmp / "out" / "questions" / run_id).exists()
    _assert_both_workers_ran_tasks(stack, run_id)

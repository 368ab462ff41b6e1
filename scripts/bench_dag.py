"""A million rows through the whole DAG: ``python scripts/bench_dag.py [--rows N]`` (``make bench-dag``).

Runs ``openai_batch_pipeline`` with ``dag.test()`` against the local batch server on a generated CSV
(default 1,000,000 rows, so 20 mapped shards of 50,000), then prints the wall time, the number of
mapped shard tasks, the largest XCom value in bytes (XCom carries manifests, never contents),
the rows in results.csv and this process's peak RSS. Not part of the test suite.

``--s3``: the CSV, the work folder and the results in S3 instead (a local moto server on 127.0.0.1),
to measure what object storage adds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work-dir", default=str(ROOT / "var" / "bench"))
    ap.add_argument("--s3", action="store_true", help="input, work folder and results in S3 (local moto)")
    args = ap.parse_args()

    from bench import make_text_csv

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"dag-{args.rows}.csv"
    make_text_csv(csv_path, args.rows)
    home = Path(tempfile.mkdtemp(prefix="bench-dag-airflow-"))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)

    from contextlib import ExitStack

    from local_batch_server.testing import running_server
    from s3_local import client as s3_client
    from s3_local import local_s3

    with ExitStack() as stack:
        srv = stack.enter_context(
            running_server(work / "dag-server", config={"in_progress_seconds": 2, "validating_seconds": 0.5})
        )
        conf = {"input_csv": str(csv_path), "output_dir": str(work / "dag-out")}
        if args.s3:
            endpoint, bucket = stack.enter_context(local_s3(work))
            s3 = s3_client(endpoint)
            s3.upload_file(str(csv_path), bucket, csv_path.name)
            conf = {
                "input_csv": f"s3://{bucket}/{csv_path.name}",
                "output_dir": f"s3://{bucket}/dag-out",
                "work_dir": f"s3://{bucket}/dag-work",
                "storage_conn_id": "s3_test",
            }
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai", "host": srv.base_url, "password": "bench"}
        )
        from airflow.dag_processing.dagbag import DagBag
        from airflow.utils.session import create_session
        from sqlalchemy import text

        dag = DagBag(dag_folder=str(ROOT / "dags")).dags["openai_batch_pipeline"]
        started = time.monotonic()
        dr = dag.test(
            run_conf={
                **conf,
                "model": "gpt-4o-mini",
                "check_interval": 2,
                "max_requests_per_batch": 50_000,
            }
        )
        elapsed = time.monotonic() - started
        shards = sum(1 for ti in dr.get_task_instances() if ti.task_id == "wait_for_batch")
        with create_session() as session:
            largest = session.execute(text("SELECT max(length(value)) FROM xcom")).scalar()
        if args.s3:
            (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dag-out/")["Contents"]
                      if o["Key"].endswith("/results.csv")]  # fmt: skip
            results = work / "dag-out-s3" / "results.csv"
            results.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(results))
            s3.download_file(
                bucket, key.replace("results.csv", "report.json"), str(results.parent / "report.json")
            )
        else:
            results = next((work / "dag-out").glob("*/*/results.csv"))
    with open(results, "rb") as fh:
        rows = sum(1 for _ in fh) - 1  # embedded newlines make this an upper bound; see report.json
    report = json.loads((results.parent / "report.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"state: {dr.state}")
    print(f"rows in: {args.rows:,}; rows in results.csv (report.json): {report['rows']:,} (lines {rows:,})")
    print(f"answered {report['answered']:,}, failed {report['failed']:,}, invalid {report['invalid']:,}")
    print(f"mapped shards: {shards}; largest XCom value: {largest:,} bytes")
    print(f"wall time: {elapsed:.0f} s; peak RSS of the DAG process: {peak:.0f} MB")
    return 0 if dr.state == "success" and report["rows"] == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())

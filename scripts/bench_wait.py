"""Many batches waiting in one real triggerer: ``python scripts/bench_wait.py`` (``make bench-wait``).

Starts the local batch server with batches that stay in progress, creates N batches (of two requests each)
through the real client, and, for each mode (one trigger per batch with the async client shared per
connection; one trigger per batch with one client per trigger: ``OPENAI_BATCH_TRIGGER_SHARED_CLIENT=0``;
the batches in at most 64 triggers, shared client, as the pipeline groups more than 64 shards), puts the
deferred task instances with their ``OpenAIBatchTrigger`` rows (``Trigger.from_object``, poll interval
5 s) into a throw-away SQLite Airflow and starts ONE ``airflow triggerer`` process on them, with a probe
trigger (:mod:`bench_wait_probe`) that measures the event loop's lateness. No scheduler or worker runs:
the task instances are made deferred directly, as a task's deferral makes them, so the triggerer is
measured alone.

Measured per mode: the triggerer's peak RSS (its process tree, sampled every 0.5 s), its CPU % over a
steady window of polling, the event loop's worst lag (the probe's latest wake-up, while starting and while
steady), polls per second (progress lines the triggers logged in the window: one per successful poll),
then the batches are let finish together and every wait must end (its task instance out of ``deferred``
with a ``done`` event naming the batch) within two poll intervals of the ``completed_at`` on the server
of its batch (of a group: the first of its batches to end; the operator then waits again for the rest, a
worker step not run here); whole seconds, so a latency may read up to 1 s long. Exits 1 if that fails in
a mode with the shared client. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "include"), str(ROOT / "plugins")]

DAG_ID = "bench_wait"
POLL = 5.0
DAG_FILE = f'''
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{DAG_ID}", schedule=None, catchup=False):
    EmptyOperator(task_id="probe")
    EmptyOperator.partial(task_id="wait").expand(doc=[])
'''


def seed(spec_path: str) -> None:
    """In the stack's environment: a DAG run of ``bench_wait`` with a deferred task instance per batch."""
    from airflow.models.dagrun import DagRun
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    from bench_wait_probe import LoopLagProbe
    from openai_batch_airflow.triggers import OpenAIBatchTrigger

    spec = json.loads(Path(spec_path).read_text())
    with create_session() as session:
        sdm = session.scalar(
            select(SerializedDagModel)
            .where(SerializedDagModel.dag_id == DAG_ID)
            .order_by(SerializedDagModel.created_at.desc())
            .limit(1)
        )
        dag = sdm.dag
        run = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == spec["run_id"]))
        assert run is not None, "the DAG run was not created"

        # the run was created with its task instances: the probe's, and the unexpanded placeholder of "wait"
        existing = {
            (ti.task_id, ti.map_index): ti
            for ti in session.scalars(
                select(TaskInstance).where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run.run_id)
            )
        }
        if (placeholder := existing.pop(("wait", -1), None)) is not None:
            session.delete(placeholder)
            session.flush()

        def defer(task_id: str, map_index: int, trigger) -> None:
            row = Trigger.from_object(trigger)
            session.add(row)
            session.flush()
            ti = existing.pop((task_id, map_index), None) or TaskInstance(
                dag.get_task(task_id), sdm.dag_version_id, run_id=run.run_id, map_index=map_index
            )
            ti.state, ti.trigger_id, ti.try_number = TaskInstanceState.DEFERRED, row.id, 1
            ti.next_method = "execute_complete"
            session.add(ti)

        defer("probe", -1, LoopLagProbe(out=spec["probe_out"], stop=spec["probe_stop"]))
        for i, batch_ids in enumerate(spec["groups"]):
            trigger = OpenAIBatchTrigger(batch_ids=batch_ids, conn_id="openai_default", poll_interval=POLL)
            defer("wait", i, trigger)


class TreeSampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every 0.5 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def tree(self):
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            rss = 0
            for p in self.tree():
                try:
                    rss += p.memory_info().rss
                except Exception:
                    pass
            self.peak = max(self.peak, rss)


def log_files(home: Path) -> list[Path]:
    return [p for p in (home / "logs").rglob("*") if p.is_file() and ".trigger." in p.name]


def polls_logged(home: Path) -> int:
    return sum(p.read_bytes().count(b"status=") for p in log_files(home))


def polled_batches(home: Path) -> int:
    """Distinct batches whose progress a trigger logged (a trigger may poll several)."""
    seen: set[bytes] = set()
    for p in log_files(home):
        seen.update(re.findall(rb"batch (\S+): status=", p.read_bytes()))
    return len(seen)


def db_rows(db: Path, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def parse_time(value: str) -> float:
    """A timestamp column of the SQLite metadata DB (UTC, with or without an offset) as Unix time."""
    when = datetime.fromisoformat(value)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def run_mode(stack, server, mode: str, n: int, file_id: str, steady: float, work: Path) -> dict:
    from batchpipe.build import SHARD_GROUPS, group_shards

    client = server.client()
    server.set_config({"in_progress_seconds": 3600})
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch_ids = [client.batches.create(**create).id for _ in range(n)]
    shared = mode != "per_trigger"
    groups = group_shards(batch_ids, SHARD_GROUPS) if mode == "grouped" else [[b] for b in batch_ids]
    run_id = f"bench_{mode}_{n}"
    stack.airflow("dags", "trigger", DAG_ID, "--run-id", run_id)
    probe_out, probe_stop = work / f"probe-{run_id}.json", work / f"probe-{run_id}.stop"
    spec = work / f"seed-{run_id}.json"
    spec.write_text(
        json.dumps(
            {
                "run_id": run_id,
                "groups": groups,
                "probe_out": str(probe_out),
                "probe_stop": str(probe_stop),
            }
        )
    )
    subprocess.run([sys.executable, __file__, "--seed", str(spec)], env=stack.env, check=True)
    for p in log_files(stack.home):
        p.unlink()

    env = {"OPENAI_BATCH_TRIGGER_SHARED_CLIENT": "1" if shared else "0"}
    started = time.time()
    proc = stack.start_process(f"triggerer-{mode}", [sys.executable, "-m", "airflow", "triggerer"], env=env)
    sampler, server_cpu = TreeSampler(proc.pid), TreeSampler(server.process.pid)
    sampler.start()
    try:
        deadline = time.monotonic() + 600
        while polled_batches(stack.home) < n:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    f"{mode}: only {polled_batches(stack.home)} of {n} batches polled\n"
                    f"{stack.log_tail(f'triggerer-{mode}')}"
                )
            time.sleep(1)
        all_polling = time.time()
        time.sleep(2 * POLL)  # settle into the steady rhythm
        cpu0, polls0, t0 = sampler.cpu_seconds(), polls_logged(stack.home), time.time()
        server0 = server_cpu.cpu_seconds()
        time.sleep(steady)
        cpu1, polls1, t1 = sampler.cpu_seconds(), polls_logged(stack.home), time.time()
        server1 = server_cpu.cpu_seconds()

        server.set_config({"in_progress_seconds": 0})  # every batch finishes now
        released = time.time()
        deadline = time.monotonic() + 300
        while True:
            left = db_rows(
                stack.db,
                "select count(*) from task_instance where dag_id=? and run_id=? and "
                "task_id='wait' and state='deferred'",
                DAG_ID,
                run_id,
            )[0][0]
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        probe_stop.touch()
        time.sleep(2)
    finally:
        sampler.stopped.set()
        stack.stop(f"triggerer-{mode}")

    ended = {b.id: b for b in client.batches.list(limit=100) if b.id in set(batch_ids)}
    query = "select map_index, state, updated_at, next_kwargs from task_instance where dag_id=? and run_id=? "
    rows = db_rows(stack.db, query + "and task_id='wait'", DAG_ID, run_id)
    # A trigger ends with the first round that sees an end: with one batch per trigger that is the batch's
    # end; for a group, the first of its batches to end (the operator then settles it and waits again for
    # the rest, in a new trigger: a worker step this benchmark does not run). So an end is "seen" when the
    # trigger's event names its batch, and for a group the latency is from its first batch's end.
    latencies, missing = [], []
    for map_index, state, updated_at, next_kwargs in rows:
        batches = [ended[b] for b in groups[map_index]]
        named = [
            b for b in batches if state != "deferred" and b.status == "completed" and b.id in str(next_kwargs)
        ]
        if not named:
            missing.append(groups[map_index][0])
            continue
        latencies.append(parse_time(updated_at) - min(b.completed_at for b in named))
    lags = json.loads(probe_out.read_text()) if probe_out.exists() else []
    start_lag = max((lag for t, lag in lags if t < all_polling + 2 * POLL), default=float("nan"))
    steady_lag = max((lag for t, lag in lags if t0 <= t <= t1), default=float("nan"))
    end_lag = max((lag for t, lag in lags if t >= released), default=float("nan"))
    return {
        "mode": mode,
        "batches": n,
        "triggers": len(groups),
        "start_seconds": round(all_polling - started, 1),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "polls_per_second": round((polls1 - polls0) / (t1 - t0), 1),
        "poll_cycle_s": round(n * (t1 - t0) / max(polls1 - polls0, 1), 1),
        "server_cpu_percent": round(100 * (server1 - server0) / (t1 - t0), 1),
        "worst_lag_start_s": round(start_lag, 3),
        "worst_lag_steady_s": round(steady_lag, 3),
        "worst_lag_end_s": round(end_lag, 3),
        "waits": len(groups),
        "ends_seen": len(latencies),
        "ends_missing": len(missing),
        "worst_end_latency_s": round(max(latencies, default=float("nan")), 1),
        "ends_within_2_polls": sum(1 for x in latencies if x <= 2 * POLL),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[200, 1000], help="sizes (each mode)")
    ap.add_argument("--steady", type=float, default=30.0, help="seconds of steady polling measured")
    modes = ["shared", "per_trigger", "grouped"]
    ap.add_argument("--modes", nargs="+", default=modes, choices=modes)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--work-dir", help="keep the server, Airflow home and logs here (default: a temp folder)")
    ap.add_argument("--seed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed:
        seed(args.seed)
        return 0

    from airflow_stack import AirflowStack
    from local_batch_server.testing import running_server

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-wait-") as tmp:
        work = Path(args.work_dir or tmp)
        (work / "dags").mkdir(parents=True)
        (work / "dags" / "bench_wait.py").write_text(DAG_FILE)
        config = {"validating_seconds": 0.1, "in_progress_seconds": 3600, "finalizing_seconds": 0}
        with running_server(work / "server", config=config) as server:
            conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-bench-wait"}
            capacity = max(args.batches) + 10
            stack = AirflowStack(
                work / "airflow",
                extra_env={
                    "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(work / "dags"),
                    "AIRFLOW__TRIGGERER__CAPACITY": str(capacity),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")]),
                },
            )
            with stack:
                stack.migrate()
                stack.airflow("dags", "reserialize")
                # two requests: a one-request batch answers in its first step, never waits in progress
                ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}
                line = {"method": "POST", "url": "/v1/chat/completions", "body": ask}
                body = "".join(json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(2))
                file_id = (
                    server.client()
                    .files.create(file=("in.jsonl", io.BytesIO(body.encode())), purpose="batch")
                    .id
                )
                for n in args.batches:
                    for mode in args.modes:
                        row = run_mode(stack, server, mode, n, file_id, args.steady, work)
                        print(json.dumps(row), flush=True)
                        results.append(row)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    # the goal holds for the shipped modes (shared client); one client per trigger is the comparison
    shipped = [r for r in results if r["mode"] != "per_trigger"]
    ok = all(
        r["ends_missing"] == 0 and r["ends_within_2_polls"] == r.get("waits", r["batches"]) for r in shipped
    )
    print("every end seen within two poll intervals (shared client, one trigger each or grouped):",
          "ok" if ok else "NO")  # fmt: skip
    return 0 if ok else 1


def print_table(results: list[dict]) -> None:
    head = (
        "batches",
        "triggers",
        "client",
        "start s",
        "peak RSS MB",
        "CPU %",
        "polls/s",
        "poll cycle s",
        "server CPU %",
        "worst lag start s",
        "worst lag steady s",
        "worst lag at the end s",
        "waits ended ≤ 2 polls",
        "worst end latency s",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        keys = (
            "start_seconds",
            "peak_rss_mb",
            "cpu_percent",
            "polls_per_second",
            "poll_cycle_s",
            "server_cpu_percent",
            "worst_lag_start_s",
            "worst_lag_steady_s",
            "worst_lag_end_s",
        )
        ends = f"{r['ends_within_2_polls']} / {r.get('waits', r['batches'])}"
        cells = (
            r["batches"],
            r.get("triggers", r["batches"]),
            "per trigger" if r["mode"] == "per_trigger" else "shared",
            *(r[k] for k in keys),
            ends,
            r["worst_end_latency_s"],
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

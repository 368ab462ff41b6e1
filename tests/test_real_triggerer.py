"""The deferral works outside ``dag.test()``: scheduler, dag-processor, API server and a separate
triggerer process, run as they are in production (LocalExecutor on SQLite).

``dag.test()`` runs triggers inline in the test process, so it cannot tell whether the triggerer
can import the trigger, survives a restart, or calls ``on_kill``. Here:

1. the waiting tasks are left deferred with *no* triggerer running (they must not move), then a
   triggerer process is started and has to finish the wait;
2. the triggerer is killed (SIGKILL) mid-wait and a new one resumes polling the same batch;
3. marking a waiting task failed in the UI/API cancels its batch (trigger ``on_kill``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from airflow_stack import AirflowStack
from conftest import REPO
from local_batch_server.testing import running_server

pytestmark = pytest.mark.slow
DAG_ID = "openai_batch_pipeline"
SECRET = "sk-real-triggerer-secret"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    shutil.copytree(REPO / "data" / "sample", tmp / "in")
    # Batches stay in progress until a test lets them finish (phase durations are read live).
    with running_server(tmp / "server", config={"in_progress_seconds": 600}) as server:
        conn = {"conn_type": "openai", "host": server.base_url, "password": SECRET}
        stack = AirflowStack(
            tmp / "airflow",
            extra_env={
                "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                # a killed triggerer's triggers are taken over once it has missed this long
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
                "OPENAI_BATCH_INBOX_POKE_SECONDS": "2",
                # the inbox DAG on a fast schedule (paused until test_6 unpauses it)
                "OPENAI_BATCH_INBOX_SCHEDULE": "15s",
                "OPENAI_BATCH_INBOX": str(tmp / "inbox"),
            },
        )
        with stack:
            stack.migrate()
            stack.start("api-server", "scheduler", "dag-processor")
            stack.wait_healthy()
            stack.wait_dag(DAG_ID)
            stack.wait_dag("openai_batch_inbox")
            stack.airflow("dags", "pause", "openai_batch_inbox")
            (tmp / "inbox").mkdir()
            yield tmp, server, stack


def conf(tmp, **extra):
    return {
        "input_csv": str(tmp / "in" / "questions.csv"),
        "output_dir": str(tmp / "out"),
        "image_column": "image",
        "check_interval": 1,
        **extra,
    }


def states(stack: AirflowStack, run_id: str, task_id: str) -> list[str | None]:
    return [s for (t, _, s) in stack.task_states(DAG_ID, run_id) if t == task_id]


def wait_for(predicate, timeout: float, what: str, stack: AirflowStack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(
        f"timed out waiting for {what}\n--- scheduler ---\n{stack.log_tail('scheduler')}"
        f"\n--- triggerer ---\n{stack.log_tail('triggerer')}"
    )


def ensure_triggerer(stack: AirflowStack) -> None:
    """Tests after the first need a triggerer (the first starts it; alone, they start their own)."""
    if "triggerer" not in stack.procs:
        stack.start("triggerer")


def start_a_polled_wait(tmp, server, stack: AirflowStack, run_id: str):
    """Trigger a run whose batch stays in progress; return that batch once the triggerer polls it."""
    ensure_triggerer(stack)
    server.set_config({"in_progress_seconds": 600})
    stack.trigger(DAG_ID, conf(tmp), run_id=run_id)
    wait_for(lambda: states(stack, run_id, "wait_for_batch") == ["deferred"], 240, "the wait to defer", stack)
    (batch,) = run_batches(server, run_id)
    wait_for(lambda: f"batch {batch.id}: status=in_progress" in trigger_log_text(tmp), 60, "a poll", stack)
    return batch


def run_batches(server, run_id: str) -> list:
    return [b for b in server.client().batches.list(limit=100).data if b.metadata.get("run_id") == run_id]


def trigger_log_text(tmp) -> str:
    return "\n".join(
        p.read_text(errors="replace")
        for p in (tmp / "airflow").rglob("*")
        if p.is_file() and "trigger" in p.name
    )


def test_1_deferred_wait_is_finished_by_a_separate_triggerer_process(env):
    tmp, server, stack = env
    run_id = stack.trigger(DAG_ID, conf(tmp, max_requests_per_batch=20), run_id="deferral")  # 2 shards
    wait_for(
        lambda: states(stack, run_id, "wait_for_batch") == ["deferred", "deferred"],
        240,
        "both wait_for_batch tasks to defer",
        stack,
    )
    # Without a triggerer nobody polls: the batches finish on the server, the tasks stay deferred.
    server.set_config({"in_progress_seconds": 0.2})
    wait_for(
        lambda: [b.status for b in run_batches(server, run_id)] == ["completed", "completed"],
        60,
        "the batches to complete on the server",
        stack,
    )
    time.sleep(3)
    assert states(stack, run_id, "wait_for_batch") == ["deferred", "deferred"]
    assert stack.run_state(DAG_ID, run_id) == "running"

    stack.start("triggerer")
    state = stack.wait_run(DAG_ID, run_id, timeout=300)
    assert state == "success", (stack.task_states(DAG_ID, run_id), stack.log_tail("triggerer"))

    # The trigger ran in the triggerer process and logged its polls there.
    logs = trigger_log_text(tmp)
    assert "status=completed" in logs and SECRET not in logs
    (results,) = (tmp / "out" / "questions").glob(f"{run_id}/results.csv")
    with open(results, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and sum(1 for r in rows if r["response"]) == 27
    assert stack.xcom(DAG_ID, run_id, "merge") == str(results)


def test_2_triggerer_killed_mid_wait_a_new_one_resumes_the_same_batch(env):
    tmp, server, stack = env
    run_id = "restart"
    batch = start_a_polled_wait(tmp, server, stack, run_id)

    stack.stop("triggerer", sig=signal.SIGKILL)  # no goodbye, no cleanup
    stack.start("triggerer")
    server.set_config({"in_progress_seconds": 0.2})
    state = stack.wait_run(DAG_ID, run_id, timeout=300)
    assert state == "success", stack.task_states(DAG_ID, run_id)
    (again,) = run_batches(server, run_id)  # still one batch: nothing was submitted twice
    assert again.id == batch.id and again.status == "completed"  # a restart does not cancel


def test_3_marking_the_waiting_task_failed_cancels_its_batch(env):
    tmp, server, stack = env
    run_id = "mark_failed"
    batch = start_a_polled_wait(tmp, server, stack, run_id)

    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.api_port}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/wait_for_batch/0",
        data=json.dumps({"new_state": "failed"}).encode(),
        headers={"Content-Type": "application/json"},
        method="PATCH",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200

    client = server.client()
    wait_for(
        lambda: client.batches.retrieve(batch.id).status in ("cancelling", "cancelled"),
        60,
        "the batch to be cancelled",
        stack,
    )
    # it was the trigger's on_kill, in the triggerer, that cancelled it
    logged = lambda: trigger_log_text(tmp) + stack.log_tail("triggerer", 400)  # noqa: E731
    wait_for(lambda: f"cancelled batch {batch.id}" in logged(), 30, "the on_kill log line", stack)
    assert stack.wait_run(DAG_ID, run_id, timeout=120) == "failed"
    assert len(run_batches(server, run_id)) == 1
    server.set_config({"in_progress_seconds": 0.2})


def test_4_clearing_a_finished_run_is_a_deliberate_new_submission(env):
    # A retry re-attaches to the batch it made; clearing a finished run in the UI/API is a
    # decision to run again, so it submits new batches (the clear starts a new "generation").
    tmp, server, stack = env
    ensure_triggerer(stack)
    server.set_config({"in_progress_seconds": 0.2})
    run_id = "restart"  # finished successfully in test_2 with one batch
    assert stack.run_state(DAG_ID, run_id) == "success" and len(run_batches(server, run_id)) == 1
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.api_port}/api/v2/dags/{DAG_ID}/clearTaskInstances",
        data=json.dumps({"dry_run": False, "dag_run_id": run_id, "only_failed": False}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
    wait_for(lambda: stack.run_state(DAG_ID, run_id) != "success", 60, "the run to be cleared", stack)
    assert stack.wait_run(DAG_ID, run_id, timeout=300) == "success", stack.task_states(DAG_ID, run_id)
    made = run_batches(server, run_id)
    assert len(made) == 2 and len({b.metadata["submission"] for b in made}) == 2


def test_5_a_dag_scheduled_on_the_results_asset_runs_after_each_success(env):
    tmp, server, stack = env
    ensure_triggerer(stack)
    consumer = "openai_batch_results_consumer"
    landed = {str(p) for p in (tmp / "out" / "questions").glob("*/results.csv")}
    assert landed  # earlier tests' successful runs

    def consumer_runs():
        return stack._query("SELECT run_id, state FROM dag_run WHERE dag_id = ?", consumer)

    wait_for(lambda: consumer_runs() and all(s == "success" for _, s in consumer_runs()), 180,
             "the consumer DAG to run on the asset", stack)  # fmt: skip
    seen = set()
    for run_id, _ in consumer_runs():
        seen.update(stack.xcom(consumer, run_id, "summarise") or [])
    assert seen <= landed and seen  # it was told where each results.csv landed


def test_6_inbox_scheduled_run_processes_two_csvs_once_and_the_next_finds_nothing(env):
    """Two good files are processed once; a third with a bad sidecar fails alone (issue 11 item 3):
    it is not triggered, lands in failed/ with its reason, and the inbox run ends failed. With an answer
    cache in the settings, the next day's export repeating alpha's rows pays only for what alpha's run
    could not answer."""
    from batchpipe.inbox import claim_name, run_name

    tmp, server, stack = env
    ensure_triggerer(stack)
    server.set_config({"in_progress_seconds": 0.2})
    inbox, out = tmp / "inbox", tmp / "inbox-out"
    shutil.copytree(tmp / "in" / "images", inbox / "images")
    settings = {"image_column": "image", "check_interval": 1, "output_dir": str(out),
                "cache_dir": str(tmp / "inbox-cache")}  # fmt: skip
    for name, extra in (
        ("alpha", {}),
        ("beta", {"end_row": 5, "model": "gpt-4o-mini"}),
        ("gamma", {"modle": "x"}),
    ):
        shutil.copy(tmp / "in" / "questions.csv", inbox / f"{name}.csv")
        (inbox / f"{name}.json").write_text(json.dumps({**settings, **extra}))
        old = time.time() - 3600  # older than min_age_seconds: fully written
        os.utime(inbox / f"{name}.csv", (old, old))

    def inbox_runs():
        return stack._query(
            "SELECT run_id, run_type, state FROM dag_run "
            "WHERE dag_id = 'openai_batch_inbox' ORDER BY run_after"
        )

    def pipeline_runs():
        return stack._query(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? AND run_id LIKE 'inbox__%'", DAG_ID
        )

    stack.airflow("dags", "unpause", "openai_batch_inbox")  # its schedule here: every 15 s
    try:
        wait_for(lambda: len(list((inbox / "done").glob("*/*.csv"))) == 2, 300, "both files done", stack)
        (claim,) = {p.parent.name for p in (inbox / "done").glob("*/*.csv")}  # one run took both
        (first,) = [r for r in inbox_runs() if claim_name(r[0]) == claim]
        assert first[1] == "scheduled"
        assert stack.wait_run("openai_batch_inbox", first[0]) == "failed"  # gamma's bad sidecar
        assert sorted(pipeline_runs()) == [
            (run_name(claim, "alpha.csv"), "success"),
            (run_name(claim, "beta.csv"), "success"),
        ]
        assert sorted(p.name for p in (inbox / "failed" / claim).iterdir()) == [
            "gamma.csv", "gamma.csv.error.txt", "gamma.json"
        ]  # fmt: skip
        assert "unknown settings modle" in (inbox / "failed" / claim / "gamma.csv.error.txt").read_text()
        assert sorted(p.name for p in (inbox / "done" / claim).iterdir()) == [
            "alpha.csv", "alpha.json", "beta.csv", "beta.json"
        ]  # fmt: skip
        assert not list(inbox.glob("*.csv")) and not list((inbox / "processing").glob("*/*"))
        # settle names where each processed file's answers landed (the merge XCom of its own run)
        settle_log = "\n".join(
            p.read_text(errors="replace")
            for p in (tmp / "airflow" / "logs").rglob("*")
            if p.is_file() and "dag_id=openai_batch_inbox" in str(p) and "task_id=settle" in str(p)
        )
        for name in ("alpha", "beta"):
            (landed,) = (out / name).glob(f"{run_name(claim, name + '.csv')}*/results.csv")
            assert f"{name}.csv: results at {landed}" in settle_log, settle_log[-2000:]
        assert "results landed: alpha.csv: " in settle_log

        # the next scheduled run finds nothing: nothing is processed twice
        def next_scheduled_run_succeeded():
            runs = inbox_runs()
            later = runs[[r[0] for r in runs].index(first[0]) + 1 :]
            return any(r[1] == "scheduled" and r[2] == "success" for r in later)

        wait_for(next_scheduled_run_succeeded, 120, "the next scheduled inbox run", stack)
        assert len(pipeline_runs()) == 2

        # the next day's export: alpha's rows again, with the same settings
        shutil.copy(tmp / "in" / "questions.csv", inbox / "delta.csv")
        (inbox / "delta.json").write_text(json.dumps(settings))
        old = time.time() - 3600
        os.utime(inbox / "delta.csv", (old, old))
        wait_for(lambda: list((inbox / "done").glob("*/delta.csv")), 300, "delta done", stack)
    finally:
        stack.airflow("dags", "pause", "openai_batch_inbox")
    rows = {}
    for stem in ("alpha", "beta"):
        (results,) = (out / stem).glob("*/results.csv")
        with open(results, newline="", encoding="utf-8") as fh:
            rows[stem] = list(csv.DictReader(fh))
    assert len(rows["alpha"]) == 30 and sum(1 for r in rows["alpha"] if r["response"]) == 27  # images found
    assert len(rows["beta"]) == 5  # its sidecar's end_row
    beta = [b for b in server.client().batches.list(limit=100).data if "__beta_" in b.metadata["run_id"]]
    assert [b.metadata["model"] for b in beta] == ["gpt-4o-mini"]
    (results,) = (out / "delta").glob("*/results.csv")
    with open(results, newline="", encoding="utf-8") as fh:
        delta = list(csv.DictReader(fh))
    assert [r["response"] for r in delta] == [r["response"] for r in rows["alpha"]]
    assert sum(r["answered_from"] == "cache" for r in delta) == 27  # alpha's answers, not paid again
    batches = [b for b in server.client().batches.list(limit=100).data if "__delta_" in b.metadata["run_id"]]
    assert [b.request_counts.total for b in batches] == [1]  # the row the server refused, sent again


def safe(run_id: str) -> str:
    from openai_batch_airflow.config import run_folder_name

    return run_folder_name(run_id)


def test_7_the_readme_trigger_command_runs_verbatim(env):
    tmp, server, stack = env
    ensure_triggerer(stack)
    server.set_config({"in_progress_seconds": 0.2})
    readme = (REPO / "README.md").read_text()
    section = readme.split("### From the command line", 1)[1]
    command = re.search(r"```bash\n(airflow dags trigger .*?)```", section, re.S).group(1)
    before = {r[0] for r in stack._query("SELECT run_id FROM dag_run WHERE dag_id = ?", DAG_ID)}
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=stack.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_id,) = {r[0] for r in stack._query("SELECT run_id FROM dag_run WHERE dag_id = ?", DAG_ID)} - before
    assert stack.wait_run(DAG_ID, run_id, timeout=300) == "success", stack.task_states(DAG_ID, run_id)
    # no output_dir in the command: the default folder, $AIRFLOW_HOME/openai_batch_results
    results = stack.xcom(DAG_ID, run_id, "merge")
    assert results.startswith(str(stack.home / "openai_batch_results" / "questions"))
    # and `make demo`'s closing words say so: the folder it names is where this run landed
    from demo import where_runs_land

    said = where_runs_land(stack.env)
    assert f"in {stack.home / 'openai_batch_results'}/<input file name>/<run folder>/results.csv" in said
    with open(results, newline="", encoding="utf-8") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == [f"q{i:03d}" for i in range(1, 11)]

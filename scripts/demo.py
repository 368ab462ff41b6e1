"""``make demo``: run the whole pipeline once on the bundled sample and leave Airflow up to explore.

Without an OpenAI key it starts the repo's local batch server (offline). With ``OPENAI_API_KEY``
(or ``AIRFLOW_CONN_OPENAI_DEFAULT``) in the environment, the same run goes to OpenAI for real.

``make demo PROVIDER=anthropic`` (or ``azure_openai``) runs it through that batch API instead: offline
against the local batch server (which speaks Anthropic's Message Batches and Azure's URLs too), or for
real with ``ANTHROPIC_API_KEY`` / ``AIRFLOW_CONN_ANTHROPIC_DEFAULT`` (Azure:
``AIRFLOW_CONN_AZURE_OPENAI_DEFAULT``; its model is your deployment's name, give it in ``DEMO_MODEL``).

Airflow (SQLite, LocalExecutor) lives in ``airflow_home/`` inside the repo (git-ignored):
api-server, scheduler, dag-processor and triggerer run as separate processes. Results land in
``output/``. ``make stop`` ends the processes this script leaves running.

Environment: ``DEMO_API_PORT`` (default 8080), ``DEMO_BATCH_SERVER_PORT`` (default 8765),
``DEMO_MODEL`` (default gpt-4o; claude-haiku-4-5 for Anthropic), ``DEMO_CHECK_INTERVAL`` (seconds;
default 2 offline, 30 online).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airflow_stack import REPO, AirflowStack, free_port  # noqa: E402
from openai_batch_airflow.links import report_tab  # noqa: E402

DAG_ID = "openai_batch_pipeline"
HOME = REPO / "airflow_home"
OUTPUT = REPO / "output"
SAMPLE = REPO / "data" / "sample" / "questions.csv"
REVIEWS = REPO / "data" / "structured" / "reviews.csv"
REVIEW_SCHEMA = REPO / "data" / "structured" / "review_schema.json"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def say(text: str = "") -> None:
    print(text, flush=True)


def start_local_batch_server(stack: AirflowStack) -> str:
    port = int(os.environ.get("DEMO_BATCH_SERVER_PORT", "8765"))
    if not port_free(port):
        port = free_port()
    stack.start_process(
        "batch-server",
        [sys.executable, "-m", "local_batch_server", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(REPO / "var" / "batch-server")],
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_admin/config", timeout=2).close()
            return base_url
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"local batch server did not start:\n{stack.log_tail('batch-server')}")


#: The demo's batch APIs: (connection variable, key variable, default model, what it is called).
PROVIDERS = {
    "openai": ("AIRFLOW_CONN_OPENAI_DEFAULT", "OPENAI_API_KEY", "gpt-4o", "OpenAI"),
    "azure_openai": ("AIRFLOW_CONN_AZURE_OPENAI_DEFAULT", None, "gpt-4o-batch", "Azure OpenAI"),
    "anthropic": ("AIRFLOW_CONN_ANTHROPIC_DEFAULT", "ANTHROPIC_API_KEY", "claude-haiku-4-5", "Anthropic"),
}
#: Connection types of the providers' connections.
CONN_TYPES = {"openai": "openai", "azure_openai": "azure_openai_batch", "anthropic": "anthropic"}


def connection(provider: str = "openai") -> tuple[str, str, str]:
    """(the provider's connection value or "", mode, description) — never prints the key."""
    variable, key, _, name = PROVIDERS[provider]
    if provider != "openai":
        if os.environ.get(variable):
            return os.environ[variable], "online", f"the {variable} connection"
        if key and os.environ.get(key):
            conn = {"conn_type": CONN_TYPES[provider], "password": os.environ[key]}
            return json.dumps(conn), "online", f"{name} with your {key}"
        return "", "offline", f"the local batch server, speaking {name}'s batch API (no {name} key set)"
    if os.environ.get("AIRFLOW_CONN_OPENAI_DEFAULT"):
        return (
            os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"],
            "online",
            "the AIRFLOW_CONN_OPENAI_DEFAULT connection",
        )
    if os.environ.get("OPENAI_API_KEY"):
        conn = {"conn_type": "openai", "password": os.environ["OPENAI_API_KEY"]}
        return json.dumps(conn), "online", "OpenAI with your OPENAI_API_KEY"
    return "", "offline", "the local batch server (no OpenAI key set)"


def login_hint(stack: AirflowStack) -> str:
    passwords = stack.home / "simple_auth_manager_passwords.json.generated"
    try:
        password = json.loads(passwords.read_text())["admin"]
    except (OSError, ValueError, KeyError):
        return f"user admin, password in {passwords}"
    return f"user admin, password {password}"


def where_runs_land(env: dict[str, str]) -> str:
    """Where runs started from the UI or ``airflow dags trigger`` land when their conf names no
    ``output_dir``: as ``default_output_dir`` in the pipeline resolves it for this stack (the Variable
    ``openai_batch_output_dir`` would come first; the demo sets none)."""
    home = Path(env.get("AIRFLOW_HOME") or HOME)
    base = env.get("OPENAI_BATCH_OUTPUT_DIR") or str(home / "openai_batch_results")
    return (
        "Runs you trigger yourself (the UI form, airflow dags trigger) land, unless their output_dir says\n"
        f"  otherwise, in {base}/<input file name>/<run folder>/results.csv (the run folder: the run id,\n"
        "  made filesystem-safe with a short hash when it had to change); the merge task's log ends\n"
        "  with the exact path, and report.html beside it summarises the run."
    )


def main() -> int:
    provider = (os.environ.get("PROVIDER") or "openai").strip()
    if provider not in PROVIDERS:
        raise SystemExit(f"PROVIDER={provider!r}: use one of {', '.join(PROVIDERS)}")
    conn, mode, where = connection(provider)
    api_port = int(os.environ.get("DEMO_API_PORT", "8080"))
    stack = AirflowStack(HOME, api_port=api_port)
    stopped = stack.stop_detached()
    if stopped:
        say(f"stopped the previous demo's processes: {', '.join(stopped)}")
    if not port_free(api_port):
        raise SystemExit(
            f"port {api_port} is taken by another program: set DEMO_API_PORT to a free port, e.g. "
            f"DEMO_API_PORT={free_port()} make demo"
        )
    say(f"Airflow home: {HOME} (SQLite). Batches go to {where}.")
    ok = False
    try:
        if mode == "offline":
            base_url = start_local_batch_server(stack)
            host = base_url if provider == "openai" else base_url.removesuffix("/v1")  # its own root
            conn = json.dumps({"conn_type": CONN_TYPES[provider], "host": host, "password": "local-demo-key"})
            say(f"local batch server: {host}")
        stack.env[PROVIDERS[provider][0]] = conn
        stack.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "admin:admin"
        say("preparing the Airflow database ...")
        stack.migrate()
        say("starting api-server, scheduler, dag-processor and triggerer ...")
        stack.start()
        stack.wait_healthy()
        stack.wait_dag(DAG_ID)
        interval = int(os.environ.get("DEMO_CHECK_INTERVAL", "2" if mode == "offline" else "30"))
        conf = {
            "input_csv": str(SAMPLE),
            "output_dir": str(OUTPUT),
            "prompt_column": "prompt",
            "image_column": "image",
            "model": os.environ.get("DEMO_MODEL") or PROVIDERS[provider][2],
            "check_interval": interval,
        }
        if provider != "openai":
            conf["provider"] = provider
        if provider == "anthropic":
            conf["max_tokens"] = 1024  # Anthropic requires it
        run_id = "demo__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        say("\ntriggering, as you would yourself:")
        say(f"  airflow dags trigger {DAG_ID} --run-id {run_id} --conf '{json.dumps(conf)}'\n")
        stack.trigger(DAG_ID, conf, run_id=run_id)
        seen: dict[tuple[str, int], str | None] = {}

        def show(s: AirflowStack) -> None:
            for task, index, state in s.task_states(DAG_ID, run_id):
                if seen.get((task, index)) != state and state:
                    seen[(task, index)] = state
                    label = task if index < 0 else f"{task}[{index}]"
                    say(f"  {datetime.now().strftime('%H:%M:%S')}  {label:<22} {state}")

        timeout = 3600 if mode == "offline" else 26 * 3600
        state = stack.wait_run(DAG_ID, run_id, timeout=timeout, on_poll=show)
        say()
        if state != "success":
            say(f"the run ended {state}: see the task logs in the UI or under {HOME / 'logs'}")
            return 1
        results = Path(stack.xcom(DAG_ID, run_id, "merge"))
        report = json.loads((results.parent / "report.json").read_text())
        say(f"results.csv landed at: {results}")
        say(
            f"  {report['rows']} rows: {report['answered']} answered, {report['failed']} failed, "
            f"{report['invalid']} invalid (not sent); tokens {report['tokens']}"
        )
        cost = report.get("cost_usd") or {}
        if cost.get("actual_batch") is not None:
            say(
                f"  Batch cost: ${cost['actual_batch']:.6f} "
                f"(estimated before upload: ${cost['estimated_batch_expected'] or 0:.6f})"
            )
            if mode == "offline":
                say("  (offline, the local server counts tokens as the estimate does, but its answers echo")
                say("   the prompt: a real model's are longer, closer to the estimate's 200 tokens each)")
        say(f"  the same rows typed for programs: {results.parent / 'results.parquet'}")
        say(f"  report: {results.parent / 'report.html'} and report.json; in Airflow, the run's report tab:")
        say(f"    http://127.0.0.1:{api_port}/{report_tab(DAG_ID, run_id)}")
        say(f"  spend of every run: http://127.0.0.1:{api_port}/plugin/batch-spend")
        say(f"  estimate made before upload: {results.parent / 'estimate.md'}")
        if mode == "offline" and not structured_run(stack, conf, timeout):
            return 1
        say()
        say(where_runs_land(stack.env))
        ok = True
        return 0
    finally:
        if ok:
            stack.detach()
            say(
                f"\nAirflow UI: http://127.0.0.1:{api_port}  ({login_hint(stack)})\n"
                f"  the DAG '{DAG_ID}' has a Trigger button with the form of all params.\n"
                f"  Airflow keeps running; stop it with: make stop"
            )
        else:
            stack.stop()


def structured_run(stack: AirflowStack, conf: dict, timeout: float) -> bool:
    """A second run, with an answer schema: a few reviews, each answer in typed columns."""
    import csv

    conf = {**conf, "input_csv": str(REVIEWS), "prompt_column": "review", "image_column": None,
            "response_schema": json.loads(REVIEW_SCHEMA.read_text(encoding="utf-8"))}  # fmt: skip
    run_id = "demo_structured__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    say("\na second run with an answer schema (data/structured/review_schema.json): each property a column")
    say(f"  airflow dags trigger {DAG_ID} --run-id {run_id} --conf '{json.dumps(conf)}'")
    stack.trigger(DAG_ID, conf, run_id=run_id)
    state = stack.wait_run(DAG_ID, run_id, timeout=timeout)
    if state != "success":
        say(f"the structured run ended {state}: see the task logs in the UI or under {HOME / 'logs'}")
        return False
    results = Path(stack.xcom(DAG_ID, run_id, "merge"))
    with open(results, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    say(f"results.csv landed at: {results} (and results.parquet, typed)")
    for row in rows[:4]:
        say(f"  {row['id']}: sentiment={row['sentiment']} score={row['score']} topics={row['topics']} "
            f"needs_reply={row['needs_reply']}")  # fmt: skip
    say("  (offline, the answers are the local server's: valid under the schema, not a model's judgement)")
    return True


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "stop":
        names = AirflowStack(HOME).stop_detached()
        print("stopped: " + (", ".join(names) if names else "nothing was running"))
        sys.exit(0)
    sys.exit(main())

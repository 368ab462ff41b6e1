"""Run a real Airflow 3 on this machine: api-server, scheduler, dag-processor and triggerer as
separate processes on SQLite with the LocalExecutor. Used by ``make demo`` and by the test that
proves the deferral works with a real triggerer process.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINISHED = {"success", "failed"}


def _db_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg2
    except ImportError:
        return (sqlite3.OperationalError,)
    return (sqlite3.OperationalError, psycopg2.Error)


_DB_ERRORS = _db_errors()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class AirflowStack:
    """Airflow processes sharing one ``AIRFLOW_HOME`` and SQLite DB; logs go to ``home/process-logs``."""

    def __init__(
        self,
        home: Path,
        api_port: int | None = None,
        extra_env: dict[str, str] | None = None,
        sql_alchemy_conn: str | None = None,
    ):
        """``sql_alchemy_conn`` (optional) puts the metadata DB elsewhere, e.g. on PostgreSQL
        (``postgresql+psycopg2://...``); the query helpers then read it there. Default: SQLite."""
        self.home = Path(home).resolve()
        self.sql_alchemy_conn = sql_alchemy_conn
        self.api_port = api_port or free_port()
        self.db = self.home / "airflow.db"
        self.logs = self.home / "process-logs"
        self.procs: dict[str, subprocess.Popen] = {}
        secret_file = self.home / ".jwt_secret"
        self.home.mkdir(parents=True, exist_ok=True)
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(32))
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db}",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.api_port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text(),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__API__WORKERS": "1",
            **({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn} if sql_alchemy_conn else {}),
            **(extra_env or {}),
        }

    # -- processes ------------------------------------------------------------------------------
    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def migrate(self) -> None:
        self.airflow("db", "migrate")

    def start(self, *components: str) -> None:
        for name in components or COMPONENTS:
            args = [name, "--port", str(self.api_port)] if name == "api-server" else [name]
            self.start_process(name, [sys.executable, "-m", "airflow", *args])

    def start_process(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own session with this stack's environment, logging to ``logs/<name>.log``.

        ``env`` (optional) adds to or overrides this stack's environment for this process only."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                env={**self.env, **env} if env else self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.procs[name]

    def start_celery_worker(self, name: str, concurrency: int = 2) -> subprocess.Popen:
        """Start ``airflow celery worker`` as Celery node ``<name>@<host>`` (process name ``name``),
        with its own log-server port and pid file so several can run on one machine.
        Needs ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor`` and a broker in the environment."""
        cmd = [
            *(sys.executable, "-m", "airflow", "celery", "worker"),
            *("--celery-hostname", f"{name}@%h", "--concurrency", str(concurrency)),
            *("--pid", str(self.home / f"celery-{name}.pid")),
        ]
        log_port = {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
        return self.start_process(name, cmd, env=log_port)

    def stop(self, *components: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        names = components or tuple(self.procs)
        for name in names:
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for name in names:
            proc = self.procs.pop(name, None)
            if not proc:
                continue
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    # -- leaving processes running after the script ends (``make demo``) -----------------------
    @property
    def pid_file(self) -> Path:
        return self.home / "stack.pids"

    def detach(self) -> None:
        """Keep the processes running after this script exits; ``stop_detached`` ends them."""
        self.pid_file.write_text(json.dumps({name: p.pid for name, p in self.procs.items()}))
        self.procs.clear()

    def stop_detached(self, timeout: float = 15) -> list[str]:
        """Stop the processes a previous :meth:`detach` left running; return their names."""
        if not self.pid_file.exists():
            return []
        pids = json.loads(self.pid_file.read_text())
        for pid in pids.values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        for pid in pids.values():
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.pid_file.unlink()
        return list(pids)

    def __enter__(self) -> AirflowStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- waiting --------------------------------------------------------------------------------
    def wait_healthy(self, timeout: float = 180) -> None:
        url = f"http://127.0.0.1:{self.api_port}/api/v2/monitor/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited early:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    health = json.load(resp)
                if all(
                    (health.get(part) or {}).get("status") == "healthy"
                    for part in ("metadatabase", "scheduler", "triggerer")
                    if part != "triggerer" or "triggerer" in self.procs
                ):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Airflow API on port {self.api_port} not healthy after {timeout}s")

    @property
    def on_postgres(self) -> bool:
        return bool(self.sql_alchemy_conn) and self.sql_alchemy_conn.startswith("postgres")

    def _query(self, sql: str, *args) -> list[tuple]:
        if self.on_postgres:
            return self._query_postgres(sql, *args)
        with sqlite3.connect(self.db, timeout=30) as con:
            return con.execute(sql, args).fetchall()

    def _query_postgres(self, sql: str, *args) -> list[tuple]:
        """``_query`` on PostgreSQL: the same ``?`` placeholders, run through psycopg2."""
        import psycopg2
        from sqlalchemy.engine import make_url

        url = make_url(self.sql_alchemy_conn)
        params = {"host": url.host, "port": url.port, "user": url.username, "dbname": url.database}
        if url.password:
            params["password"] = url.password
        if args:  # psycopg2's paramstyle: %s, and a literal % doubled
            sql = sql.replace("%", "%%").replace("?", "%s")
        con = psycopg2.connect(**{k: v for k, v in params.items() if v is not None}, connect_timeout=30)
        try:
            with con, con.cursor() as cur:
                cur.execute(sql, args or None)
                return [tuple(row) for row in cur.fetchall()]
        finally:
            con.close()

    def wait_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", dag_id):
                    return
            except _DB_ERRORS:
                pass
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout}s:\n{self.log_tail('dag-processor')}")

    def trigger(self, dag_id: str, conf: dict, run_id: str) -> str:
        self.airflow("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf))
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self._query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return rows[0][0] if rows else None

    def task_states(self, dag_id: str, run_id: str) -> list[tuple[str, int, str | None]]:
        return self._query(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ? "
            "ORDER BY task_id, map_index",
            dag_id,
            run_id,
        )

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600, on_poll=None) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if on_poll:
                on_poll(self)
            if state in FINISHED:
                return state
            time.sleep(2)
        raise TimeoutError(f"run {run_id} still {state} after {timeout}s: {self.task_states(dag_id, run_id)}")

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        # PostgreSQL keeps the value as JSONB, which psycopg2 would decode: read it as JSON text there
        column = "CAST(value AS TEXT)" if self.on_postgres else "value"
        rows = self._query(
            f"SELECT {column} FROM xcom "
            "WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = 'return_value'",
            dag_id,
            run_id,
            task_id,
        )
        if not rows:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, str | bytes) else value

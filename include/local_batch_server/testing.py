"""Test / demo helper: run the local batch server as a subprocess.

with running_server(tmp_path, config={"in_progress_seconds": 0.1}) as srv:
    client = openai.OpenAI(base_url=srv.base_url, api_key="x")
    srv.set_config({"expire_fraction": 0.5})

``admin_token=...`` starts it with that admin token (given through the environment, not the command
line) and makes :class:`RunningServer` send it on every ``/_admin`` call.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .config import ADMIN_TOKEN_ENV


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(
        self,
        process: subprocess.Popen,
        port: int,
        data_dir: Path,
        log_path: Path,
        admin_token: str | None = None,
    ):
        self.process = process
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.admin_token = admin_token
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/v1"

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.admin_token:
            kwargs["headers"] = {"Authorization": f"Bearer {self.admin_token}"}
        resp = httpx.request(method, f"{self.root_url}/_admin/{path}", timeout=10, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def get_config(self) -> dict[str, Any]:
        return self._admin("GET", "config")

    def set_config(self, changes: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        """Merge ``changes`` into the config (``replace=True``: replace it)."""
        return self._admin("PUT", "config", json=changes, params={"replace": "true"} if replace else None)

    def reset(self, keep_config: bool = False) -> None:
        """Forget all files and batches; restore the start-up config unless ``keep_config``."""
        self._admin("POST", "reset", params={"keep_config": "true"} if keep_config else None)

    def client(self, **kwargs: Any):
        import openai

        kwargs.setdefault("api_key", "local")
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_server(
    data_dir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    port: int | None = None,
    startup_timeout: float = 30.0,
    admin_token: str | None = None,
    allow_upstream_change: bool = False,
) -> Iterator[RunningServer]:
    """Start ``python -m local_batch_server`` on 127.0.0.1 (free port by default), wait until it
    answers, yield a :class:`RunningServer`, stop it on exit. Its output goes to
    ``<data_dir>/server-<port>.log``. ``admin_token`` / ``allow_upstream_change``: see
    :class:`local_batch_server.config.AdminPolicy`; an admin token in the caller's environment is not
    passed on."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [sys.executable, "-m", "local_batch_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir)]
    if config is not None:
        config_path = data_dir / f"server-config-{port}.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        cmd += ["--config", str(config_path)]
    if allow_upstream_change:
        cmd.append("--allow-upstream-change")
    env = {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV}
    if admin_token is not None:
        env[ADMIN_TOKEN_ENV] = admin_token
    log_path = data_dir / f"server-{port}.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    server = RunningServer(process, port, data_dir, log_path, admin_token)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"local batch server exited with {process.returncode}:\n{server.log()}")
            try:  # any answer will do: /_admin may be refused (401/403) to a caller without the token
                httpx.get(f"{server.root_url}/_admin/config", timeout=1)
                break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"local batch server did not start in {startup_timeout}s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log_file.close()

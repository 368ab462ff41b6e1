"""Notifications: success and failure reach a webhook (through the task callbacks), without secrets."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, local_openai


@pytest.fixture
def webhook(monkeypatch):
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_BATCH_NOTIFY_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    yield received
    server.shutdown()


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory, airflow_db):
    with local_openai(tmp_path_factory.mktemp("server"), "sk-notify-secret-55") as srv:
        yield srv


def test_success_and_failure_are_notified(dag, batch_server, webhook, tmp_path):
    shutil.copytree(REPO / "data" / "sample", tmp_path / "in")
    conf = {"input_csv": str(tmp_path / "in" / "questions.csv"), "output_dir": str(tmp_path / "out"),
            "check_interval": 1}  # fmt: skip
    assert dag.test(run_conf=conf).state == "success"
    (success,) = webhook
    assert success["event"] == "success" and success["dag_id"] == "openai_batch_pipeline"
    (results,) = (tmp_path / "out" / "questions").glob("*/results.csv")
    assert str(results) in success["text"] and success["input_csv"] == conf["input_csv"]

    webhook.clear()
    assert dag.test(run_conf={**conf, "prompt_column": "nope"}).state == "failed"
    (failure,) = webhook
    assert failure["event"] == "failure" and "validate_csv" in failure["text"]
    assert "sk-notify-secret-55" not in json.dumps(success) + json.dumps(failure)

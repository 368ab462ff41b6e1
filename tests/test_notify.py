"""Notifications: success and failure reach a webhook (through the task callbacks), without secrets."""

from __future__ import annotations

import json
import logging
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


def test_a_password_in_input_csv_reaches_neither_log_nor_webhook(
    dag, batch_server, webhook, caplog, tmp_path
):
    """The validation message refuses the URL redacted; the failure notification must do the same."""
    conf = {"input_csv": "s3://AKIAXXX:SecretYYY@bucket/x.csv", "output_dir": str(tmp_path / "out")}
    with caplog.at_level(logging.INFO):
        assert dag.test(run_conf=conf).state == "failed"
    (failure,) = webhook
    assert failure["event"] == "failure" and "validate_csv" in failure["text"]
    assert "s3://***@bucket/x.csv" in failure["text"] and failure["input_csv"] == "s3://***@bucket/x.csv"
    assert "notification: " in caplog.text and "s3://***@bucket/x.csv" in caplog.text
    assert "SecretYYY" not in json.dumps(failure) and "SecretYYY" not in caplog.text


def _context(conf: dict, reason: str | None = None) -> dict:
    """What Airflow hands a callback, as far as RunNotifier reads it."""
    from types import SimpleNamespace

    run = SimpleNamespace(dag_id="openai_batch_pipeline", run_id="manual__1", conf=conf)
    return {"dag_run": run, "reason": reason}


@pytest.fixture
def failing_webhook(monkeypatch):
    """A webhook that answers 500 (echoing its path, as some do), at a Slack-style secret path."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(self.path)
            body = f"no such hook: {self.path}".encode()
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/services/T000/B000/XXXXSECRET?token=TokZZZ"
    monkeypatch.setenv("OPENAI_BATCH_NOTIFY_WEBHOOK", url)
    yield server.server_port, hits
    server.shutdown()


def test_a_failing_webhook_is_logged_by_host_only(failing_webhook, caplog):
    from openai_batch_airflow.notify import RunNotifier

    port, hits = failing_webhook
    with caplog.at_level(logging.INFO):
        RunNotifier("failure").notify(_context({"input_csv": "/data/in.csv"}, "task validate_csv failed"))
    assert hits == ["/services/T000/B000/XXXXSECRET?token=TokZZZ"]  # it was really called
    assert f"notification to the webhook at http://127.0.0.1:{port} failed: HTTP 500" in caplog.text
    assert "XXXXSECRET" not in caplog.text and "TokZZZ" not in caplog.text and "/services" not in caplog.text


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/services/T000/B000/XXXXSECRET",  # nothing listens
                                 "htp://hooks.example.com/services/XXXXSECRET",  # unsupported scheme
                                 "http://[::1/services/XXXXSECRET"])  # fmt: skip
def test_a_webhook_error_never_logs_the_url(monkeypatch, caplog, url):
    from openai_batch_airflow.notify import RunNotifier

    monkeypatch.setenv("OPENAI_BATCH_NOTIFY_WEBHOOK", url)
    with caplog.at_level(logging.INFO):
        RunNotifier("failure").notify(_context({}))  # never raises
    assert "notification to the webhook" in caplog.text and "failed" in caplog.text
    assert "XXXXSECRET" not in caplog.text


def test_every_url_in_a_notification_is_redacted():
    from openai_batch_airflow.notify import RunNotifier

    conf = {"input_csv": "https://bucket.example.com/in.csv?X-Amz-Signature=SigZZZ"}
    message = RunNotifier("failure").message(
        _context(conf, "could not read s3://AKIAXXX:SecretYYY@bucket/x.csv (token=?)")
    )
    text = json.dumps(message)
    assert "SigZZZ" not in text and "SecretYYY" not in text
    assert "https://bucket.example.com/in.csv?X-Amz-Signature=***" in message["text"]
    assert "s3://***@bucket/x.csv" in message["reason"]


def test_the_inbox_notification_names_where_the_results_landed():
    from types import SimpleNamespace

    from openai_batch_airflow.notify import RunNotifier

    outcome = {"done": ["/inbox/done/c/a.csv"], "failed": [], "results": [
        "a.csv: /out/a/inbox__c__a_1/results.csv", "b.csv: s3://conn@bucket/out/b/results.csv"]}  # fmt: skip
    ti = SimpleNamespace(task_id="settle", xcom_pull=lambda task_ids: outcome)
    run = SimpleNamespace(dag_id="openai_batch_inbox", run_id="scheduled__1", conf={})
    message = RunNotifier("success").message({"dag_run": run, "ti": ti})
    assert message["reason"] == (
        "results: a.csv: /out/a/inbox__c__a_1/results.csv; b.csv: s3://conn@bucket/out/b/results.csv"
    )
    assert "/inbox/done" not in message["text"]  # the moved inputs are not what the user looks for

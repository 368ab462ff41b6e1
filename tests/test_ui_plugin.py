"""The plugin's pages inside a real Airflow api-server (its own AIRFLOW_HOME and SQLite DB), served under a
base URL path (``/airflow``), with Airflow's own login: the "Batch report" tab of a finished run, of a
run that failed validation, of another DAG's run; the spend page; the extra link; and what a request
without a token, a user without access to the DAG, or a crafted run id gets.

Runs are made with ``airflow dags test`` in the same home against the local batch server. The auth manager
is the SimpleAuthManager with one change (it cannot deny a single DAG): user ``bob`` may not read the
pipeline DAG (``config/per_dag_auth.py`` in the home, on Airflow's path)."""

from __future__ import annotations

import html
import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from airflow_stack import AirflowStack, free_port
from conftest import REPO
from local_batch_server.testing import running_server
from s3_local import client as s3_client
from s3_local import local_s3

pytestmark = pytest.mark.slow

DAG_ID = "openai_batch_pipeline"
AUTH_MANAGER = '''
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

DENY = {"bob": {"openai_batch_pipeline"}}


class PerDagSimpleAuthManager(SimpleAuthManager):
    """SimpleAuthManager, except that a user may be denied single DAGs."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if details is not None and details.id in DENY.get(user.get_name(), set()):
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )

    def get_authorized_dag_ids(self, *, user, method="GET", session=None):
        kwargs = {"session": session} if session is not None else {}
        ids = super().get_authorized_dag_ids(user=user, method=method, **kwargs)
        return set(ids) - DENY.get(user.get_name(), set())
'''


class Site:
    def __init__(self, base: str, tokens: dict[str, str], runs: dict[str, str]):
        self.base, self.tokens = base, tokens
        # run ids: a finished run, one failed in validation, one whose results landed in S3
        self.good, self.bad, self.s3 = runs["good"], runs["bad"], runs["s3"]

    def get(self, path: str, user: str | None = None, cookie: bool = False) -> tuple[int, str]:
        status, body, _ = self.call("GET", path, user, cookie=cookie)
        return status, body

    def call(
        self, method: str, path: str, user: str | None = None, body: object = None, cookie: bool = False
    ):
        """``(status, text, headers)``."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if user is not None:
            token = self.tokens[user]
            if cookie:  # what the UI's iframe sends
                request.add_header("Cookie", f"_token={token}")
            else:
                request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, resp.read().decode("utf-8"), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace"), exc.headers


def token(base: str, user: str, password: str) -> str:
    body = json.dumps({"username": user, "password": password}).encode()
    request = urllib.request.Request(f"{base}/auth/token", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 201
        return json.load(resp)["access_token"]


def report_path(dag_id: str, run_id: str) -> str:
    return f"/openai-batch/report/{urllib.parse.quote(dag_id, safe='')}/{urllib.parse.quote(run_id, safe='')}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-plugin")
    shutil.copytree(REPO / "data" / "sample", tmp / "in")
    home = tmp / "airflow"
    (home / "config").mkdir(parents=True)
    (home / "config" / "per_dag_auth.py").write_text(AUTH_MANAGER)
    passwords = {name: secrets.token_urlsafe(12) for name in ("admin", "bob", "ursula")}
    (tmp / "passwords.json").write_text(json.dumps(passwords))
    port = free_port()
    base = f"http://127.0.0.1:{port}/airflow"
    with (
        running_server(tmp / "server", config={"in_progress_seconds": 0.2}) as server,
        local_s3(tmp) as (endpoint, bucket),  # its connection s3_test: in the stack's environment
    ):
        conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-ui-plugin-test"}
        stack = AirflowStack(
            home,
            api_port=port,
            extra_env={
                "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn),
                "AIRFLOW__API__BASE_URL": base,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
                "AIRFLOW__CORE__AUTH_MANAGER": "per_dag_auth.PerDagSimpleAuthManager",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,bob:viewer,ursula:user",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp / "passwords.json"),
                "OPENAI_BATCH_RETRY_DELAY_SECONDS": "1",
            },
        )
        with stack:
            stack.migrate()
            out = tmp / "out"
            common = {"output_dir": str(out), "check_interval": 1, "image_column": "image"}
            confs = {
                "good": {"input_csv": str(tmp / "in" / "questions.csv"), **common},
                "bad": {"input_csv": str(tmp / "in" / "questions.csv"), **common, "image_column": "picture"},
                "s3": {"input_csv": str(tmp / "in" / "questions.csv"), **common, "end_row": 5,
                       "output_dir": f"s3://{bucket}/results", "storage_conn_id": "s3_test"},
            }  # fmt: skip
            runs = {}
            for name, conf in confs.items():
                done = stack.airflow("dags", "test", DAG_ID, "-c", json.dumps(conf), check=False, timeout=600)
                ((run_id, state),) = stack._query(
                    "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", DAG_ID
                )
                assert state == ("failed" if name == "bad" else "success"), (
                    done.stdout[-3000:] + done.stderr[-3000:]
                )
                runs[name] = run_id
            stack.start("api-server")
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(stack.log_tail("api-server")) from None
                    time.sleep(1)
            tokens = {user: token(base, user, pw) for user, pw in passwords.items()}
            web = Site(base, tokens, runs)
            web.s3_client, web.bucket = s3_client(endpoint), bucket
            web.stack, web.server, web.conf = stack, server, confs["good"]
            yield web, out


def test_the_report_tab_of_a_finished_run_shows_its_report(site):
    web, out = site
    status, page = web.get(report_path(DAG_ID, web.good), "admin")
    assert status == 200, page
    assert page.startswith("<!DOCTYPE html>") and "Batch run report" in page
    assert '<div id="count-rows"><b>30</b>rows</div>' in page
    assert '<div id="count-answered"><b>27</b>answered</div>' in page
    assert "cost at Batch prices (USD)" in page and "cdn" not in page.lower() and "<script" not in page
    # the UI's iframe carries the _token cookie, not a header
    status, same = web.get(report_path(DAG_ID, web.good), "admin", cookie=True)
    assert status == 200 and same == page
    (found,) = out.glob("questions/*/report.html")
    assert found.read_text(encoding="utf-8") == page  # the file that landed, read through storage


def test_a_run_with_results_in_s3_shows_its_report(site):
    web, _ = site
    status, page = web.get(report_path(DAG_ID, web.s3), "admin")
    assert status == 200, page
    listed = web.s3_client.list_objects_v2(Bucket=web.bucket, Prefix="results/")["Contents"]
    (key,) = [o["Key"] for o in listed if o["Key"].endswith("/report.html")]
    stored = web.s3_client.get_object(Bucket=web.bucket, Key=key)["Body"].read().decode()
    assert page == stored and '<div id="count-rows"><b>5</b>rows</div>' in page


def test_a_run_that_failed_validation_shows_the_message_not_a_traceback(site):
    web, _ = site
    status, page = web.get(report_path(DAG_ID, web.bad), "admin")
    assert status == 200, page
    assert 'id="validation-message"' in page and html.escape("column 'picture' not found") in page
    assert "Traceback" not in page and "Nothing was uploaded or paid for" in page


def test_no_token_a_bad_token_and_a_user_without_the_dag_are_refused(site):
    web, _ = site
    for path in (report_path(DAG_ID, web.good), "/openai-batch/spend"):
        status, body = web.get(path)
        assert status == 401 and "Not authenticated" in body
    web.tokens["forged"] = web.tokens["admin"][:-4] + "AAAA"
    assert web.get(report_path(DAG_ID, web.good), "forged")[0] in (401, 403)
    status, body = web.get(report_path(DAG_ID, web.good), "bob")
    assert status == 403 and "27" not in body
    status, body = web.get(report_path(DAG_ID, web.good), "bob", cookie=True)
    assert status == 403
    # bob may read other DAGs: their runs get the harmless note, not the pipeline's report
    status, page = web.get("/openai-batch/spend", "bob")
    assert status == 200 and 'id="no-runs"' in page and web.good not in page


def test_crafted_ids_never_reach_a_file(site):
    web, _ = site
    for dag_id, run_id in (
        (DAG_ID, "../../../../etc/passwd"),
        (DAG_ID, web.good + "/../" + web.bad),
        ("../openai_batch_pipeline", web.good),
        (DAG_ID, "%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
    ):
        status, body = web.get(report_path(dag_id, run_id), "admin")
        assert status in (403, 404), (dag_id, run_id, status)
        assert "root:" not in body
    status, body = web.get("/openai-batch/report/" + DAG_ID + "/..%2F..%2Fetc%2Fpasswd", "admin")
    assert status in (403, 404) and "root:" not in body
    status, body = web.get("/openai-batch/spend?start=../../etc", "admin")
    assert status in (400, 422) and "root:" not in body


def test_another_dags_run_gets_a_note(site):
    web, _ = site
    status, page = web.get(report_path("openai_batch_inbox", web.good), "admin")
    assert status == 404 and "No run" in page  # no such run of that DAG


def test_the_spend_page_lists_the_run_with_its_cost(site):
    web, _ = site
    status, page = web.get("/openai-batch/spend", "admin")
    assert status == 200, page
    assert web.good in page and web.bad not in page  # a run that never merged spent nothing
    assert 'id="total-runs"><b>2</b>' in page and 'id="daily"' in page and web.s3 in page
    link = "report/openai_batch_pipeline/" + urllib.parse.quote(web.good, safe="")
    assert f'href="{link}"' in page
    assert web.get("/openai-batch/" + link, "admin")[0] == 200  # relative to the spend page
    status, page = web.get("/openai-batch/spend?model=no-such-model&start=2020-01-01", "admin")
    assert status == 200 and 'id="no-runs"' in page
    status, page = web.get("/openai-batch/spend?input=questions", "admin")
    assert status == 200 and web.good in page


def test_views_and_extra_link_are_registered(site):
    web, _ = site
    status, body = web.get("/api/v2/plugins", "admin")
    assert status == 200
    views = [
        v for p in json.loads(body)["plugins"] if p["name"] == "openai_batch" for v in p["external_views"]
    ]
    assert {(v["name"], v["destination"], v["href"]) for v in views} == {
        ("Batch report", "dag_run", "openai-batch/report/{DAG_ID}/{RUN_ID}"),
        ("Batch spend", "nav", "openai-batch/spend"),
    }
    run = urllib.parse.quote(web.good, safe="")
    status, body = web.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run}/taskInstances/merge/links", "admin")
    assert status == 200, body
    links = json.loads(body)["extra_links"]
    assert links == {"Batch report": f"dags/{DAG_ID}/runs/{run}/plugin/batch-report"}
    waiting = f"/api/v2/dags/{DAG_ID}/dagRuns/{run}/taskInstances/wait_for_batch/links?map_index=0"
    status, body = web.get(waiting, "admin")
    assert status == 200 and json.loads(body)["extra_links"] == links, body  # the waiting task's too
    # relative to the base URL: the link resolves under /airflow, where the tab is
    assert urllib.parse.urljoin(web.base + "/", links["Batch report"]).startswith(web.base + "/dags/")


def test_the_plugin_is_loaded_once_from_its_entry_point(site):
    web, _ = site
    status, body = web.get("/api/v2/importErrors", "admin")
    assert status == 200 and json.loads(body)["total_entries"] == 0
    status, body = web.get("/api/v2/plugins", "admin")
    names = [p["name"] for p in json.loads(body)["plugins"]]
    assert names.count("openai_batch") == 1
    assert Path(REPO / "plugins" / ".airflowignore").read_text().count("openai_batch_airflow/") == 1


def test_a_record_someone_else_wrote_never_serves_another_file(site, tmp_path):
    # ursula (role "user") may write XComs: she plants a summary naming a page of her own, with a script
    web, out = site
    evil = out / "questions" / "evil" / "report.html"
    evil.parent.mkdir(parents=True)
    evil.write_text("<html><script>fetch('/api/v2/connections')</script>stolen</html>")
    run = urllib.parse.quote(web.good, safe="")
    entry = f"/api/v2/dags/{DAG_ID}/dagRuns/{run}/taskInstances/merge/xcomEntries/batch_report"
    status, original, _ = web.call("GET", entry + "?deserialize=true", "admin")
    assert status == 200, original
    original = json.loads(original)["value"]
    planted = {**original, "report_html": str(evil)}
    status, body, _ = web.call("PATCH", entry, "ursula", {"value": planted, "map_index": -1})
    assert status == 200, body
    try:
        status, page, headers = web.call("GET", report_path(DAG_ID, web.good), "admin")
        assert status == 200 and 'id="unreadable"' in page and "stolen" not in page and "<script" not in page
        assert str(out) not in page and "allowed roots" not in page  # the detail is in the server's log
        assert (
            "sandbox" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
        )
        # numbers that are not numbers: the spend page still adds up the others
        junk = {**original, "rows": "lots", "cost_usd": "x", "model": ["a"], "input": "y" * 5000}
        assert web.call("PATCH", entry, "ursula", {"value": junk, "map_index": -1})[0] == 200
        status, page = web.get("/openai-batch/spend", "admin")
        assert status == 200 and "y" * 1001 not in page
    finally:
        assert web.call("PATCH", entry, "admin", {"value": original, "map_index": -1})[0] == 200
    status, page, headers = web.call("GET", report_path(DAG_ID, web.good), "admin")
    assert status == 200 and "Batch run report" in page and "sandbox" in headers["Content-Security-Policy"]


def test_a_run_still_going_shows_its_batches_as_the_api_gives_them_now(site, tmp_path):
    # (last in the module: it adds a run)
    web, _ = site
    stack = web.stack
    web.server.set_config({"in_progress_seconds": 8})
    conf = {**web.conf, "output_dir": str(tmp_path / "out")}
    with open(tmp_path / "dags-test.log", "wb") as log:
        command = [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)]
        proc = subprocess.Popen(command, env=stack.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            rows = stack._query(
                "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", DAG_ID
            )
            run_id = rows[0][0]
            if run_id not in (web.good, web.bad, web.s3):
                status, page = web.get(report_path(DAG_ID, run_id), "admin")
                if status == 200 and "<td>in_progress</td>" in page:
                    break
            time.sleep(0.5)
        assert "<td>in_progress</td>" in page, page[-3000:]
        assert "Batch report: run in progress" in page and 'id="run-state"' in page
        assert "<td>28</td>" in page  # the batch's total, as the API gives it
        assert 'id="estimate"' in page and "Cost estimate" in page
        assert proc.wait(timeout=180) == 0, (tmp_path / "dags-test.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        web.server.set_config({"in_progress_seconds": 0.2})
    status, page = web.get(report_path(DAG_ID, run_id), "admin")
    assert status == 200 and "Batch run report" in page  # merged: the report itself

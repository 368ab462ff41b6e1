"""The trigger form of the real Airflow 3 UI, driven by a real browser.

A full Airflow stack (api-server, scheduler, dag-processor, triggerer) runs with the
SimpleAuthManager and a real login (user ``admin`` with a known password written to the
passwords file before the api-server starts). Headless Chromium logs in, opens the DAG, opens
the Trigger dialog and checks what the params render as:

* sections (``Param(section=...)``) are accordion items, one open at a time;
* each param's ``title`` is its label and its ``description`` the help text under the widget;
* ``enum`` params are dropdowns (react-select comboboxes) listing the enum values;
* ``format="multiline"`` strings are ``<textarea rows=6>``;
* a string with ``examples`` (the model) is a text input with a ``<datalist>`` of suggestions;
* the required ``input_csv`` (no default) blocks the Trigger button until it is filled;
* the ``type: object`` param ``response_schema`` is a JSON code editor (Monaco), not a textbox.

It then fills the form (input CSV, image column, image detail, an answer schema pasted into the
``response_schema`` editor, check interval 1 s, output folder, run id), saves screenshots to
``test-artifacts/``, submits, checks the stored conf (the schema arrives as a JSON object), and
waits for the run to succeed and ``results.csv`` to land: the schema's properties are columns
(in schema order, between the input columns and ``response``) filled on every answered row, and
``results.parquet`` beside it has them typed (string, double, bool, list<string>).

Note: in Airflow 3.3 the labels of text inputs/textareas are not tied to the widget (the input's
id ``element_<param>`` overrides the id the label points to), so ``get_by_label`` finds only the
number inputs and dropdowns; the test finds each field by its label text inside the field's
``role=group`` container instead.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import secrets
import shutil
import sqlite3
import time

import pytest

from airflow_stack import AirflowStack
from conftest import REPO
from local_batch_server.testing import running_server

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

DAG_ID = "openai_batch_pipeline"
RUN_ID = "ui_form"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
SECTIONS = ["Input", "Model and request", "Batching", "Cost", "Output"]
INPUT_COLUMNS = ["id", "prompt", "image", "zip"]  # data/sample/questions.csv
SENTIMENTS = ["positive", "negative", "neutral"]
# pasted into the form's "Answer schema (JSON Schema)" editor: one answer column per property
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": SENTIMENTS},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "needs_follow_up": {"type": "boolean"},
        "keywords": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "confidence", "needs_follow_up", "keywords"],
    "additionalProperties": False,
}
ANSWER_COLUMNS = list(SCHEMA["properties"])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    shutil.copytree(REPO / "data" / "sample", tmp / "in")
    password = secrets.token_urlsafe(12)
    # The SimpleAuthManager keeps passwords already in this file and only generates missing ones.
    passwords = tmp / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    with running_server(tmp / "server", config={"in_progress_seconds": 0.3}) as server:
        conn = {"conn_type": "openai", "host": server.base_url, "password": "sk-ui-form-test"}
        stack = AirflowStack(
            tmp / "airflow",
            extra_env={
                "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(conn),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            },
        )
        with stack:
            stack.migrate()
            stack.start()
            stack.wait_healthy()
            stack.wait_dag(DAG_ID)
            assert json.loads(passwords.read_text()) == {"admin": password}
            yield tmp, stack, password


@pytest.fixture
def page():
    ARTIFACTS.mkdir(exist_ok=True)
    for stale in ARTIFACTS.glob("trigger-*-failure.*"):
        stale.unlink()
    # The api-server shares one SQLite file with a busy scheduler: a POST can take seconds.
    expect.set_options(timeout=30_000)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            # tall enough for the dialog with one open section to fit in a screenshot
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()
            expect.set_options(timeout=5_000)  # Playwright's default, for other tests


@contextlib.contextmanager
def artifacts_on_failure(page, stack: AirflowStack, name: str):
    """On any failure: save a screenshot and the page HTML, and fail with the Airflow log tails."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
        with contextlib.suppress(Exception):
            (ARTIFACTS / f"{name}-failure.html").write_text(page.content(), encoding="utf-8")
        logs = "\n".join(
            f"--- {proc} ---\n{stack.log_tail(proc, 40)}" for proc in ("api-server", "scheduler", "triggerer")
        )
        raise AssertionError(
            f"{type(exc).__name__}: {exc}\n(page: {page.url}; screenshot and HTML in {ARTIFACTS})\n{logs}"
        ) from exc


def field(dialog, title: str):
    """The form row (label, widget, help text) whose label reads ``title`` (plus `` *`` if required)."""
    # (a ``has=`` locator is resolved inside each candidate, so it starts from the page)
    label = dialog.page.locator("label").filter(has_text=re.compile(rf"^\s*{re.escape(title)}\s*\*?\s*$"))
    return dialog.get_by_role("group").filter(has=label)


def open_section(dialog, name: str) -> None:
    button = dialog.get_by_role("button", name=name, exact=True)
    if button.get_attribute("aria-expanded") != "true":
        button.click()
    expect(button).to_have_attribute("aria-expanded", "true")


def check_row(dialog, title: str, description: str, role: str):
    row = field(dialog, title)
    expect(row).to_have_count(1)
    expect(row).to_be_visible()
    expect(row.get_by_text(description, exact=True)).to_be_visible()
    widget = row.get_by_role(role)
    expect(widget).to_have_count(1)
    return widget


def choose(page, dialog, title: str, options: list[str], pick: str) -> None:
    """Open the dropdown of ``title``, check it lists ``options`` and pick one."""
    combo = field(dialog, title).get_by_role("combobox")
    combo.click()
    listed = page.get_by_role("option")
    expect(listed).to_have_text(options)
    listed.filter(has_text=re.compile(rf"^{re.escape(pick)}$")).click()
    expect(field(dialog, title)).to_contain_text(pick)


def test_trigger_form_renders_params_and_runs_the_pipeline(env, page):
    tmp, stack, password = env
    base = f"http://127.0.0.1:{stack.api_port}"
    csv_path = tmp / "in" / "questions.csv"
    out_dir = tmp / "out"
    started = time.monotonic()

    with artifacts_on_failure(page, stack, "trigger-form"):
        log_in(page, base, password)

        # -- open the DAG and its trigger form ---------------------------------------------------
        page.get_by_role("link", name="Dags", exact=True).first.click()
        page.get_by_role("link", name=DAG_ID, exact=True).first.click()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}"))
        expect(page.get_by_text("validate_csv").first).to_be_visible()  # the DAG page, with its grid
        # the header's labelled button (DAG lists also have icon-only "Trigger Dag" buttons)
        page.get_by_role("button", name="Trigger Dag", exact=True).filter(has_text="Trigger").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text(f"Trigger Dag - {DAG_ID}")).to_be_visible()

        # Param sections are accordion items, in DAG order, before the UI's own "Advanced Options".
        triggers = dialog.locator("[data-part=item-trigger]")
        expect(triggers).to_have_text([*SECTIONS, "Advanced Options"])
        submit = dialog.get_by_role("button", name="Trigger", exact=True)
        expect(submit).to_be_disabled()  # required input_csv (no default) is empty

        # -- Input: titles, descriptions, a required text input, a multiline textarea ------------
        open_section(dialog, "Input")
        input_csv = check_row(
            dialog,
            "Input CSV",
            "Path or URL (s3://bucket/x.csv, ...) of the CSV of prompts. Relative image paths resolve "
            "against its folder.",
            "textbox",
        )
        expect(field(dialog, "Input CSV").locator("label")).to_contain_text("*")  # required marker
        expect(input_csv).to_have_attribute("required", "")
        template = check_row(
            dialog,
            "Prompt template",
            "Optional. Text with {column} placeholders filled from each row; {{ and }} are literal "
            "braces. Overrides the prompt column.",
            "textbox",
        )
        assert template.evaluate("el => el.tagName") == "TEXTAREA"
        expect(template).to_have_attribute("rows", "6")
        prompt_column = check_row(
            dialog,
            "Prompt column",
            "Column holding the prompt text (ignored when a prompt template is given).",
            "textbox",
        )
        expect(prompt_column).to_have_value("prompt")
        input_csv.fill(str(csv_path))
        field(dialog, "Image column").get_by_role("textbox").fill("image")
        expect(submit).to_be_enabled()

        # -- Model and request: enums are dropdowns, system prompt is a textarea -------------------
        open_section(dialog, "Model and request")
        expect(field(dialog, "Input CSV")).to_be_hidden()  # one section open at a time
        # an <input list=...> is a combobox to assistive technology; its value stays free text
        model = check_row(dialog, "Model", "One model per run.", "combobox")
        assert model.evaluate("el => el.tagName") == "INPUT"
        expect(model).to_have_value("gpt-4o")
        # the shipped price table's models are suggestions (a datalist), any other name is taken too
        shipped = list(json.loads((REPO / "include" / "batchpipe" / "prices.json").read_text())["models"])
        expect(model).to_have_attribute("list", "list_model")
        suggested = dialog.locator("datalist#list_model > option")
        assert suggested.evaluate_all("els => els.map(e => e.value)") == shipped
        model.fill("my-fine-tuned-model")
        expect(model).to_have_value("my-fine-tuned-model")
        expect(submit).to_be_enabled()
        model.fill("gpt-4o")
        check_row(
            dialog,
            "Endpoint",
            "Batch endpoint. Embeddings return the vector as JSON in the response column.",
            "combobox",
        )
        expect(field(dialog, "Endpoint")).to_contain_text("/v1/chat/completions")
        choose(
            page,
            dialog,
            "Endpoint",
            ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"],
            "/v1/chat/completions",
        )
        check_row(dialog, "Image detail", "Vision detail level; low is cheapest.", "combobox")
        choose(page, dialog, "Image detail", ["auto", "low", "high"], "low")
        system_prompt = check_row(
            dialog,
            "System prompt",
            "Optional system (or, for /v1/responses, instructions) text for every request.",
            "textbox",
        )
        assert system_prompt.evaluate("el => el.tagName") == "TEXTAREA"
        # a JSON object param is a Monaco code editor; paste the schema into it as a user would
        check_row(
            dialog,
            "Answer schema (JSON Schema)",
            "Optional. Every answer is JSON following this schema (strict structured outputs) and each "
            'top-level property becomes a results column, e.g. {"type": "object", "properties": '
            '{"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]}, "score": '
            '{"type": "number"}}, "required": ["sentiment", "score"]}. Every property must be listed in '
            '"required" (allow null for an optional one); "additionalProperties": false is added where '
            "missing. Checked before anything is uploaded. Not for /v1/embeddings.",
            "textbox",
        )
        editor = field(dialog, "Answer schema (JSON Schema)").locator(".monaco-editor")
        expect(editor).to_be_visible()
        expect(editor.locator(".view-lines")).to_have_text("{}")  # an unset (null) object shows {}
        # A real paste (clipboard, Ctrl+V). Not keyboard.insert_text: Monaco takes that as typing, one
        # character at a time, and typing { or " over a selection wraps the selection ("surround
        # selection") instead of replacing it, which leaves a stray "} behind.
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        page.evaluate("text => navigator.clipboard.writeText(text)", json.dumps(SCHEMA))
        editor.locator(".view-lines").click()
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.press("ControlOrMeta+v")
        # parsed, the value is shown again pretty-printed: the one pasted line becomes many
        expect(
            editor.locator(".view-line").filter(has_text=re.compile(r'^\s*"type":\s*"object",$'))
        ).to_have_count(1)
        expect(field(dialog, "Answer schema (JSON Schema)").get_by_text("SyntaxError")).to_have_count(0)
        expect(submit).to_be_enabled()
        page.screenshot(path=str(ARTIFACTS / "trigger-form-model.png"))

        # -- Batching: number input for check_interval ---------------------------------------------
        open_section(dialog, "Batching")
        interval = check_row(
            dialog,
            "Check interval (s)",
            "Seconds between status checks while waiting (done by the triggerer).",
            "spinbutton",
        )
        expect(interval).to_have_value("60")
        interval.fill("1")
        interval.blur()
        expect(interval).to_have_value("1")
        check_row(dialog, "Completion window", "The Batch API accepts only 24h.", "combobox")
        page.screenshot(path=str(ARTIFACTS / "trigger-form-batching.png"))

        # -- Output, and the run id under the UI's Advanced Options --------------------------------
        open_section(dialog, "Output")
        check_row(
            dialog,
            "Output folder",
            "Where results land: a local path or a URL such as s3://bucket/results. Empty: "
            "Variable openai_batch_output_dir, else env OPENAI_BATCH_OUTPUT_DIR, else "
            "$AIRFLOW_HOME/openai_batch_results.",
            "textbox",
        ).fill(str(out_dir))
        check_row(
            dialog,
            "Storage connection",
            "Airflow connection for object-storage URLs in input_csv, output_dir and work_dir "
            "(e.g. an aws connection for s3://). Empty: a connection named in the URL itself "
            "(s3://conn_id@bucket/...), else the filesystem's default credentials.",
            "textbox",
        )
        open_section(dialog, "Advanced Options")
        dialog.get_by_label("Run ID").fill(RUN_ID)
        expect(dialog.get_by_text("Configuration JSON")).to_be_visible()

        # the filled Input section is the screenshot of record
        open_section(dialog, "Input")
        expect(field(dialog, "Input CSV").get_by_role("textbox")).to_have_value(str(csv_path))
        page.screenshot(path=str(ARTIFACTS / "trigger-form.png"))

        # -- submit ----------------------------------------------------------------------------
        submit.click()
        expect(page.get_by_text("Dag Run Triggered").first).to_be_visible()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/{RUN_ID}"))
    form_seconds = time.monotonic() - started

    # -- the run, as triggered from the form --------------------------------------------------
    with sqlite3.connect(stack.db, timeout=30) as con:
        raw, run_type, user = con.execute(
            "SELECT conf, run_type, triggering_user_name FROM dag_run WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, RUN_ID),
        ).fetchone()
    assert (run_type, user) == ("manual", "admin")  # triggered by the logged-in user
    conf = json.loads(raw)
    assert {
        k: conf[k] for k in ("input_csv", "image_column", "image_detail", "check_interval", "output_dir")
    } == {
        "input_csv": str(csv_path),
        "image_column": "image",
        "image_detail": "low",
        "check_interval": 1,
        "output_dir": str(out_dir),
    }, conf
    assert conf["endpoint"] == "/v1/chat/completions" and conf["system_prompt"] is None
    assert conf["response_schema"] == SCHEMA, conf  # a JSON object, not the pasted text

    try:
        state = stack.wait_run(DAG_ID, RUN_ID, timeout=300)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{stack.log_tail('scheduler')}\n{stack.log_tail('triggerer')}") from exc
    assert state == "success", (
        f"{stack.task_states(DAG_ID, RUN_ID)}\n{stack.log_tail('scheduler')}\n{stack.log_tail('triggerer')}"
    )
    with artifacts_on_failure(page, stack, "trigger-run"):
        page.reload()
        expect(page.get_by_text(RUN_ID).first).to_be_visible()
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        expect(page.get_by_text("Triggering User")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "trigger-run.png"))

    results = out_dir / "questions" / RUN_ID / "results.csv"
    assert results.is_file(), sorted(str(p) for p in out_dir.rglob("*"))
    with open(results, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    # the answer columns, in schema order, right after the input columns
    leading = [*INPUT_COLUMNS, *ANSWER_COLUMNS, "response"]
    assert header[: len(leading)] == leading, header
    answered = [r for r in rows if r["response"]]
    assert len(rows) == 30 and len(answered) == 27
    for r in answered:  # every answer followed the schema, so every answered row has typed-looking cells
        assert r["error"] == "" and json.loads(r["response"])["sentiment"] == r["sentiment"], r
        assert r["sentiment"] in SENTIMENTS and r["needs_follow_up"] in ("true", "false"), r
        assert re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", r["confidence"]), r
        assert 0 <= float(r["confidence"]) <= 1, r
        keywords = json.loads(r["keywords"])
        assert isinstance(keywords, list) and keywords and all(isinstance(k, str) for k in keywords), r
    assert all(r[c] == "" for r in rows if not r["response"] for c in ANSWER_COLUMNS)
    # results.parquet beside it: the same rows, the answer columns typed from the schema
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(results.with_name("results.parquet"))
    assert table.column_names == header and table.num_rows == 30
    kinds = {c: table.schema.field(c).type for c in ANSWER_COLUMNS}
    assert kinds == {"sentiment": pa.string(), "confidence": pa.float64(), "needs_follow_up": pa.bool_(),
                     "keywords": pa.list_(pa.string())}  # fmt: skip
    for r, typed in zip(rows, table.to_pylist(), strict=True):
        assert typed["id"] == r["id"] and typed["sentiment"] == (r["sentiment"] or None)
        assert typed["confidence"] == (float(r["confidence"]) if r["confidence"] else None)
        assert typed["needs_follow_up"] == ({"true": True, "false": False}.get(r["needs_follow_up"]))
        assert typed["keywords"] == (json.loads(r["keywords"]) if r["keywords"] else None)
    assert stack.xcom(DAG_ID, RUN_ID, "merge") == str(results)
    total = time.monotonic() - started
    print(f"form filled and submitted in {form_seconds:.0f}s; run succeeded {total:.0f}s after login")


def log_in(page, base: str, password: str) -> None:
    page.goto(base + "/")
    page.wait_for_url(re.compile(r"/auth/login"))
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)


def test_the_run_report_tab_and_the_spend_page_inside_the_ui(env, page):
    """After the form's run: its "Batch report" tab shows the report (counts, cost) inside Airflow, and the
    "Batch spend" page lists the run with its cost (the plugin's pages in the UI's iframes)."""
    tmp, stack, password = env
    base = f"http://127.0.0.1:{stack.api_port}"
    if stack.run_state(DAG_ID, RUN_ID) != "success":
        pytest.skip("needs the run the form test triggers")
    with artifacts_on_failure(page, stack, "report-tab"):
        log_in(page, base, password)
        page.goto(f"{base}/dags/{DAG_ID}/runs/{RUN_ID}")
        page.get_by_role("link", name="Batch report").or_(
            page.get_by_role("tab", name="Batch report")
        ).first.click()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/{RUN_ID}/plugin/batch-report"))
        report = page.frame_locator("iframe[title='Batch report']")
        expect(report.locator("h1")).to_have_text("Batch run report")
        expect(report.locator("#count-rows")).to_contain_text("30")
        expect(report.locator("#count-answered")).to_contain_text("27")
        expect(report.get_by_text("cost at Batch prices (USD)")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "report-tab.png"), full_page=True)

    with artifacts_on_failure(page, stack, "spend-page"):
        page.goto(f"{base}/plugin/batch-spend")
        spend = page.frame_locator("iframe[title='Batch spend']")
        expect(spend.locator("h1")).to_have_text("Batch spend")
        expect(spend.locator("#runs")).to_contain_text(RUN_ID)
        expect(spend.locator("#total-runs")).to_contain_text("1")
        expect(spend.locator("#total-cost b")).to_have_text(re.compile(r"^\$\d"))
        page.screenshot(path=str(ARTIFACTS / "spend-page.png"), full_page=True)
        # the run's link opens its report in the page (a sandboxed iframe may not navigate the window)
        spend.get_by_role("link", name=RUN_ID).click()
        expect(spend.locator("h1")).to_have_text("Batch run report")
        expect(spend.locator("#count-answered")).to_contain_text("27")

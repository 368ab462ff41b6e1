"""Pre-flight checks of ``validate_csv`` (issue 12 items 1, 2, 4): a misspelled model, an unknown conf key and
an output folder that cannot be written fail the run once (no retries), before anything is uploaded, with a
message that says what to fix. Whole runs with ``dag.test()`` against the local batch server; the model check
itself against the same server over real HTTP; the CLI and the inbox's defaults refuse unknown keys too."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from conftest import run_pipeline as run

SECRET = "sk-preflight-tests-secret-7c2d"


def failed_once_before_upload(dr, tis, srv, capfd) -> str:
    """The run failed in validate_csv at its first try (no retry), nothing went on, nothing was uploaded.
    Returns what the run logged."""
    states = {key: ti.state for key, ti in tis.items()}
    assert dr.state == "failed" and states[("validate_csv", -1)] == "failed", states
    assert tis[("validate_csv", -1)].try_number == 1, "retried: the failure should be final"
    assert states[("build_jsonl", -1)] == "upstream_failed", states
    assert srv.client().files.list().data == []  # nothing uploaded, nothing billed
    return "".join(capfd.readouterr())


def client(srv, **kwargs):
    import openai

    return openai.OpenAI(base_url=srv.base_url, api_key=SECRET, **kwargs)


# -- item 1: the model ----------------------------------------------------------------------------
def test_a_misspelled_model_fails_once_before_upload_naming_the_closest(dag, srv, tmp_path, sample, capfd):
    dr, tis = run(dag, tmp_path, sample, model="gpt-4o-mnii")
    logged = failed_once_before_upload(dr, tis, srv, capfd)
    assert "model 'gpt-4o-mnii' is not known to connection 'openai_default'" in logged
    assert "did you mean 'gpt-4o-mini'" in logged


def test_check_model_names_the_three_closest_known_models(srv):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_model

    check_model(client(srv), "gpt-4o-mini", "openai_default")  # known: nothing happens
    with pytest.raises(AirflowFailException) as err:
        check_model(client(srv), "gpt-4o-mnii", "openai_default")
    message = str(err.value)
    assert message.startswith("model 'gpt-4o-mnii' is not known to connection 'openai_default'")
    hint = message.split("did you mean ", 1)[1].split("?", 1)[0]
    assert hint.startswith("'gpt-4o-mini'") and hint.count("'") == 6, message  # three names, closest first


@pytest.mark.parametrize(
    "model",
    ["../files", "gpt-4o/../../files", "a/b", "x?limit=1", "tab\there", "é" * 5000, "."],
    ids=["dot-dot", "dots-inside", "slash", "query", "control", "huge", "dot"],
)
def test_a_hostile_model_name_is_unknown_and_quoted_shortened(srv, model):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_model

    with pytest.raises(AirflowFailException) as err:
        check_model(client(srv), model, "openai_default")
    message = str(err.value)
    assert "is not known to connection 'openai_default'" in message
    assert len(message) < 600 and "\t" not in message


@pytest.mark.parametrize(
    ("faults", "warning"),
    [
        ([{"path": "^/v1/models", "status": 401, "times": None}], "the key may not read models"),
        ([{"path": "^/v1/models", "status": 403, "times": None}], "the key may not read models"),
        ([{"path": "^/v1/models", "status": 500, "times": None}], "HTTP 500"),
        ([{"path": "^/v1/models", "status": 429, "times": None}], "HTTP 429"),
        # an OpenAI-compatible server without /v1/models (404 with no model_not_found code, nothing listed)
        ([{"path": "^/v1/models", "status": 404, "times": None}], "serves no model list"),
    ],
    ids=["401", "403", "500", "429", "no-models-endpoint"],
)
def test_a_model_that_cannot_be_checked_is_a_warning_not_a_failure(srv, caplog, faults, warning):
    from openai_batch_airflow.preflight import check_model

    srv.set_config({"http_faults": faults})
    with caplog.at_level(logging.WARNING, logger="openai_batch_airflow.preflight"):
        check_model(client(srv), "gpt-4o-mnii", "openai_default")
    (record,) = [r for r in caplog.records if r.name == "openai_batch_airflow.preflight"]
    assert record.levelno == logging.WARNING
    assert "model 'gpt-4o-mnii' not checked" in record.getMessage() and warning in record.getMessage()


def test_a_flaky_models_endpoint_is_asked_again(srv, caplog):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_model

    srv.set_config({"http_faults": [{"path": "^/v1/models", "status": 503, "times": 2}]})
    with pytest.raises(AirflowFailException, match="gpt-4o-mnii"):  # the third answer is the real one
        check_model(client(srv), "gpt-4o-mnii", "openai_default")


def test_an_unreachable_api_is_a_warning(caplog):
    import openai

    from local_batch_server.testing import free_port
    from openai_batch_airflow.preflight import check_model

    down = openai.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=SECRET)
    with caplog.at_level(logging.WARNING, logger="openai_batch_airflow.preflight"):
        check_model(down, "gpt-4o", "openai_default")
    assert "model 'gpt-4o' not checked" in caplog.text and "connection" in caplog.text.lower()


def test_an_unknown_model_with_a_key_that_may_not_list_models_still_fails(srv):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_model

    # GET /v1/models/{model} says model_not_found; GET /v1/models is refused
    srv.set_config({"http_faults": [{"method": "GET", "path": "^/v1/models$", "status": 403, "times": None}]})
    with pytest.raises(AirflowFailException) as err:
        check_model(client(srv), "gpt-4o-mnii", "openai_default")
    assert "model 'gpt-4o-mnii' is not known" in str(err.value) and "did you mean" not in str(err.value)


def test_a_run_goes_on_when_the_key_may_not_read_models(dag, srv, tmp_path, sample, caplog):
    srv.set_config({"http_faults": [{"path": "^/v1/models", "status": 403, "times": None}]})
    dr, tis = run(dag, tmp_path, sample, model="gpt-4o-mnii", estimate_only=True)
    assert tis[("validate_csv", -1)].state == "success", {k: ti.state for k, ti in tis.items()}
    assert "model 'gpt-4o-mnii' not checked: the key may not read models (HTTP 403)" in caplog.text


@pytest.mark.parametrize("off", ["false", "0", "off", " No "])
def test_the_model_check_can_be_turned_off_for_servers_that_name_models_otherwise(srv, monkeypatch, off):
    # e.g. a gateway or Azure-style deployment names that its GET /v1/models does not list
    from openai_batch_airflow import tasks
    from openai_batch_airflow.config import RunConfig

    def check_model(params):  # the switch is read where the run's settings are resolved
        tasks.check_model(RunConfig.resolve({"input_csv": "q.csv", **params}, "manual__1"))

    tripwire = {"method": "GET", "path": "^/v1/models", "status": 418, "times": 1}
    srv.set_config({"http_faults": [tripwire]})
    monkeypatch.setenv("OPENAI_BATCH_CHECK_MODEL", off)
    check_model({"model": "my-deployment", "conn_id": "openai_default"})
    assert len(srv.get_config()["http_faults"]) == 1  # the API was not asked
    monkeypatch.setenv("OPENAI_BATCH_CHECK_MODEL", "true")
    check_model({"model": "my-deployment", "conn_id": "openai_default"})  # asked: a 418 is only a warning
    assert srv.get_config()["http_faults"] == []


def test_the_form_suggests_the_shipped_models_and_takes_any_name(dag):
    import json

    shipped = list(json.loads((REPO / "include" / "batchpipe" / "prices.json").read_text())["models"])
    param = dag.params.get_param("model")
    assert param.schema["examples"] == shipped and "gpt-4o-mini" in shipped
    assert "enum" not in param.schema
    assert param.resolve("my-fine-tuned:model") == "my-fine-tuned:model"  # any name is accepted


# -- item 2: unknown keys -------------------------------------------------------------------------
def test_an_unknown_conf_key_fails_once_naming_the_closest_param(dag, srv, tmp_path, sample, capfd):
    dr, tis = run(dag, tmp_path, sample, promt_template="Answer: {prompt}")
    logged = failed_once_before_upload(dr, tis, srv, capfd)
    assert "unknown param in the run conf: promt_template ('promt_template': did you mean " in logged
    assert "'prompt_template'?)" in logged


def test_several_unknown_conf_keys_are_all_named_shortened(dag, srv, tmp_path, sample, capfd):
    conf = {"modle": "gpt-4o", "x" * 5000: 1, "out_dir": "/tmp"}
    dr, tis = run(dag, tmp_path, sample, **conf)
    logged = failed_once_before_upload(dr, tis, srv, capfd)
    assert "unknown params in the run conf:" in logged and "'modle': did you mean 'model'?" in logged
    assert "'out_dir': did you mean 'output_dir'?" in logged
    assert "x" * 200 not in logged


def test_inbox_defaults_with_an_unknown_key_fail_the_claim_and_leave_the_files(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.inbox import PIPELINE_PARAMS, claim

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text("prompt\nhello\n")
    params = {"inbox": str(inbox), "min_age_seconds": 0, "stable_seconds": 0,
              "defaults": {"modle": "gpt-4o-mini", "image_column": "image"}}  # fmt: skip
    with pytest.raises(AirflowFailException) as err:
        claim(params, "scheduled__1", set(PIPELINE_PARAMS))
    assert "unknown param in the inbox's defaults: modle ('modle': did you mean 'model'?)" in str(err.value)
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv"]  # nothing claimed


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--promt-template", "{prompt}"], "did you mean --prompt-template?"),
        (["--max-tok", "5"], "did you mean --max-tokens?"),  # an abbreviation no longer matches silently
        (["--temp=0.5"], "did you mean --temperature?"),
    ],
    ids=["typo", "abbreviation", "abbreviation-with-value"],
)
def test_the_cli_refuses_an_unknown_flag_with_a_hint(tmp_path, capsys, args, hint):
    from batchpipe.cli import main

    csv_path = tmp_path / "q.csv"
    csv_path.write_text("prompt\nhello\n")
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(csv_path), "--out-dir", str(tmp_path / "b"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments:" in err and hint in err, err
    assert not (tmp_path / "b").exists()


# -- item 4: a folder that cannot be written ------------------------------------------------------
@pytest.mark.parametrize("which", ["output_dir", "work_dir"])
def test_a_folder_that_is_a_file_fails_once_naming_it(dag, srv, tmp_path, sample, capfd, which):
    blocker = tmp_path / "taken"
    blocker.write_text("I am a file")
    dr, tis = run(dag, tmp_path, sample, **{which: str(blocker)})
    logged = failed_once_before_upload(dr, tis, srv, capfd)
    assert f"cannot write to {blocker}/questions/" in logged
    assert f"{blocker} is a file, not a folder" in logged
    assert "NotADirectoryError" not in logged.split("cannot write to", 1)[1].split("\n", 1)[0]
    assert blocker.read_text() == "I am a file"


@contextlib.contextmanager
def immutable(folder: Path):
    """``folder`` made unwritable even for root (``chattr +i``); skips the test where that is not possible."""
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not possible here ({done.stderr.strip()}); root ignores permission bits")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def read_only_mount(folder: Path):
    """``folder`` bind-mounted read-only on itself; skips the test where mounting is not allowed."""
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"bind mount not possible here ({done.stderr.strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize(
    ("lock", "reason"),
    [
        (immutable, "no permission to write (Operation not permitted)"),
        (read_only_mount, "read-only file system"),
    ],
    ids=["immutable", "read-only-mount"],
)
def test_an_unwritable_output_folder_fails_once_naming_it(dag, srv, tmp_path, sample, capfd, lock, reason):
    out = tmp_path / "out"
    (out / "questions").mkdir(parents=True)
    with lock(out / "questions"):
        dr, tis = run(dag, tmp_path, sample)
    logged = failed_once_before_upload(dr, tis, srv, capfd)
    assert f"cannot write to {out}/questions/" in logged and reason in logged


def test_check_writable_leaves_nothing_behind_in_a_folder_it_can_write(tmp_path):
    from openai_batch_airflow.preflight import check_writable

    check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and list((tmp_path / "new" / "run").iterdir()) == []


# -- a lying models endpoint, a key in the wrong field (review) ---------------------------------------
@contextlib.contextmanager
def models_endpoint(listing: bytes):
    """A server whose GET /v1/models/{m} is a plain 404 and whose GET /v1/models answers ``listing``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body, status = (listing, 200) if self.path.rstrip("/").endswith("/models") else (b"{}", 404)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "listing",
    [b"<html>gateway</html>", b"{not json", b'{"object": "list", "data": "gpt-4o"}',
     b'{"object": "list", "data": [{"id": 5}, {"object": "model"}]}', b"[1, 2]",
     b'{"object": "list", "data": []}'],
    ids=["html", "not-json", "data-a-string", "ids-not-strings", "an-array", "empty"],
)  # fmt: skip
def test_a_model_list_that_is_not_one_is_a_warning_never_a_crash(caplog, listing):
    import openai

    from openai_batch_airflow.preflight import check_model

    with models_endpoint(listing) as url, caplog.at_level(logging.WARNING, "openai_batch_airflow.preflight"):
        check_model(openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0), "gpt-4o-mnii", "c")
    assert "model 'gpt-4o-mnii' not checked" in caplog.text


def test_a_key_in_the_model_field_is_never_sent_or_shown(srv, caplog):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow.preflight import check_keys, check_model

    key = "sk-proj-" + "Q" * 40
    srv.set_config({"http_faults": []})
    before = srv.log()
    with caplog.at_level(logging.DEBUG), pytest.raises(AirflowFailException) as err:
        check_model(client(srv), key, "openai_default")
    assert "looks like an API key" in str(err.value) and "QQQQ" not in str(err.value)
    assert "QQQQ" not in caplog.text and "QQQQ" not in srv.log()[len(before) :]  # no request carried it
    with pytest.raises(AirflowFailException) as err:
        check_keys({f"model={key}": 1}, {"model", "prompt_column"}, "the run conf")
    assert "QQQQ" not in str(err.value) and "model=***" in str(err.value)

"""The run config and the storage seam (issue 13), fast: no ``dag.test()``.

``RunConfig.resolve`` reads params, Airflow Variables (here through ``AIRFLOW_VAR_...``, as a deployment
may set them) and the environment once; the storage seam (``storage.staged``, ``storage.local_copy``,
``storage.fetch_input``) is the only place that tells local from remote, proved against a local
S3-compatible server (moto). An ``ast`` scan keeps both shapes.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import pytest

import test_object_storage as objects
from conftest import REPO
from s3_local import client as s3_client
from s3_local import local_s3

PLUGIN = REPO / "plugins" / "openai_batch_airflow"
DAGS = REPO / "dags"
keys = objects.keys
scratch = objects.scratch  # where scratch copies go; checked empty afterwards
#: This module's own connection to its own server: Airflow keeps a connection's filesystem once made.
CONN = "s3_seam"
VARIABLES = ("OUTPUT_DIR", "ALLOWED_ROOTS", "OUTPUT_ROOTS", "PRICES", "MAX_ENQUEUED_TOKENS", "CHECK_MODEL",
             "SHARD_GROUPS", "CACHE_DIR")  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory, airflow_db):
    """A local S3-compatible server (moto) with one bucket, reached through connection :data:`CONN`."""
    with local_s3(tmp_path_factory.mktemp("s3"), conn_id=CONN) as (endpoint, bucket):
        client = s3_client(endpoint)
        client.bucket = bucket
        yield client


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, airflow_db):
    for name in VARIABLES:
        monkeypatch.delenv(f"AIRFLOW_VAR_OPENAI_BATCH_{name}", raising=False)
        monkeypatch.delenv(f"OPENAI_BATCH_{name}", raising=False)


def resolve(params: dict, run_id: str = "manual__1"):
    from openai_batch_airflow.config import RunConfig

    return RunConfig.resolve(params, run_id)


def failure(params: dict, open_cache: bool = False) -> str:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as caught:  # fails at once: a retry cannot fix it
        cfg = resolve(params)
        if open_cache:
            cfg.open_cache()
    return str(caught.value)


# -- RunConfig.resolve -------------------------------------------------------------------------------
def test_defaults_resolve_to_typed_settings(tmp_path):
    from batchpipe.options import BuildOptions

    cfg = resolve({"input_csv": str(tmp_path / "q.csv")}, "batch:1")
    base = Path(os.environ["AIRFLOW_HOME"]) / "openai_batch_results" / "q"
    assert cfg.run_dir.parent == base.resolve() and cfg.run_dir.name.startswith("batch_1-")
    assert cfg.work_dir == cfg.run_dir / "work"
    assert cfg.conn_id == "openai_default" and cfg.storage_conn_id is None
    assert isinstance(cfg.build, BuildOptions) and cfg.build == BuildOptions()
    assert (cfg.model, cfg.endpoint, cfg.completion_window) == ("gpt-4o", "/v1/chat/completions", "24h")
    assert cfg.max_enqueued_tokens is None and cfg.check_model is True
    assert cfg.read_roots is None and cfg.output_roots is None
    assert "gpt-4o" in cfg.prices["models"] and not cfg.prices.get("overridden")
    assert cfg.check_interval == 60 and cfg.csv_formula_escape is True
    assert not cfg.estimate_only and not cfg.keep_temp_files
    assert cfg.shard_groups == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.conn_id = "other"  # type: ignore[misc]


def test_each_provider_has_its_connection_and_azure_deployments_are_priced_as_their_model(
    tmp_path, monkeypatch
):
    import json

    from batchpipe.estimate import price_for

    csv = str(tmp_path / "q.csv")
    claude = resolve(
        {"input_csv": csv, "provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 9}
    )
    assert claude.conn_id == "anthropic_default" and claude.provider == "anthropic"
    assert price_for(claude.prices, "claude-haiku-4-5-20251001")["as_of"] == "2026-07-24"  # dated, its own
    azure = {"input_csv": csv, "provider": "azure_openai", "model": "eastus-4o-batch"}
    assert resolve(azure).conn_id == "azure_openai_default"
    assert price_for(resolve(azure).prices, "eastus-4o-batch") is None  # a deployment name alone: no price
    conn = {"conn_type": "azure_openai_batch", "host": "https://r.openai.azure.com", "password": "k",
            "extra": {"deployments": {"eastus-4o-batch": "gpt-4o", "odd": 7}}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_OPENAI_DEFAULT", json.dumps(conn))
    priced = price_for(resolve(azure).prices, "eastus-4o-batch")
    assert (priced["input"], priced["output"]) == (2.5, 10.0)  # gpt-4o's, from the connection's mapping
    assert "odd" not in resolve(azure).prices["models"]
    assert resolve({**azure, "conn_id": "other"}).conn_id == "other"


def test_shard_groups_from_the_environment_never_over_max_map_length(tmp_path, monkeypatch):
    params = {"input_csv": str(tmp_path / "q.csv")}
    monkeypatch.setenv("OPENAI_BATCH_SHARD_GROUPS", "3")
    assert resolve(params).shard_groups == 3
    monkeypatch.setenv("OPENAI_BATCH_SHARD_GROUPS", "5000")
    assert resolve(params).shard_groups == 1024  # Airflow's [core] max_map_length
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "100")
    assert resolve(params).shard_groups == 100
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("OPENAI_BATCH_SHARD_GROUPS", bad)
        assert f"OPENAI_BATCH_SHARD_GROUPS={bad!r} is not a whole number of at least 1" in failure(params)


def test_variables_then_environment_then_params(tmp_path, monkeypatch):
    params = {"input_csv": str(tmp_path / "q.csv")}
    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_DIR", str(tmp_path / "from-env"))
    assert resolve(params, "r").run_dir == tmp_path / "from-env" / "q" / "r"
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_OUTPUT_DIR", str(tmp_path / "from-var"))  # the Variable wins
    assert resolve(params, "r").run_dir == tmp_path / "from-var" / "q" / "r"
    params["output_dir"] = str(tmp_path / "from-param")  # the param wins over both
    assert resolve(params, "r").run_dir == tmp_path / "from-param" / "q" / "r"

    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_MAX_ENQUEUED_TOKENS", "9000")
    monkeypatch.setenv(
        "AIRFLOW_VAR_OPENAI_BATCH_PRICES", '{"models": {"my-model": {"input": 1, "output": 2}}}'
    )
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_CHECK_MODEL", " Off ")
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_ALLOWED_ROOTS", str(tmp_path))
    cfg = resolve(params)
    assert cfg.max_enqueued_tokens == 9000 and cfg.check_model is False
    assert cfg.prices["models"]["my-model"] == {"input": 1, "output": 2} and cfg.prices["overridden"]
    assert [str(r) for r in cfg.read_roots] == [str(tmp_path.resolve())]
    params.update(max_enqueued_tokens=5, prices={"models": {"my-model": {"input": 3}}})
    cfg = resolve(params)
    assert cfg.max_enqueued_tokens == 5 and cfg.prices["models"]["my-model"]["input"] == 3
    monkeypatch.delenv("AIRFLOW_VAR_OPENAI_BATCH_CHECK_MODEL")
    monkeypatch.setenv("OPENAI_BATCH_CHECK_MODEL", "no")
    assert resolve(params).check_model is False


def test_the_answer_cache_from_param_variable_or_environment(tmp_path, monkeypatch):
    from batchpipe.cache import AnswerCache, ObjectAnswerCache

    params = {"input_csv": str(tmp_path / "q.csv"), "output_dir": str(tmp_path / "out")}
    assert resolve(params).cache_dir is None and resolve(params).open_cache() is None
    monkeypatch.setenv("OPENAI_BATCH_CACHE_DIR", str(tmp_path / "env-cache"))
    assert resolve(params).cache_dir == tmp_path / "env-cache"
    # the Variable wins (the inbox's nightly runs too)
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_CACHE_DIR", str(tmp_path / "var-cache"))
    assert resolve(params).cache_dir == tmp_path / "var-cache"
    cfg = resolve({**params, "cache_dir": str(tmp_path / "mine"), "cache_mode": "read_only"})
    assert (cfg.cache_dir, cfg.cache_mode) == (tmp_path / "mine", "read_only")
    with cfg.open_cache() as cache:
        assert isinstance(cache, AnswerCache) and cache.mode == "read_only"
    assert resolve({**params, "cache_mode": "off"}).cache_dir is None  # a configured cache, not used
    remote = resolve({**params, "cache_dir": "s3://bucket/cache", "storage_conn_id": "nobody"})
    assert isinstance(remote.open_cache(), ObjectAnswerCache)  # nothing is read until a lookup

    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOTS", str(tmp_path / "out"))
    message = failure(params)  # the Variable's cache lies outside the allowed output roots
    assert f"cache folder {tmp_path / 'var-cache'}" in message and "outside the allowed roots" in message
    message = failure({**params, "cache_dir": "s3://key:secret@bucket/cache"})
    assert "must not carry credentials" in message and "secret" not in message
    (tmp_path / "out" / "junk").mkdir(parents=True)
    (tmp_path / "out" / "junk" / "answers.sqlite").write_text("not a database")
    message = failure({**params, "cache_dir": str(tmp_path / "out" / "junk")}, open_cache=True)
    assert "answers.sqlite cannot be used" in message


def test_a_url_output_dir_and_input(monkeypatch):
    params = {
        "input_csv": "s3://bucket/in/my prompts.csv",
        "output_dir": "s3://bucket/out",
        "work_dir": "s3://other@bucket/work",
        "storage_conn_id": "my_s3",  # no server behind it: nothing is read or written here
    }
    cfg = resolve(params, "r")
    assert str(cfg.run_dir).startswith("s3://my_s3@bucket/out/my_prompts-") and cfg.run_dir.name == "r"
    assert str(cfg.work_dir).startswith("s3://my_s3@bucket/work/my_prompts-")  # the param's connection
    assert cfg.build.image_base_dir == "s3://bucket/in"  # images beside the CSV in the store
    assert resolve({**params, "image_base_dir": "/imgs"}).build.image_base_dir == "/imgs"


def test_bad_values_fail_at_once_with_clear_messages(tmp_path, monkeypatch):
    ok = {"input_csv": str(tmp_path / "q.csv"), "output_dir": str(tmp_path / "out")}
    message = failure({**ok, "output_dir": "http://example.com/out"})
    assert "scheme http is not supported" in message and "download the file first" in message
    message = failure({**ok, "output_dir": "s3://key:secret@bucket/out"})
    assert "must not carry credentials" in message and "secret" not in message

    monkeypatch.setenv("OPENAI_BATCH_OUTPUT_ROOTS", str(tmp_path / "out"))
    resolve(ok)
    assert f"output folder {tmp_path / 'elsewhere'}" in failure(
        {**ok, "output_dir": str(tmp_path / "elsewhere")}
    )
    message = failure({**ok, "work_dir": str(tmp_path / "w")})
    assert f"work folder {tmp_path / 'w'}" in message and "is outside the allowed roots" in message
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_OUTPUT_ROOTS", str(tmp_path / "w"))  # the Variable adds one
    resolve({**ok, "work_dir": str(tmp_path / "w")})

    assert "endpoint" in failure({**ok, "endpoint": "/v1/nope"})
    assert "prices" in failure({**ok, "prices": "{nope"})
    monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_PRICES", "[1, 2]")
    assert "prices" in failure(ok)
    monkeypatch.delenv("AIRFLOW_VAR_OPENAI_BATCH_PRICES")
    for bad in ("lots", "0", "-5", "1.5e400" * 50):
        monkeypatch.setenv("AIRFLOW_VAR_OPENAI_BATCH_MAX_ENQUEUED_TOKENS", bad)
        message = failure(ok)
        assert "max_enqueued_tokens" in message and "openai_batch_max_enqueued_tokens" in message
        assert len(message) < 400


def test_params_have_one_source_of_truth(tmp_path):
    from batchpipe.options import ENDPOINTS, IMAGE_DETAILS, BuildOptions
    from openai_batch_airflow.inbox import PIPELINE_PARAMS
    from openai_batch_airflow.params import pipeline_params

    params = pipeline_params()
    assert PIPELINE_PARAMS == frozenset(params)
    assert params["endpoint"].schema["enum"] == list(ENDPOINTS)
    assert params["image_detail"].schema["enum"] == list(IMAGE_DETAILS)
    defaults = BuildOptions()
    for name in ("prompt_column", "model", "endpoint", "image_detail", "start_row", "max_batch_bytes"):
        assert params[name].value == getattr(defaults, name), name
    # each DAG parse gets its own Param objects: resolving a value in one never changes another
    params["model"].resolve("my-fine-tuned:model")
    assert pipeline_params()["model"].value == "gpt-4o"
    source = (REPO / "plugins" / "openai_batch_airflow" / "inbox.py").read_text()
    assert "prompt_template" not in source  # the inbox lists no pipeline param by hand


# -- the storage seam --------------------------------------------------------------------------------
def test_staged_local_is_the_folder_itself(tmp_path):
    from openai_batch_airflow import storage

    folder = tmp_path / "a" / "b"
    with storage.staged(folder, last=("z.txt",)) as local:
        assert local == folder and folder.is_dir()
        (local / "z.txt").write_text("z")
    assert (folder / "z.txt").read_text() == "z"
    with storage.local_copy(str(folder / "z.txt")) as copy:
        assert copy == folder / "z.txt"  # read in place
    csv = tmp_path / "q.csv"
    assert storage.fetch_input(str(csv), None, tmp_path / "into", None) == (str(csv), None)
    assert storage.fetch_input(f"file://{csv}", None, tmp_path / "into", None)[0] == str(csv.resolve())
    assert not (tmp_path / "into").exists()  # nothing copied


def test_staged_remote_publishes_what_was_written_and_nothing_on_error(s3, tmp_path, scratch):
    from openai_batch_airflow import storage

    where = storage.location(f"s3://{s3.bucket}/staged", CONN)
    with storage.staged(where, last=("done.csv",)) as local:
        assert isinstance(local, Path) and local.is_relative_to(scratch)
        for name in ("done.csv", "a.json", "sub/b.jsonl"):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_text(name)
    assert keys(s3, "staged/") == ["staged/a.json", "staged/done.csv", "staged/sub/b.jsonl"]
    with storage.local_copy(str(where / "sub" / "b.jsonl")) as copy:
        assert copy.read_text() == "sub/b.jsonl" and copy.is_relative_to(scratch)

    broken = storage.location(f"s3://{s3.bucket}/broken", CONN)
    with pytest.raises(RuntimeError), storage.staged(broken) as local:
        (local / "half.csv").write_text("x")
        raise RuntimeError("the task failed half-way")
    assert keys(s3, "broken/") == []  # nothing half-written is stored


def test_fetch_input_from_s3_checks_roots_first(s3, tmp_path):
    from batchpipe.errors import InputError
    from batchpipe.paths import Roots
    from openai_batch_airflow import storage

    s3.put_object(Bucket=s3.bucket, Key="in/q.csv", Body=b"prompt\nhi\n")
    url = f"s3://{s3.bucket}/in/q.csv"
    local, roots = storage.fetch_input(url, CONN, tmp_path / "into", None)
    assert Path(local).read_bytes() == b"prompt\nhi\n" and roots is None
    outside = Roots([tmp_path / "elsewhere"], setting="OPENAI_BATCH_ALLOWED_ROOTS")
    with pytest.raises(InputError, match="input CSV .* is outside the allowed roots"):
        storage.fetch_input(url, CONN, tmp_path / "into2", outside)
    assert not (tmp_path / "into2").exists()  # refused before anything was read
    inside = Roots([tmp_path / "x", f"s3://{s3.bucket}/in"], setting="OPENAI_BATCH_ALLOWED_ROOTS")
    local, roots = storage.fetch_input(url, CONN, tmp_path / "into3", inside)
    assert Path(local).resolve() in list(roots)  # the copy is admitted, nothing else is added
    with pytest.raises(InputError, match="input CSV not found"):
        storage.fetch_input(f"s3://{s3.bucket}/in/none.csv", CONN, tmp_path / "into4", None)
    with pytest.raises(InputError, match="must not carry credentials") as caught:
        storage.fetch_input(f"s3://k:secret@{s3.bucket}/in/q.csv", None, tmp_path / "into5", None)
    assert "secret" not in str(caught.value)
    with pytest.raises(InputError, match=r"^input_csv .* scheme nosuch is not supported"):
        storage.fetch_input("nosuch://b/q.csv", None, tmp_path / "into6", None)


# -- the shape ---------------------------------------------------------------------------------------
#: Modules another developer owns that still call is_remote (issue 13: to move behind the seam).
PENDING_IS_REMOTE: set[str] = set()


def _names(tree: ast.AST) -> set[str]:
    return {
        node.attr if isinstance(node, ast.Attribute) else node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute | ast.Name)
    } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}


def test_only_storage_tells_local_from_remote():
    modules = sorted(PLUGIN.glob("*.py")) + sorted(DAGS.glob("*.py"))
    users = {p.name for p in modules if "is_remote" in _names(ast.parse(p.read_text()))}
    assert "storage.py" in users  # the scan sees it
    assert users - {"storage.py"} <= PENDING_IS_REMOTE, users
    assert not users & {"tasks.py", "inbox.py", "config.py", "notify.py", "params.py"}
    assert "is_remote" in _names(ast.parse("from openai_batch_airflow.storage import is_remote"))


def test_nothing_in_plugins_imports_the_task_bodies():
    from test_hook import _imports_tasks

    importers = [p.name for p in sorted(PLUGIN.glob("*.py")) if _imports_tasks(ast.parse(p.read_text()))]
    assert importers == []
    dags = [p.name for p in sorted(DAGS.glob("*.py")) if _imports_tasks(ast.parse(p.read_text()))]
    assert dags == ["openai_batch_pipeline.py"]


def test_task_bodies_resolve_params_only_through_the_run_config():
    # Variable and environment names live in config.py; tasks.py reads neither itself
    tree = ast.parse((PLUGIN / "tasks.py").read_text())
    assert not {"Variable", "environ", "getenv"} & _names(tree)
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    resolvers = {"checked_run_dir", "run_dir", "work_location", "build_options", "default_output_dir",
                 "read_roots", "prices", "max_enqueued_tokens", "storage_conn_id"}  # fmt: skip
    assert not defined & resolvers, defined & resolvers
    assert {"validate", "build", "merge", "create"} <= defined


def test_read_capped_refuses_what_would_block_or_fill_memory(tmp_path):
    from openai_batch_airflow.storage import read_capped

    page = tmp_path / "report.html"
    page.write_text("<html>ok</html>")
    assert read_capped(page, 100) == "<html>ok</html>"
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        read_capped(page, 10)
    fifo = tmp_path / "fifo" / "report.html"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # a reader would wait forever
    with pytest.raises(ValueError, match="not a regular file"):
        read_capped(fifo, 100)
    link = tmp_path / "link" / "report.html"
    link.parent.mkdir()
    link.symlink_to(page)
    with pytest.raises(ValueError, match="not a regular file"):
        read_capped(link, 100)
    with pytest.raises(FileNotFoundError):
        read_capped(tmp_path / "nowhere" / "report.html", 100)

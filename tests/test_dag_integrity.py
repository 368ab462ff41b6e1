"""The DAG file parses, wires the tasks in order and explains every param."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

DAG_FILE = REPO / "dags" / "openai_batch_pipeline.py"


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["openai_batch_pipeline"]


def test_tasks_read_like_the_job(dag):
    order = ["validate_csv", "build_jsonl", "upload", "create_batch", "wait_for_batch", "download", "merge"]
    assert sorted(t.task_id for t in dag.tasks) == sorted(order)
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.schedule is None if hasattr(dag, "schedule") else True
    assert dag.doc_md and "results.csv" in dag.doc_md
    assert {"openai", "batch"} <= set(dag.tags)


def test_shard_tasks_are_mapped_and_the_wait_is_an_operator_that_defers(dag):
    from airflow.sdk import BaseSensorOperator

    from openai_batch_airflow.operators import OpenAIBatchWaitOperator

    for task_id in ("upload", "create_batch", "wait_for_batch", "download"):
        assert dag.get_task(task_id).is_mapped, task_id
    assert not dag.get_task("merge").is_mapped
    wait = dag.get_task("wait_for_batch")
    # it submits follow-up batches too: an operator, not a sensor; it defers in execute, always
    assert wait.operator_class is OpenAIBatchWaitOperator
    assert not issubclass(OpenAIBatchWaitOperator, BaseSensorOperator)
    # The triggerer imports the trigger by class path: it must not live in the DAG folder.
    from openai_batch_airflow.triggers import OpenAIBatchTrigger

    classpath, _ = OpenAIBatchTrigger(batch_ids=["b"]).serialize()
    assert classpath == "openai_batch_airflow.triggers.OpenAIBatchTrigger"
    assert not Path(__import__("openai_batch_airflow.triggers").__file__).is_relative_to(REPO / "dags")


def test_every_param_has_title_description_and_schema(dag):
    expected = {
        "input_csv", "output_dir", "prompt_column", "prompt_template", "system_prompt", "image_column",
        "image_detail", "id_column", "model", "endpoint", "max_tokens", "temperature", "extra_body",
        "start_row", "end_row", "completion_window", "check_interval", "max_requests_per_batch",
        "max_batch_bytes", "keep_temp_files", "max_image_mb", "conn_id",
    }  # fmt: skip
    assert expected <= set(dag.params.keys())
    for name, param in dag.params.items():
        schema = param.schema
        assert schema.get("title"), name
        assert param.description, name
        assert "type" in schema, name
    defaults = {name: dag.params[name] for name in ("model", "endpoint", "start_row", "check_interval")}
    assert defaults == {
        "model": "gpt-4o",
        "endpoint": "/v1/chat/completions",
        "start_row": 0,
        "check_interval": 60,
    }
    assert dag.params.get_param("max_requests_per_batch").schema["maximum"] == 50_000
    assert dag.params.get_param("check_interval").schema["minimum"] == 1


def test_dag_file_is_thin_and_imports_nothing_heavy():
    tree = ast.parse(DAG_FILE.read_text())
    top_level_imports = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not top_level_imports & {"pandas", "openai", "batchpipe", "PIL", "numpy"}


def test_inbox_dag_knows_every_pipeline_param_and_is_scheduled(dag):
    from airflow.dag_processing.dagbag import DagBag

    from openai_batch_airflow.inbox import PIPELINE_PARAMS

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert set(PIPELINE_PARAMS) == set(dag.params.keys())
    inbox = bag.dags["openai_batch_inbox"]
    assert inbox.timetable.expression == "0 2 * * *"  # nightly by default
    assert sorted(t.task_id for t in inbox.tasks) == ["claim", "process", "settle"]
    condition = bag.dags["openai_batch_results_consumer"].timetable.asset_condition
    assert [a.name for a in condition.objects] == ["openai_batch_results"]

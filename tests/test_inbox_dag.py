"""The inbox DAG's task bodies (claim, settle) on a real local inbox folder, and its wiring.

The whole DAG (claim -> triggered pipeline runs -> settle) runs under a real scheduler and triggerer
in tests/test_real_triggerer.py::test_6_...; ``dag.test()`` cannot wait for a triggered run.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from batchpipe.inbox import claim_name
from conftest import REPO

RUN_ID = "scheduled__2026-11-30T02:00:00+00:00"
CLAIM = claim_name(RUN_ID)  # scheduled__2026-11-30T02_00_00_00_00-<8 hex>


def drop(inbox, name, sidecar=None):
    path = inbox / name
    path.write_text("prompt\nhello\n", encoding="utf-8")
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    old = time.time() - 3600
    for p in (path, path.with_suffix(".json")):
        if p.exists():
            os.utime(p, (old, old))
    return path


def params(inbox, **extra):
    return {
        "inbox": str(inbox),
        "min_age_seconds": 60,
        "stable_seconds": 0,
        "defaults": {"model": "m"},
        **extra,
    }


def files(inbox):
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file())


def test_claim_gives_every_file_its_own_run_and_a_bad_sidecar_fails_only_its_file(tmp_path):
    """Issue 11 items 2 and 3: colliding run ids, and one bad sidecar failing the whole claim."""
    from openai_batch_airflow import inbox as ib

    for name in ("2026 Q1.csv", "2026_Q1.csv", "日本.csv", "中国.csv"):
        drop(tmp_path, name)
    drop(tmp_path, "bad.csv", {"modle": "x"})
    drop(tmp_path, "good.csv", {"end_row": 5})
    claimed = ib.claim(params(tmp_path), RUN_ID, set(ib.PIPELINE_PARAMS))
    assert claimed["claim"] == CLAIM
    runs = [w["trigger_run_id"] for w in claimed["work"]]
    assert len(runs) == len(set(runs)) == 5 and all(r.startswith(f"inbox__{CLAIM}__") for r in runs)
    good = next(w for w in claimed["work"] if w["claimed"]["name"] == "good.csv")
    assert good["conf"]["end_row"] == 5 and good["conf"]["model"] == "m"
    assert good["conf"]["input_csv"] == str(tmp_path / "processing" / CLAIM / "good.csv")
    (bad,) = claimed["failed"]
    assert bad["name"] == "bad.csv" and "unknown settings modle" in bad["error"]
    assert bad["where"] == str(tmp_path / "failed" / CLAIM / "bad.csv")
    assert (tmp_path / "failed" / CLAIM / "bad.csv.error.txt").exists()


def test_claim_of_an_empty_inbox_gives_empty_lists(tmp_path):
    from openai_batch_airflow import inbox as ib

    assert ib.claim(params(tmp_path), RUN_ID, set(ib.PIPELINE_PARAMS)) == {
        "claim": CLAIM,
        "work": [],
        "failed": [],
    }


def test_settle_moves_a_file_to_done_only_when_its_own_run_succeeded(tmp_path):
    """Issue 11 item 2: a file whose run was never triggered (``Dag Run already exists``) or did not
    succeed went to done/; one bad sidecar left the inbox run green."""
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow import inbox as ib

    for name in ("ok.csv", "run_failed.csv", "never_triggered.csv", "no_run.csv"):
        drop(tmp_path, name)
    drop(tmp_path, "bad.csv", {"modle": "x"})
    claimed = ib.claim(params(tmp_path), RUN_ID, set(ib.PIPELINE_PARAMS))
    by_run = {w["trigger_run_id"]: w["claimed"]["name"] for w in claimed["work"]}
    # what Airflow says: (state of this file's `process` task, state of the pipeline run of that id)
    seen = {"ok.csv": ("success", "success"), "run_failed.csv": ("failed", "failed"),
            "never_triggered.csv": ("failed", "success"),  # the id existed already: another file's run
            "no_run.csv": (None, None)}  # fmt: skip
    asked = []

    def states(index, run_id):
        asked.append((index, run_id))
        return seen[by_run[run_id]]

    with pytest.raises(AirflowFailException) as err:
        ib.settle(claimed, params(tmp_path), states)
    message = str(err.value)
    assert message.startswith("4 of 5 file(s) failed")
    for name in ("bad.csv", "run_failed.csv", "never_triggered.csv", "no_run.csv"):
        assert name in message
    assert [i for i, _ in asked] == list(range(4))  # by map index, in claim order
    assert files(tmp_path) == sorted(
        [f"done/{CLAIM}/ok.csv"]
        + [f"failed/{CLAIM}/{n}" for n in ("bad.csv", "bad.csv.error.txt", "bad.json")]
        + [f"failed/{CLAIM}/{n}{suffix}" for n in ("run_failed.csv", "never_triggered.csv", "no_run.csv")
           for suffix in ("", ".error.txt")]
    )  # fmt: skip
    reason = (tmp_path / "failed" / CLAIM / "never_triggered.csv.error.txt").read_text()
    assert "process task ended failed" in reason and "inbox__" in reason


def test_settle_of_only_good_files_succeeds(tmp_path):
    from openai_batch_airflow import inbox as ib

    drop(tmp_path, "a.csv", {"end_row": 1})
    claimed = ib.claim(params(tmp_path), RUN_ID, set(ib.PIPELINE_PARAMS))
    landed = {}
    outcome = ib.settle(claimed, params(tmp_path), lambda i, r: ("success", "success"),
                        lambda run: landed.setdefault(run, f"/out/a/{run}/results.csv"))  # fmt: skip
    (run,) = landed
    assert outcome == {"done": [str(tmp_path / "done" / CLAIM / "a.csv")], "failed": [],
                       "results": [f"a.csv: /out/a/{run}/results.csv"]}  # fmt: skip
    assert files(tmp_path) == [f"done/{CLAIM}/a.csv", f"done/{CLAIM}/a.json"]


def test_settle_fails_when_claim_failed(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from openai_batch_airflow import inbox as ib

    with pytest.raises(AirflowFailException, match="claim did not finish"):
        ib.settle(None, params(tmp_path), lambda i, r: ("success", "success"))


def test_inbox_dag_maps_process_over_the_work_list_and_titles_every_param():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    dag = bag.dags["openai_batch_inbox"]
    assert {"stable_seconds", "min_age_seconds"} <= set(dag.params.keys())
    for name in dag.params.keys():
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
    assert dag.params["stable_seconds"] == 5
    process = dag.get_task("process")
    assert process.partial_kwargs["trigger_dag_id"] == "openai_batch_pipeline"
    assert dag.get_task("settle").trigger_rule == "all_done"
    assert dag.get_task("settle").upstream_task_ids == {"process"}
    assert dag.get_task("process").upstream_task_ids == {"claim"}

"""Know the cost before paying: estimate_only, max_cost_usd, and the run report (opened in a real
headless Chromium, whose screenshot is kept in test-artifacts/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, local_openai

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory, airflow_db):
    with local_openai(tmp_path_factory.mktemp("server"), "sk-cost-tests") as srv:
        yield srv


def run(dag, tmp_path, sample, **conf):
    dr = dag.test(
        run_conf={
            "input_csv": str(sample),
            "output_dir": str(tmp_path / "out"),
            "image_column": "image",
            "check_interval": 1,
            **conf,
        }
    )
    return dr, {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}


def run_folder(tmp_path) -> Path:
    (folder,) = (tmp_path / "out" / "questions").iterdir()
    return folder


def test_estimate_only_uploads_nothing_and_writes_tokens_and_usd(dag, server, tmp_path, sample):
    files_before = len(server.client().files.list().data)
    dr, states = run(dag, tmp_path, sample, estimate_only=True, max_tokens=50)
    assert dr.state == "success", states
    assert states[("merge", -1)] == "skipped"
    assert len(server.client().files.list().data) == files_before
    folder = run_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["estimate.json", "estimate.md"]
    estimate = json.loads((folder / "estimate.json").read_text())
    assert estimate["model"] == "gpt-4o" and estimate["requests"] == 28
    assert estimate["image_tokens"] > 0 and estimate["text_tokens"] > 0
    assert estimate["output_tokens_max"] == 28 * 50
    assert 0 < estimate["cost"]["batch"]["max"] < estimate["cost"]["standard"]["max"]
    assert "Batch" in (folder / "estimate.md").read_text()


def test_budget_below_the_estimate_stops_before_upload(dag, server, tmp_path, sample, capfd):
    files_before = len(server.client().files.list().data)
    dr, states = run(dag, tmp_path, sample, max_tokens=1000, max_cost_usd=0.0001)
    assert dr.state == "failed"
    assert states[("build_jsonl", -1)] == "failed"
    assert len(server.client().files.list().data) == files_before
    logged = "".join(capfd.readouterr())
    assert (
        "stopped before upload: worst-case Batch cost" in logged and "exceeds the budget of $0.0001" in logged
    )


def test_run_report_renders_in_headless_chromium(dag, server, tmp_path, sample):
    from playwright.sync_api import sync_playwright

    dr, states = run(dag, tmp_path, sample, max_tokens=100, max_requests_per_batch=15)
    assert dr.state == "success", states
    folder = run_folder(tmp_path)
    report = json.loads((folder / "report.json").read_text())
    assert report["cost_usd"]["actual_batch"] > 0 and report["cost_usd"]["estimated_batch_expected"] > 0
    assert report["cost_usd"]["difference_pct"] is not None
    assert len(report["batches"]) == 2 and all(b["completed_at"] for b in report["batches"])

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((folder / "report.html").as_uri())
        for plot in ("status", "tokens", "timeline"):
            svg = page.locator(f'svg[data-plot="{plot}"]')
            assert svg.count() == 1, plot
            box = svg.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50, (plot, box)
            # drawn marks, not an empty frame
            assert svg.locator("rect, path, circle, line").count() >= 3, plot
        assert "27" in page.locator("body").inner_text()  # answered rows
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert all(url.startswith("file://") for url in requests)  # self-contained: nothing fetched
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000

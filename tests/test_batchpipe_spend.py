"""The spend overview (library, no Airflow): run summaries filtered, totalled per model and per day, and the
page drawn from them (escaped, no script, relative links)."""

from __future__ import annotations

from datetime import date

from batchpipe.spend import report_link, run_summary, spend, spend_html


def run(dag_id="p", run_id="r", day=date(2026, 12, 1), model="gpt-4o-mini", cost=1.0, **more):
    return {"dag_id": dag_id, "run_id": run_id, "date": day, "state": "success", "model": model,
            "input": "s3://b/in/questions.csv", "rows": 10, "answered": 9, "failed": 1, "invalid": 0,
            "prompt_tokens": 100, "completion_tokens": 50, "cost_usd": cost, "estimated_usd": 1.5,
            "saved_usd": 0.25, "saved_rows": 2, **more}  # fmt: skip


def test_run_summary_from_a_finished_report():
    report = {
        "rows": 30, "answered": 27, "failed": 1, "invalid": 2, "tokens": {"prompt": 900, "completion": 40},
        "cost_usd": {"actual_batch": 0.0012, "estimated_batch_expected": 0.002}, "model": "gpt-4o-mini",
        "savings": {"rows": 3, "batch_usd": 0.0001}, "problems": ["x"],
        "results_csv": "s3://conn@bucket/out/questions/run/results.csv",
    }  # fmt: skip
    s = run_summary(report, input_csv="s3://bucket/in/questions.csv", storage_conn_id="conn")
    assert (s["rows"], s["answered"], s["failed"], s["invalid"]) == (30, 27, 1, 2)
    assert (s["prompt_tokens"], s["completion_tokens"], s["cost_usd"], s["estimated_usd"]) == (
        900,
        40,
        0.0012,
        0.002,
    )
    assert (s["saved_rows"], s["saved_usd"], s["problems"]) == (3, 0.0001, 1)
    assert s["report_html"] == "s3://conn@bucket/out/questions/run/report.html"


def test_filters_totals_per_model_and_per_day():
    runs = [
        run(run_id="a", day=date(2026, 11, 30), cost=1.0),
        run(run_id="b", day=date(2026, 12, 1), cost=2.0, model="gpt-4o"),
        run(run_id="c", day=date(2026, 12, 1), cost=None, model="my-model"),  # no price known
        run(dag_id="other", run_id="d", day=date(2026, 12, 2), cost=0.5, input="/data/reviews.csv"),
    ]
    every = spend(runs)
    assert [r["run_id"] for r in every["runs"]] == ["d", "c", "b", "a"]  # newest first
    assert (
        every["totals"]["runs"] == 4
        and every["totals"]["cost_usd"] == 3.5
        and every["totals"]["unpriced"] == 1
    )
    assert every["totals"]["rows"] == 40 and every["totals"]["saved_usd"] == 1.0
    assert (
        every["by_model"]["gpt-4o-mini"]["cost_usd"] == 1.5
        and every["by_model"]["my-model"]["cost_usd"] is None
    )
    assert every["daily"] == {"2026-11-30": {"gpt-4o-mini": 1.0}, "2026-12-01": {"gpt-4o": 2.0},
                              "2026-12-02": {"gpt-4o-mini": 0.5}}  # fmt: skip
    assert [r["run_id"] for r in spend(runs, start=date(2026, 12, 1), end=date(2026, 12, 1))["runs"]] == [
        "c",
        "b",
    ]
    assert [r["run_id"] for r in spend(runs, dag_id="other")["runs"]] == ["d"]
    assert [r["run_id"] for r in spend(runs, model="gpt-4o")["runs"]] == ["b"]
    assert [r["run_id"] for r in spend(runs, input_contains="REVIEWS")["runs"]] == ["d"]
    assert spend([], start=date(2026, 1, 1))["totals"]["cost_usd"] is None


def test_the_page_escapes_what_runs_carry_and_links_relatively():
    hostile = run(run_id='r"><script>alert(1)</script>', model="<img src=x onerror=alert(1)>",
                  input="</td><script>x</script>")  # fmt: skip
    page = spend_html(spend([hostile]), {"dag_id": '"><i>x'}, {"dag_id": ["p"], "model": [hostile["model"]]})
    assert "<script" not in page and "<img" not in page and '"><i>x' not in page
    assert 'href="report/p/r%22%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E"' in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert report_link("a b", "manual__2026-12-01T00:00:00+00:00") == (
        "report/a%20b/manual__2026-12-01T00%3A00%3A00%2B00%3A00"
    )
    empty = spend_html(spend([]), {}, {})
    assert 'id="no-runs"' in empty and 'id="no-daily"' in empty

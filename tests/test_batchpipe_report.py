"""HTML run report (self-contained, inline SVG plots) and analyze()."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from batchpipe import BuildOptions, build_jsonl, merge_results
from batchpipe.cli import main
from batchpipe.estimate import estimate_build, load_prices
from batchpipe.report import analyze, batch_phases, error_code_of, write_report_html


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        for x in lines:
            fh.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return path


def ok_line(cid, text, p, c):
    return {
        "id": f"r-{cid}",
        "custom_id": cid,
        "error": None,
        "response": {
            "status_code": 200,
            "body": {
                "choices": [{"message": {"content": text}}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            },
        },
    }


def fail_line(cid):
    return {
        "custom_id": cid,
        "error": None,
        "response": {"status_code": 400, "body": {"error": {"message": "bad", "code": "invalid_request"}}},
    }


def expired_line(cid):
    return {"custom_id": cid, "response": None, "error": {"code": "batch_expired", "message": "too late"}}


T0 = 1_700_000_000
BATCHES = [
    {
        "id": "batch_a",
        "status": "completed",
        "round": 0,
        "request_counts": {"total": 6, "completed": 5, "failed": 1},
        "created_at": T0,
        "in_progress_at": T0 + 30,
        "finalizing_at": T0 + 630,
        "completed_at": T0 + 660,
    },
    {
        "id": "batch_b",
        "status": "expired",
        "round": 1,
        "request_counts": {"total": 2, "completed": 0, "failed": 2},
        "created_at": T0 + 700,
        "in_progress_at": T0 + 760,
        "expired_at": T0 + 1000,
    },
]


@pytest.fixture
def run(tmp_path):
    """A build of 10 rows (1 invalid), results for 7, 1 HTTP 400, 1 expired; merged."""
    rows = [{"prompt": f"question number {i}"} for i in range(10)]
    rows[4]["prompt"] = ""
    src = write_csv(tmp_path / "in.csv", rows)
    build = build_jsonl(src, BuildOptions(max_tokens=100, max_requests_per_batch=5), tmp_path / "build")
    out = [ok_line(f"row-{i}", "x" * (i + 1), 10 + i, 3 * i) for i in (0, 1, 2, 3, 5, 6, 7)]
    out_path = write_jsonl(tmp_path / "out.jsonl", out)
    err_path = write_jsonl(tmp_path / "err.jsonl", [fail_line("row-8"), expired_line("row-9")])
    report = merge_results(build["manifest"], [out_path, err_path], tmp_path / "res" / "results.csv")
    return {
        "build": build,
        "report": report,
        "csv": tmp_path / "res" / "results.csv",
        "report_json": tmp_path / "res" / "report.json",
        "out": out_path,
        "err": err_path,
        "tmp": tmp_path,
        "prompt": sum(10 + i for i in (0, 1, 2, 3, 5, 6, 7)),
        "completion": sum(3 * i for i in (0, 1, 2, 3, 5, 6, 7)),
    }


def svgs(page):
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def test_report_html(run):
    est = estimate_build(run["build"]["manifest"])
    out = write_report_html(run["csv"], run["report_json"], run["tmp"] / "report.html", est, BATCHES)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")

    plots = {}
    for s in svgs(page):
        el = ET.fromstring(s)  # well-formed SVG
        plots[el.get("data-plot")] = el
        assert el.find("{http://www.w3.org/2000/svg}title").text
    assert set(plots) == {"status", "tokens", "timeline"}
    # self-contained: no external resources, no script at all
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert "@import" not in page and "url(" not in page

    # counts from the merge report
    r = run["report"]
    assert (r["answered"], r["failed"], r["invalid"]) == (7, 2, 1)
    for k in ("answered", "failed", "invalid"):
        assert f'id="count-{k}"><b>{r[k]:,}</b>' in page
    for code in ("invalid_request", "batch_expired", "invalid_input"):
        assert f"<td>{code}</td><td>1</td>" in page
    # tokens and cost from the usage columns at Batch prices of gpt-4o
    assert f"<td>{run['prompt']:,}</td>" in page
    actual = round((run["prompt"] * 2.5 + run["completion"] * 10.0) / 1e6 * 0.5, 6)
    assert f"${actual:,.6f}".rstrip("0").rstrip(".") in page
    diff = 100 * (run["prompt"] - est["prompt_tokens"]) / est["prompt_tokens"]
    assert f"{diff:+.1f} %" in page
    # status bars: one rect per outcome; histogram: 7 rows with usage
    assert len(plots["status"].findall("{http://www.w3.org/2000/svg}rect")) == 3
    hist_titles = [t.text for t in plots["tokens"].iter("{http://www.w3.org/2000/svg}title")][1:]
    assert sum(int(re.search(r": (\d+) rows", t).group(1)) for t in hist_titles) == 7
    # timeline: 3 phases for batch_a, 2 for batch_b; time per status in the table
    assert len(plots["timeline"].findall("{http://www.w3.org/2000/svg}rect")) == 5 + 4  # + legend
    assert "batch_a" in page and "10m 00s" in page and "4m 00s" in page
    # shard table from the estimate
    assert "Shards (estimate)" in page


def test_report_without_estimate_or_batches(run):
    out = write_report_html(run["csv"], None, run["tmp"] / "r2.html")
    page = out.read_text(encoding="utf-8")
    kinds = [ET.fromstring(s).get("data-plot") for s in svgs(page)]
    assert sorted(kinds) == ["status", "timeline", "tokens"]
    assert "no batch timing given" in page
    assert 'id="count-answered"><b>7</b>' in page  # derived from the CSV alone
    assert "Actual cost unknown" in page  # no model known: no guess


def test_report_with_model_and_price_override(run):
    prices = load_prices({"models": {"gpt-4o": {"input": 1.0, "output": 1.0}}})
    out = write_report_html(
        run["csv"], run["report_json"], run["tmp"] / "r3.html", model="gpt-4o-2024-08-06", prices=prices
    )
    page = out.read_text(encoding="utf-8")
    actual = round((run["prompt"] + run["completion"]) / 1e6 * 0.5, 6)
    assert f"${actual:.6f}".rstrip("0").rstrip(".") in page
    assert "Actual cost unknown" not in page


def test_batch_phases():
    a = batch_phases(BATCHES[0])
    assert a == [
        ("validating", T0, T0 + 30),
        ("in_progress", T0 + 30, T0 + 630),
        ("finalizing", T0 + 630, T0 + 660),
    ]
    assert batch_phases(BATCHES[1])[-1] == ("in_progress", T0 + 760, T0 + 1000)
    running = {"created_at": T0, "in_progress_at": T0 + 5, "completed_at": None}
    assert batch_phases(running) == [("validating", T0, T0 + 5)]
    assert batch_phases(running, now=T0 + 50)[-1] == ("in_progress", T0 + 5, T0 + 50)
    failed = {"created_at": T0, "failed_at": T0 + 3}
    assert batch_phases(failed) == [("validating", T0, T0 + 3)]


def test_error_code_of():
    assert error_code_of("HTTP 400 invalid_request: bad") == "invalid_request"
    assert error_code_of("HTTP 500") == "http_500"
    assert error_code_of("HTTP 502: upstream") == "http_502"
    assert error_code_of("batch_expired: too late") == "batch_expired"
    assert error_code_of("not sent: empty prompt (column 'prompt')") == "invalid_input"
    assert error_code_of("no result returned for this request") == "no_result"
    assert error_code_of("malformed result: no choices") == "malformed_result"
    assert error_code_of("refusal: no") == "refusal"
    assert error_code_of("Something odd") == "error"


def test_analyze_results_csv_matches_merge_report(run):
    a = analyze([str(run["csv"])])
    r = run["report"]
    for k in ("rows", "answered", "failed", "invalid", "errors_by_code", "tokens"):
        assert a[k] == r[k], k
    assert a["rows_with_usage"] == 7
    assert a["response_chars"] == {
        "count": 7,
        "min": 1,
        "max": 8,
        "mean": round(sum((1, 2, 3, 4, 6, 7, 8)) / 7, 1),
    }
    assert a["tokens_per_row"]["min"] == 10


def test_analyze_jsonl(run, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", ""])
    a = analyze([run["out"], run["err"], bad])
    assert (a["rows"], a["answered"], a["failed"], a["invalid"]) == (10, 7, 3, 0)
    assert a["errors_by_code"] == {"batch_expired": 1, "invalid_request": 1, "malformed_result": 1}
    assert a["tokens"] == {
        "prompt": run["prompt"],
        "completion": run["completion"],
        "total": run["prompt"] + run["completion"],
    }
    assert [f["rows"] for f in a["per_file"]] == [7, 2, 1]


def test_analyze_jsonl_responses_and_embeddings(tmp_path):
    lines = [
        {
            "custom_id": "a",
            "response": {
                "status_code": 200,
                "body": {
                    "object": "response",
                    "output": [{"type": "message", "content": [{"type": "output_text", "text": "hey"}]}],
                    "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6},
                },
            },
        },
        {
            "custom_id": "b",
            "response": {
                "status_code": 200,
                "body": {
                    "object": "list",
                    "data": [{"embedding": [0.1, 0.2]}],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                },
            },
        },
    ]
    a = analyze([write_jsonl(tmp_path / "o.jsonl", lines)])
    assert a["answered"] == 2 and a["tokens"] == {"prompt": 9, "completion": 1, "total": 10}


def test_analyze_rejects_other_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a results"):
        analyze([tmp_path / "x.txt"])
    with pytest.raises(FileNotFoundError):
        analyze([tmp_path / "missing.csv"])


def test_cli_analyze(run, tmp_path, capsys):
    assert main(["analyze", str(run["csv"])]) == 0
    out = capsys.readouterr().out
    assert "answered: 7" in out and "invalid_request: 1" in out

    assert main(["analyze", str(run["out"]), str(run["err"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answered"] == 7

    est = estimate_build(run["build"]["manifest"])
    (tmp_path / "estimate.json").write_text(json.dumps(est))
    (tmp_path / "batches.json").write_text(json.dumps(BATCHES))
    html_path = tmp_path / "page" / "report.html"
    rc = main(
        [
            "analyze",
            str(run["csv"]),
            "--html",
            str(html_path),
            "--estimate",
            str(tmp_path / "estimate.json"),
            "--batches",
            str(tmp_path / "batches.json"),
        ]
    )
    assert rc == 0
    page = html_path.read_text(encoding="utf-8")
    assert page.count("data-plot=") == 3 and "batch_b" in page

    assert main(["analyze", str(run["out"]), "--html", str(tmp_path / "x.html")]) == 2
    assert "--html needs merged results .csv files" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.csv")]) == 2


def test_report_html_names_duplicate_unknown_and_unreadable_result_lines(run):
    tmp = run["tmp"]
    extra = write_jsonl(tmp / "extra.jsonl", [fail_line("row-0"), ok_line("nobody", "x", 1, 1)])
    with open(extra, "a", encoding="utf-8") as fh:
        fh.write('{"custom_id": "row-8", "response": {"status_co\n')
    files = [run["out"], run["err"], extra]
    report = merge_results(run["build"]["manifest"], files, tmp / "r" / "results.csv")
    report["problems"] = ["batch b1: the follow-up batch was refused: <quota>"]
    page = write_report_html(tmp / "r" / "results.csv", report, tmp / "r" / "report.html").read_text()
    table = re.search(r'<table class="problems">.*?</table>', page, re.S).group(0)
    assert "duplicate result lines</td><td>1</td><td>ids: row-0" in table
    assert "result lines for ids not in this run</td><td>1<" in table
    assert "unreadable result lines</td><td>1</td><td>extra.jsonl line 3 (row-8)" in table
    assert "&lt;quota&gt;" in table  # escaped
    clean = write_report_html(run["csv"], run["report"], tmp / "clean.html").read_text()
    assert 'class="problems"' not in clean


# ------------------------------------------------------------------ issue 12: several runs, pipes, axes

BATCHPIPE = Path(sys.executable).with_name("batchpipe")


def two_runs(tmp_path):
    """``output/questions/<run>/results.csv`` twice, as the pipeline leaves them (report.json with the
    model and the batches, estimate.json beside)."""
    for n, run_id in ((6, "manual__2026-01-01T00_00_00"), (3, "manual__2026-01-02T00_00_00")):
        src = write_csv(tmp_path / f"in{n}.csv", [{"prompt": f"q {i}"} for i in range(n)])
        build = build_jsonl(src, BuildOptions(model="gpt-4o"), tmp_path / f"build{n}", allowed_roots=None)
        out = write_jsonl(
            tmp_path / f"out{n}.jsonl", [ok_line(f"row-{i}", "ok", 10, i) for i in range(n - 1)]
        )
        folder = tmp_path / "output" / "questions" / run_id
        report = merge_results(build["manifest"], [out], folder / "results.csv")
        full = {**report, "model": "gpt-4o", "batches": [{**BATCHES[0], "id": f"batch_{n}"}]}
        (folder / "report.json").write_text(json.dumps(full))
        (folder / "estimate.json").write_text(json.dumps(estimate_build(build["manifest"])))
    return sorted((tmp_path / "output" / "questions").glob("*/results.csv"))


def test_the_readme_analyze_command_over_two_runs(tmp_path):
    """docs/cli.md's ``batchpipe analyze output/questions/*/results.csv --html report.html``, in a shell."""
    runs = two_runs(tmp_path)
    cmd = "batchpipe analyze output/questions/*/results.csv --html report.html"
    env = {**os.environ, "PATH": f"{BATCHPIPE.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "rows: 9  answered: 7" in done.stdout  # the text summary is over all files
    index = (tmp_path / "report.html").read_text(encoding="utf-8")
    pages = re.findall(r'<a href="([^"]+)">', index)
    assert len(pages) == 2, index
    for page_name, results, (rows, answered) in zip(pages, runs, ((6, 5), (3, 2)), strict=True):
        assert results.parent.name in page_name and "/" not in page_name
        page = (tmp_path / page_name).read_text(encoding="utf-8")  # each run's own full report
        assert f'id="count-rows"><b>{rows}</b>' in page and f'id="count-answered"><b>{answered}</b>' in page
        assert f"batch_{rows}" in page and "Shards (estimate)" in page  # report.json, estimate.json beside
        assert page.count("data-plot=") == 3
    assert 'id="count-rows"><b>9</b>' in index and 'id="count-answered"><b>7</b>' in index  # totals
    for results in runs:
        assert str(Path("output/questions") / results.parent.name / "results.csv") in index
    # one run: one page, as before; options that describe one run refuse several
    assert main(["analyze", str(runs[0]), "--html", str(tmp_path / "one.html")]) == 0
    assert not list(tmp_path.glob("one-*.html"))
    assert main(["analyze", *map(str, runs), "--html", str(tmp_path / "x.html"), "--batches", "b.json"]) == 2


def test_a_closed_pipe_is_not_a_traceback(tmp_path, run):
    """``batchpipe estimate --json | head`` and the like: the reader went away, so stop quietly."""
    src = write_csv(tmp_path / "many.csv", [{"prompt": f"question {i}"} for i in range(3000)])
    for args in (
        ["estimate", str(src), "--json"],
        ["validate", str(src), "--json"],
        ["analyze", str(run["csv"])],
    ):
        proc = subprocess.Popen([str(BATCHPIPE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first line is written
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE, as `yes | head` ends
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    env = {**os.environ, "PATH": f"{BATCHPIPE.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(f"batchpipe estimate {src} --json | head -n 2", shell=True, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.startswith("{") and done.stderr == "", done.stderr


def test_histogram_axes_have_ticks_along_both(run):
    from batchpipe.report import svg_histogram

    bins = [
        (lo, lo + 9, n)
        for lo, n in zip(range(100, 300, 10), [3, 7, 12, 40, 55, 61, 30, 22, 9, 4] * 2, strict=True)
    ]
    svg = ET.fromstring(svg_histogram(bins))
    ns = "{http://www.w3.org/2000/svg}"
    texts = [(float(t.get("x")), float(t.get("y")), t.text) for t in svg.iter(f"{ns}text")]
    y_axis = sorted((y, int(text)) for x, y, text in texts if x < 50 and text.strip().isdigit())
    x_axis = sorted((x, int(text)) for x, y, text in texts if x >= 50 and y > 200 and text.strip().isdigit())
    assert len(y_axis) >= 4 and len(x_axis) >= 4, (y_axis, x_axis)
    # y: counts grow upwards, from 0 to at least the peak (61), evenly spaced
    assert y_axis[-1][1] == 0 and y_axis[0][1] >= 61
    assert [v for _, v in y_axis] == sorted((v for _, v in y_axis), reverse=True)
    # x: token values grow to the right, from the first bin's low to the last bin's high
    assert x_axis[0][1] == 100 and x_axis[-1][1] == 299
    assert [v for _, v in x_axis] == sorted(v for _, v in x_axis)
    ticks = [line for line in svg.iter(f"{ns}line") if line.get("data-tick")]
    assert {t.get("data-tick") for t in ticks} == {"x", "y"} and len(ticks) == len(x_axis) + len(y_axis)
    one = ET.fromstring(svg_histogram([(5, 5, 1)]))  # a single bin of one value: still labelled
    labels = {t.text: float(t.get("x")) for t in one.iter(f"{ns}text") if t.text.strip().isdigit()}
    assert 50 < labels["5"] < 600, labels  # under its bar, inside the picture


# --------------------------------------------------------------------------- finish_report


def _actual(run, input_price=2.5, output_price=10.0, discount=0.5):
    return round((run["prompt"] * input_price + run["completion"] * output_price) / 1e6 * discount, 6)


def test_finish_report_writes_the_cost_once_into_report_json_and_the_page(run):
    from batchpipe.report import finish_report

    est = estimate_build(run["build"]["manifest"])
    prices = load_prices({"models": {"gpt-4o": {"input": 1.0, "output": 3.0}}})
    raw = [{**b, "errors": None, "metadata": {"k": "v"}} for b in BATCHES]  # as the API has them
    full = finish_report(
        run["csv"], run["report"], estimate=est, batches=raw, model="gpt-4o", prices=prices,
        problems=["batch batch_b: expired"], shown="s3://bucket/out/run 1",
    )  # fmt: skip
    assert json.loads(run["report_json"].read_text(encoding="utf-8")) == full
    assert not list(run["csv"].parent.glob(".*"))  # no temporary file left
    actual = _actual(run, 1.0, 3.0)
    expected = est["cost"]["batch"]["expected"]
    assert full["model"] == "gpt-4o"
    assert full["cost_usd"]["actual_batch"] == actual
    assert full["cost_usd"]["actual_standard"] == _actual(run, 1.0, 3.0, 1.0)
    assert full["cost_usd"]["estimated_batch_expected"] == expected
    assert full["cost_usd"]["estimated_batch_max"] == est["cost"]["batch"]["max"]
    assert full["cost_usd"]["difference_pct"] == round((actual - expected) / expected * 100, 1)
    assert full["cost_usd"]["price"]["input"] == 1.0 and full["cost_usd"]["price"]["as_of"]
    assert full["estimate"] == {k: est[k] for k in ("prompt_tokens", "image_tokens", "output_tokens_max")}
    assert full["batches"] == BATCHES  # the API's errors and metadata are not the report's
    assert full["batch_ids"] == [] and full["problems"] == ["batch batch_b: expired"]
    # the counts are merge's, unchanged
    paths = ("results_csv", "results_parquet", "report", "problems")
    assert {k: full[k] for k in run["report"] if k not in paths} == {
        k: v for k, v in run["report"].items() if k not in paths
    }
    assert (full["results_csv"], full["results_parquet"], full["report"]) == (
        "s3://bucket/out/run 1/results.csv",
        "s3://bucket/out/run 1/results.parquet",
        "s3://bucket/out/run 1/report.json",
    )
    page = (run["csv"].parent / "report.html").read_text(encoding="utf-8")
    assert f"${actual:.6f}".rstrip("0").rstrip(".") in page
    assert "results: s3://bucket/out/run 1/results.csv" in page and "batch batch_b: expired" in page


def test_the_page_shows_the_cost_it_is_given_and_computes_none(run):
    """finish_report hands its figures to the page: the page never prices the tokens again (here its
    own price table would say 'unknown')."""
    cost = {"actual_batch": 0.123457, "actual_standard": 0.246914, "price": None}
    page = write_report_html(
        run["csv"], run["report_json"], run["tmp"] / "given.html", model="no-such-model", prices={},
        cost=cost,
    ).read_text(encoding="utf-8")  # fmt: skip
    assert "$0.123457" in page and "$0.246914" in page


def test_finish_report_without_estimate_model_or_price(run):
    from batchpipe.report import finish_report

    full = finish_report(run["csv"], run["report"], prices=load_prices())
    assert full["model"] is None and full["cost_usd"]["actual_batch"] is None
    assert full["cost_usd"]["difference_pct"] is None and full["batches"] == []
    assert full["estimate"] == {"prompt_tokens": None, "image_tokens": None, "output_tokens_max": None}
    assert full["problems"] == run["report"]["problems"]
    unknown = finish_report(run["csv"], run["report"], model="acme-9", prices=load_prices())
    assert unknown["model"] == "acme-9" and unknown["cost_usd"]["actual_batch"] is None
    assert "Actual cost unknown: no price for model acme-9" in (run["csv"].parent / "report.html").read_text()


_FULL_DISK = """
import json, resource, signal, sys
from batchpipe.report import finish_report
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
csv, report, limit = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
batches = json.loads(sys.stdin.read())
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    finish_report(csv, report, batches=batches, model="gpt-4o")
except OSError as exc:
    print(exc.errno)
"""


@pytest.mark.parametrize("which", ["report.html", "report.json"])
def test_a_write_cut_short_leaves_no_partial_report(run, which):
    """The disk fills while the page or the report is written: report.json is the one that was there
    (merge's), whole, and no temporary file stays behind."""
    before = run["report_json"].read_bytes()
    # a big batch entry makes report.json larger than the page (the page shows few of its fields)
    batches = [{**BATCHES[0], "note": "x" * 200_000}] if which == "report.json" else BATCHES
    limit = 100_000 if which == "report.json" else 2_000
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(run["csv"]), json.dumps(run["report"]), str(limit)],
        input=json.dumps(batches), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "27", done.stdout + done.stderr  # EFBIG
    assert run["report_json"].read_bytes() == before
    json.loads(before)
    assert sorted(p.name for p in run["csv"].parent.iterdir()) == sorted(
        ["results.csv", "results.parquet", "report.json"]
        + (["report.html"] if which == "report.json" else [])
    )


def test_analyze_never_writes_its_report_over_a_results_file(tmp_path, capsys):
    runs = two_runs(tmp_path)
    before = [r.read_bytes() for r in runs]
    # --html before the glob: the first results.csv would be taken as the report's path
    assert main(["analyze", "--html", str(runs[1]), str(runs[0])]) == 2
    assert "that is a results file, not a report page" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["analyze", str(runs[0]), "--html", str(tmp_path / "notes.txt")]) == 2
    assert [r.read_bytes() for r in runs] == before and (tmp_path / "notes.txt").read_text() == "mine"
    # a report page from an earlier analyze is replaced, and one file named twice is one run
    assert main(["analyze", str(runs[0]), "--html", str(tmp_path / "r.html")]) == 0
    assert main(["analyze", str(runs[0]), "--html", str(tmp_path / "r.html")]) == 0
    same = str(runs[0].parent / "." / "results.csv")
    assert main(["analyze", str(runs[0]), same, "--html", str(tmp_path / "r.html")]) == 0
    assert not list(tmp_path.glob("r-*.html"))


def test_analyze_writes_the_report_even_when_its_reader_stops_early(tmp_path):
    runs = two_runs(tmp_path)
    cmd = [str(BATCHPIPE), "analyze", "--json", *map(str, runs), "--html", str(tmp_path / "r.html")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert (tmp_path / "r.html").is_file() and len(list(tmp_path.glob("r-*.html"))) == 2


@pytest.mark.parametrize(
    "name, content",
    [("report.json", b'{"rows": "<script>", "errors_by_code": 5}'), ("estimate.json", b'{"model": 5}'),
     ("report.json", b"\xff\xfe not utf-8")],
)  # fmt: skip
def test_analyze_survives_hostile_files_beside_a_results_csv(tmp_path, capsys, name, content):
    runs = two_runs(tmp_path)
    (runs[0].parent / name).write_bytes(content)
    code = main(["analyze", *map(str, runs), "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    if content.startswith(b"\xff"):  # not JSON at all: a clear error naming the file
        assert code == 2 and "report.json" in err and "cannot read JSON" in err and "Traceback" not in err
        return
    assert code == 0, err
    assert name != "report.json" or "are not what a run leaves" in err  # that page: from the CSV alone
    assert len(list(tmp_path.glob("r-*.html"))) == 2 and "<script>" not in (tmp_path / "r.html").read_text()

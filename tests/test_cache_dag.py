"""Paying once across runs, through ``dag.test()`` against the local batch server over real HTTP: the same
CSV again with the same ``cache_dir`` sends only the rows that failed last time, with byte-identical answers;
with every row kept, nothing is uploaded and no batch is created, and the full results.csv still lands."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from conftest import REPO, run_pipeline

SAMPLE = REPO / "data" / "sample"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def landed(out: Path) -> Path:
    found = list((out / "pictures").glob("*/results.csv"))  # one run per output folder here
    assert len(found) == 1, found
    return found[0]


def sent_custom_ids(server, batch) -> list[str]:
    content = server.client().files.content(batch.input_file_id).read().decode()
    return [json.loads(x)["custom_id"] for x in content.splitlines()]


def test_the_same_csv_again_sends_only_the_failed_rows_then_nothing(dag, srv, tmp_path):
    data = tmp_path / "in"
    shutil.copytree(SAMPLE / "images", data / "images")
    pics = ["images/red_circle.png", "images/green_triangle.jpg", ""]
    rows = [[f"r{i:02d}", f"What is in picture {i}?", pics[i % 3]] for i in range(12)]
    rows[4][1] = "ZAP: refused the first time"  # the server refuses these two while the marker is set
    rows[9][1] = "ZAP again, with a picture"
    rows[7][1:] = rows[1][1:]  # a repeat of row 1: never sent, answered by row 1
    rows[10][1] = ""  # invalid: not sent, never cached
    src = data / "pictures.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["id", "prompt", "image"], *rows])
    cache, client = tmp_path / "cache", srv.client()
    conf = {"cache_dir": str(cache), "model": "gpt-4o-mini", "max_tokens": 100}

    srv.set_config({"reject_marker": "ZAP"})
    dr1, tis1 = run_pipeline(dag, tmp_path / "1", src, **conf)
    assert dr1.state == "success", tis1
    first = read_csv(landed(tmp_path / "1" / "out"))
    assert [r["error"].startswith("HTTP 400") for r in first] == [i in (4, 9) for i in range(12)]
    assert len(client.batches.list().data) == 1

    srv.set_config({"reject_marker": None})
    files_before = len(client.files.list().data)
    dr2, tis2 = run_pipeline(dag, tmp_path / "2", src, **conf)
    assert dr2.state == "success", tis2
    batches = client.batches.list().data
    assert len(batches) == 2 and sent_custom_ids(srv, batches[0]) == ["row-4", "row-9"]
    second = read_csv(landed(tmp_path / "2" / "out"))
    assert [r["id"] for r in second] == [r[0] for r in rows]
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if i in (4, 9):
            assert b["error"] == "" and b["response"].startswith(f"ECHO: {rows[i][1]}")
            assert b["answered_from"] == "batch" and b["total_tokens"] != ""
        elif i == 10:
            assert b["error"].startswith("not sent: empty prompt") and b["answered_from"] == ""
        else:  # the kept answer, byte for byte; not billed again
            assert b["response"] == a["response"] and b["error"] == ""
            assert b["answered_from"] == ("row 1" if i == 7 else "cache") and b["total_tokens"] == ""
    assert len(client.files.list().data) > files_before

    files_before = len(client.files.list().data)
    dr3, tis3 = run_pipeline(dag, tmp_path / "3", src, **conf)
    assert dr3.state == "success", tis3
    assert len(client.batches.list().data) == 2  # no batch
    assert len(client.files.list().data) == files_before  # no upload
    assert {t for (t, _), ti in tis3.items() if ti.state == "success"} == {
        "validate_csv",
        "build_jsonl",
        "merge",
    }
    results = landed(tmp_path / "3" / "out")
    third = read_csv(results)
    assert [r["response"] for r in third] == [r["response"] for r in second]
    assert [r["answered_from"] for r in third] == [
        "row 1" if i == 7 else "" if i == 10 else "cache" for i in range(12)
    ]
    report = json.loads((results.parent / "report.json").read_text())
    assert (report["rows"], report["answered"], report["invalid"], report["batch_ids"]) == (12, 11, 1, [])
    assert report["answered_from_cache"] == 10 and report["savings"]["from_cache"]["rows"] == 10
    assert report["savings"]["batch_usd"] > 0 and report["cost_usd"]["actual_batch"] == 0
    assert report["cache"] == {"folder": str(cache), "mode": "read_write", "added": 0}
    estimate = json.loads((results.parent / "estimate.json").read_text())
    assert estimate["requests"] == 0 and estimate["cache"]["rows"] == 10
    assert estimate["cache"]["batch_usd"] == report["savings"]["from_cache"]["batch_usd"]
    assert "Not spent" in (results.parent / "report.html").read_text()

"""The batchpipe CLI: validate, build, merge round trip; exit code 2 on input errors."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from batchpipe.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "questions.csv"


def write_inputs(tmp_path):
    Image.new("RGB", (10, 10), "green").save(tmp_path / "g.png")
    rows = [
        {"id": "a", "prompt": "hello, there", "image": "", "zip": "007"},
        {"id": "b", "prompt": "look", "image": "g.png", "zip": ""},
        {"id": "c", "prompt": "", "image": "", "zip": "010"},
        {"id": "d", "prompt": "multi\nline", "image": "", "zip": "0"},
    ]
    p = tmp_path / "in.csv"
    with open(p, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p, rows


def answer_all(build_dir, out_path):
    with open(out_path, "w", encoding="utf-8") as out:
        for shard in sorted(Path(build_dir).glob("shard-*.jsonl")):
            for raw in reversed(shard.read_text(encoding="utf-8").splitlines()):
                cid = json.loads(raw)["custom_id"]
                out.write(
                    json.dumps(
                        {
                            "custom_id": cid,
                            "response": {
                                "status_code": 200,
                                "body": {
                                    "choices": [{"message": {"content": f"ok {cid}"}}],
                                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                                },
                            },
                        }
                    )
                    + "\n"
                )


def test_main_round_trip(tmp_path, capsys):
    p, rows = write_inputs(tmp_path)
    assert main(["validate", str(p), "--image-column", "image", "--id-column", "id", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid"] == 3 and summary["invalid"] == 1

    build = tmp_path / "build"
    assert (
        main(
            [
                "build",
                str(p),
                "--out-dir",
                str(build),
                "--image-column",
                "image",
                "--id-column",
                "id",
                "--max-requests-per-batch",
                "2",
                "--max-tokens",
                "20",
                "--extra-body",
                '{"seed": 3}',
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        "shard 0:" in text
        and "shard 1:" in text
        and "data row 2 (0-based; line 4 of the file) [prompt]: empty prompt" in text
    )
    first = json.loads((build / "shard-00000.jsonl").read_text().splitlines()[0])
    assert first["body"]["seed"] == 3 and first["body"]["max_tokens"] == 20

    answer_all(build, tmp_path / "out.jsonl")
    out_csv = tmp_path / "results.csv"
    assert (
        main(
            [
                "merge",
                "--build-dir",
                str(build),
                str(tmp_path / "out.jsonl"),
                "--out",
                str(out_csv),
                "--batch-id",
                "batch_x",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["answered"] == 3 and report["invalid"] == 1 and report["batch_ids"] == ["batch_x"]
    with open(out_csv, encoding="utf-8", newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [r["zip"] for r in got] == ["007", "", "010", "0"]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    assert [r["response"] for r in got] == ["ok a", "ok b", "", "ok d"]


def test_main_input_error_exit_2(tmp_path, capsys):
    p, _ = write_inputs(tmp_path)
    assert main(["validate", str(p), "--image-column", "picture"]) == 2
    err = capsys.readouterr().err
    assert "in.csv: column 'picture' not found (columns: id, prompt, image, zip)" in err
    assert main(["build", str(p), "--out-dir", str(tmp_path / "b"), "--start-row", "9"]) == 2
    assert "4 data row" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "batchpipe").exists(), reason="console script not installed"
)
def test_console_script_on_sample(tmp_path):
    exe = str(REPO / ".venv" / "bin" / "batchpipe")
    sample_dir = tmp_path / "sample"
    shutil.copytree(SAMPLE.parent, sample_dir)
    csv_path = sample_dir / "questions.csv"
    build = tmp_path / "build"
    r = subprocess.run(
        [
            exe,
            "build",
            str(csv_path),
            "--out-dir",
            str(build),
            "--id-column",
            "id",
            "--image-column",
            "image",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rows"] == 30 and res["invalid"] == 2 and res["valid"] == 28
    answer_all(build, tmp_path / "out.jsonl")
    r = subprocess.run(
        [
            exe,
            "merge",
            "--build-dir",
            str(build),
            str(tmp_path / "out.jsonl"),
            "--out",
            str(tmp_path / "results.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["rows"], report["answered"], report["invalid"]) == (30, 28, 2)
    r = subprocess.run([exe, "validate", str(tmp_path / "missing.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.csv: file not found" in r.stderr


def test_sample_data_shape():
    with open(SAMPLE, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "prompt", "image", "zip"]
    assert len(rows) == 30
    assert any(r["zip"].startswith("0") and len(r["zip"]) > 1 for r in rows)
    assert sum(1 for r in rows if r["image"]) == 6  # 5 real images + 1 missing on purpose
    assert sum(1 for r in rows if "[[reject]]" in r["prompt"]) == 1
    assert sum(1 for r in rows if r["prompt"] == "") == 1
    assert len(list((SAMPLE.parent / "images").iterdir())) == 4


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "batchpipe.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "validate" in r.stdout


def test_merge_refuses_a_csv_whose_rows_changed_since_the_build(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("prompt\nfirst\nsecnd\n", encoding="utf-8")
    assert main(["build", str(src), "--out-dir", str(tmp_path / "b")]) == 0
    src.write_text("prompt\nsecnd\nfirst\n", encoding="utf-8")  # swapped: same size, same rows
    capsys.readouterr()
    assert main(["merge", "--build-dir", str(tmp_path / "b"), "--out", str(tmp_path / "r.csv")]) == 2
    assert "selected rows changed since the build" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_validate_names_rows_by_index_and_line(tmp_path, capsys):
    """The eighth data row is row 7 (0-based); after a cell spanning three lines it is not on line 9."""
    p = tmp_path / "in.csv"
    rows = ['m0,"one\ntwo\nthree"'] + [f"r{i},q{i}" for i in range(1, 7)] + ["r7,"]
    p.write_text("id,prompt\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert main(["validate", str(p)]) == 0
    out = capsys.readouterr().out
    assert "  data row 7 (0-based; line 11 of the file) [prompt]: empty prompt" in out, out
    assert main(["build", str(p), "--out-dir", str(tmp_path / "b")]) == 0
    assert "data row 7 (0-based; line 11 of the file) [prompt]" in capsys.readouterr().out


def _built_and_answered(tmp_path, capsys, *build_args):
    p, _ = write_inputs(tmp_path)
    build = tmp_path / "build"
    assert main(["build", str(p), "--out-dir", str(build), "--id-column", "id", *build_args]) == 0
    answer_all(build, tmp_path / "out.jsonl")
    capsys.readouterr()
    return build, tmp_path / "out.jsonl"


def test_merge_finishes_the_report_as_the_pipeline_does(tmp_path, capsys):
    """Model from the build, estimate.json found in the out folder, batches (and their ids) from a JSON
    list: report.json gets the cost, the estimate and the batches; report.html is written beside it."""
    opts = ["--model", "gpt-4o-mini", "--image-column", "image"]
    build, answers = _built_and_answered(tmp_path, capsys, *opts)
    assert (
        main(
            [
                "estimate",
                str(tmp_path / "in.csv"),
                *opts,
                "--id-column",
                "id",
                "--out-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    batches = [
        {"id": "batch_1", "status": "completed", "request_counts": {"total": 3}, "metadata": {"a": "b"}},
        {"id": "batch_2", "status": "completed", "round": 1},
    ]
    (tmp_path / "batches.json").write_text(json.dumps({"object": "list", "data": batches}))
    out = tmp_path / "run" / "results.csv"
    capsys.readouterr()
    args = ["merge", "--build-dir", str(build), str(answers), "--out", str(out)]
    assert main([*args, "--batches", str(tmp_path / "batches.json")]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == report
    estimate = json.loads((tmp_path / "run" / "estimate.json").read_text())
    assert report["model"] == "gpt-4o-mini"
    assert report["estimate"]["prompt_tokens"] == estimate["prompt_tokens"]
    assert report["cost_usd"]["estimated_batch_expected"] == estimate["cost"]["batch"]["expected"]
    # 3 answered rows of 1 + 1 tokens at gpt-4o-mini's Batch prices
    assert report["cost_usd"]["actual_batch"] == round((3 * 0.15 + 3 * 0.6) / 1e6 * 0.5, 6)
    assert report["batches"] == [{k: v for k, v in b.items() if k != "metadata"} for b in batches]
    assert report["batch_ids"] == ["batch_1", "batch_2"]
    assert "batch_2" in (tmp_path / "run" / "report.html").read_text()
    # --batch-id wins over the batches' ids; --model and --prices over the build's and the shipped table
    assert main([*args, "--batches", str(tmp_path / "batches.json"), "--batch-id", "batch_9", "--model",
                 "acme-1", "--prices", '{"models": {"acme-1": {"input": 1, "output": 1}}}']) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["batch_ids"] == ["batch_9"] and report["model"] == "acme-1"
    assert report["cost_usd"]["actual_batch"] == round(6 / 1e6 * 0.5, 6)


def test_merge_finds_the_estimate_in_the_build_folder_and_refuses_bad_report_inputs(tmp_path, capsys):
    build, answers = _built_and_answered(tmp_path, capsys)
    assert main(["estimate", str(tmp_path / "in.csv"), "--id-column", "id", "--out-dir", str(build)]) == 0
    capsys.readouterr()
    args = ["merge", "--build-dir", str(build), str(answers), "--out", str(tmp_path / "r" / "results.csv")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "gpt-4o" and report["estimate"]["prompt_tokens"] > 0
    assert report["batches"] == [] and report["batch_ids"] == []
    before = (tmp_path / "r" / "report.json").read_bytes()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "noid.json").write_text('[{"status": "completed"}]')
    for extra, message in [
        (["--estimate", str(tmp_path / "missing.json")], "missing.json: cannot read JSON"),
        (["--estimate", str(tmp_path / "bad.json")], "bad.json: cannot read JSON"),
        (["--estimate", str(tmp_path / "list.json")], f"--estimate {tmp_path / 'list.json'}: expected"),
        (["--batches", str(tmp_path / "bad.json")], "bad.json: cannot read JSON"),
        (["--batches", str(tmp_path / "list.json")], "list.json: batch 1 is not a JSON object"),
        (["--batches", str(tmp_path / "noid.json")], "noid.json: batch 1 has no 'id'"),
        (["--prices", "{nope"], "prices"),
    ]:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("batchpipe: error: ") and message in err and "Traceback" not in err, err
    assert (tmp_path / "r" / "report.json").read_bytes() == before  # refused before anything was written

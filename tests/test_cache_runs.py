"""Paying once across runs (library, no Airflow): the build answers rows from the answer cache and does not
send them, the merge lands them (``answered_from: cache``), and only the answers the merge put on their own
rows are kept afterwards (never an error, a copy, an answer the schema refuses, or an id answered twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchpipe import BuildOptions, build_jsonl, merge_results
from batchpipe.cache import AnswerCache, NewAnswers, ObjectAnswerCache, is_answer_line, request_key
from batchpipe.estimate import estimate_build, format_estimate
from batchpipe.report import finish_report
from test_dedupe import answer_all, line, read_csv, sent, write_csv


def run(tmp: Path, name: str, src: Path, opts: BuildOptions, cache, fail=frozenset(), results=None):
    """Build with ``cache``, answer what was sent (``fail``: ids answered with an HTTP 400), merge, keep the
    new answers. Returns (build, report, rows of results.csv)."""
    b = build_jsonl(src, opts, tmp / name / "work", allowed_roots=None, cache=cache)
    files = []
    if b["shards"]:
        files = [
            results(b, tmp / name / "out.jsonl") if results else answer_all(b, tmp / name / "out.jsonl", fail)
        ]
    out = tmp / name / "results.csv"
    with NewAnswers(tmp / name) as new:
        report = merge_results(b["manifest"], files, out, allowed_roots=None, answered=new.answered)
        report["added"] = new.keep(cache, [s["path"] for s in b["shards"]], files, opts.endpoint, opts.model)
    return b, report, read_csv(out)


@pytest.mark.parametrize("id_column", [None, "id"])
def test_the_same_csv_again_sends_only_what_failed_and_then_nothing(tmp_path, id_column):
    prompts = ["a", "b", "c", "a", "d", "", "e"]
    src = write_csv(tmp_path / "in.csv", ["id", "prompt"], [[f"k{i}", p] for i, p in enumerate(prompts)])
    opts = BuildOptions(id_column=id_column)
    cid = (lambda i: f"k{i}") if id_column else (lambda i: f"row-{i}")
    with AnswerCache(tmp_path / "cache") as cache:
        b1, r1, rows1 = run(tmp_path, "1", src, opts, cache, fail={cid(2)})
        assert (b1["valid"], b1["duplicates"], b1["cached"]) == (6, 1, 0)
        assert len(sent(b1)) == 5  # a b c d e: the second "a" is a copy
        assert r1["added"] == 4 and cache.stats()["entries"] == 4  # c failed; the copy is not an answer
        assert [r["answered_from"] for r in rows1] == [
            "batch",
            "batch",
            "batch",
            "row 0",
            "batch",
            "",
            "batch",
        ]

        b2, r2, rows2 = run(tmp_path, "2", src, opts, cache)
        assert [r["custom_id"] for r in sent(b2)] == [cid(2)]  # only the row that failed last time
        assert (b2["cached"], b2["duplicates"]) == (4, 1)
        assert [r["answered_from"] for r in rows2] == [
            "cache",
            "cache",
            "batch",
            "row 0",
            "cache",
            "",
            "cache",
        ]
        for old, new in zip(rows1, rows2, strict=True):
            if old["error"] == "":
                assert new["response"] == old["response"]  # byte for byte
        assert rows2[2]["response"] == "answer to c" and rows2[2]["error"] == ""
        # the cached rows are not billed by this run: empty token cells, their tokens counted as saved
        assert [r["total_tokens"] for r in rows2] == ["", "", "10", "", "", "", ""]
        assert r2["tokens"]["prompt"] == 7 and r2["answered_from_cache"] == 4
        assert r2["saved"]["from_cache"] == {"rows": 4, "prompt": 28, "completion": 12}
        assert r2["saved"]["from_duplicates"] == {"rows": 1, "prompt": 7, "completion": 3}
        assert r2["added"] == 1

        b3, r3, rows3 = run(tmp_path, "3", src, opts, cache)
        assert b3["shards"] == [] and b3["cached"] == 5  # nothing to upload, no batch
        assert [r["answered_from"] for r in rows3] == ["cache"] * 3 + ["row 0", "cache", "", "cache"]
        assert [r["response"] for r in rows3] == [r["response"] for r in rows2]
        assert r3["rows"] == 7 and r3["answered"] == 6 and r3["invalid"] == 1 and r3["problems"] == []


def test_estimate_and_report_show_what_was_not_spent(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["a"], ["c"]])
    opts = BuildOptions(model="gpt-4o-mini", max_tokens=50)
    with AnswerCache(tmp_path / "cache") as cache:
        run(tmp_path, "1", src, opts, cache, fail={"row-3"})
        b, report, _ = run(tmp_path, "2", src, opts, cache)
    est = estimate_build(b["manifest"])
    assert est["requests"] == 1
    assert est["cache"]["rows"] == 2 and est["cache"]["prompt_tokens"] == 14
    assert est["cache"]["completion_tokens"] == 6 and est["cache"]["batch_usd"] > 0
    # the copy of row 0 (answered from the cache) saved that answer's tokens too
    assert est["duplicates"]["rows"] == 1 and est["duplicates"]["prompt_tokens"] == 7
    md = format_estimate(est)
    assert "rows answered from the cache | 2 (not sent" in md
    full = finish_report(tmp_path / "2" / "results.csv", report, estimate=est, model="gpt-4o-mini")
    assert full["savings"]["rows"] == 3
    assert full["savings"]["from_cache"]["batch_usd"] == est["cache"]["batch_usd"]
    assert full["savings"]["batch_usd"] > full["savings"]["from_cache"]["batch_usd"] > 0
    page = (tmp_path / "2" / "report.html").read_text("utf-8")
    assert 'id="from-cache"' in page and "Not spent" in page and 'class="savings"' in page


def test_refresh_sends_everything_and_replaces_read_only_adds_nothing(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])
    opts = BuildOptions()
    with AnswerCache(tmp_path / "cache") as cache:
        run(tmp_path, "1", src, opts, cache)
    with AnswerCache(tmp_path / "cache", "read_only") as ro:
        b, report, rows = run(tmp_path, "2", src, opts, ro)
        assert b["cached"] == 2 and report["added"] == 0
    with AnswerCache(tmp_path / "cache", "refresh") as fresh:

        def other(build, path):
            lines = [line(r["custom_id"], {r["custom_id"]: r["body"]}) for r in sent(build)]
            for x in lines:
                x["response"]["body"]["choices"][0]["message"]["content"] += " (again)"
            path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
            return path

        b, report, rows = run(tmp_path, "3", src, opts, fresh, results=other)
        assert b["cached"] == 0 and len(sent(b)) == 2 and report["added"] == 2
    with AnswerCache(tmp_path / "cache") as cache:
        b, _, rows = run(tmp_path, "4", src, opts, cache)
    assert b["shards"] == [] and [r["response"] for r in rows] == [
        "answer to a (again)",
        "answer to b (again)",
    ]


def test_an_id_answered_twice_and_an_answer_the_schema_refuses_are_not_kept(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["c"]])
    opts = BuildOptions(response_schema=schema)

    def answers(build, path):
        out = []
        for r, text in zip(sent(build), ['{"n": 1}', "not json", '{"n": 3}'], strict=True):
            x = line(r["custom_id"], {r["custom_id"]: r["body"]})
            x["response"]["body"]["choices"][0]["message"]["content"] = text
            out.append(x)
        twice = json.loads(json.dumps(out[2]))
        twice["response"]["body"]["choices"][0]["message"]["content"] = '{"n": 4}'
        path.write_text("".join(json.dumps(x) + "\n" for x in [*out, twice]), encoding="utf-8")
        return path

    with AnswerCache(tmp_path / "cache") as cache:
        _, report, rows = run(tmp_path, "1", src, opts, cache, results=answers)
        assert report["answered"] == 2 and report["added"] == 1  # "not json" failed; row 2 came twice
        b, _, _ = run(tmp_path, "2", src, opts, cache)
        assert [r["custom_id"] for r in sent(b)] == ["row-1", "row-2"]


def test_a_damaged_or_foreign_entry_is_a_miss_never_an_answer(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["c"]])
    opts = BuildOptions()
    first = build_jsonl(src, opts, tmp_path / "w0", allowed_roots=None)
    keys = [request_key(x.encode()) for x in Path(first["shards"][0]["path"]).read_text().splitlines()]
    with AnswerCache(tmp_path / "cache") as cache:
        cache.put_many([
            (keys[0], b'{"custom_id": "row-0", "response": {"status_code": 200, "body": {"choices": [',
             None, None),
            (keys[1], b'{"custom_id": "row-1", "response": {"status_code": 500, "body": {}}, "error": null}',
             None, None),
        ])  # fmt: skip
        b = build_jsonl(src, opts, tmp_path / "w1", allowed_roots=None, cache=cache)
    assert b["cached"] == 0 and len(sent(b)) == 3


def test_the_object_cache_names_entries_by_key_and_skips_what_is_cut_short(tmp_path):
    root = tmp_path / "bucket" / "prefix"
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["c"]])
    opts = BuildOptions()
    cache = ObjectAnswerCache(root)
    b, report, _ = run(tmp_path, "1", src, opts, cache)
    assert report["added"] == 3
    stored = sorted(root.rglob("*"))
    entries = [p for p in stored if p.is_file()]
    keys = [request_key(x.encode()) for x in Path(b["shards"][0]["path"]).read_text().splitlines()]
    assert sorted(p.name for p in entries) == sorted(keys)
    assert all(p.parent.name == p.name[:2] and p.parent.parent.name == "answers" for p in entries)
    assert all(is_answer_line(p.read_bytes()[:-1]) for p in entries)
    # one entry cut short (a copy interrupted), another replaced by something else
    cut = root / "answers" / keys[1][:2] / keys[1]
    cut.write_bytes(cut.read_bytes()[:-1])
    junk = root / "answers" / keys[2][:2] / keys[2]
    junk.write_bytes(b"<html>gateway timeout</html>\n")
    b2, report2, rows = run(tmp_path, "2", src, opts, cache)
    assert [r["custom_id"] for r in sent(b2)] == ["row-1", "row-2"]
    assert [r["answered_from"] for r in rows] == ["cache", "batch", "batch"]
    assert report2["added"] == 2  # the damaged entries are replaced by the answers paid for again
    b3, _, rows = run(tmp_path, "3", src, opts, cache)
    assert b3["shards"] == [] and [r["answered_from"] for r in rows] == ["cache"] * 3
    with pytest.raises(ValueError):
        cache.get_many(["../../etc/passwd"])


def test_cli_build_estimate_and_merge_take_the_cache(tmp_path, capsys):
    from batchpipe.cli import main

    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])
    cache_dir = tmp_path / "cache"
    assert main(["build", str(src), "--out-dir", str(tmp_path / "b1"), "--cache-dir", str(cache_dir)]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "b1" / "build_manifest.json").read_text())
    res = answer_all({"shards": manifest["shards"]}, tmp_path / "out.jsonl")
    out = tmp_path / "r1" / "results.csv"
    merged = ["merge", "--build-dir", str(tmp_path / "b1"), str(res), "--out", str(out)]
    assert main([*merged, "--cache-dir", str(cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["added"] == 2
    assert main(["estimate", str(src), "--cache-dir", str(cache_dir), "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["requests"] == 0 and est["cache"]["rows"] == 2
    assert main(["build", str(src), "--out-dir", str(tmp_path / "b2"), "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 row(s) answered from the answer cache" in out and "every row is answered" in out
    assert main(["build", str(src), "--out-dir", str(tmp_path / "b3"), "--cache-dir", str(cache_dir),
                 "--cache-mode", "refresh", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["cached"] == 0


def lines_of(build: dict) -> dict[str, dict]:
    return {r["custom_id"]: line(r["custom_id"], {r["custom_id"]: r["body"]}) for r in sent(build)}


def test_only_the_line_the_merge_took_is_kept_never_an_id_with_several_candidates(tmp_path):
    # row-0: an empty 200 answer, then a 200 answer that also carries an error member (the merge takes the
    # second); row-1: a line cut short that still names it, then an answer; row-2: one plain answer
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["c"]])

    def lying(build, path):
        by = lines_of(build)
        empty = json.loads(json.dumps(by["row-0"]))
        empty["response"]["body"]["choices"][0]["message"]["content"] = ""
        also = {**by["row-0"], "error": {"code": "x", "message": "y"}}
        out = [json.dumps(empty), json.dumps(also), json.dumps(by["row-1"])[:40], json.dumps(by["row-1"]),
               json.dumps(by["row-2"])]  # fmt: skip
        path.write_text("\n".join(out) + "\n", encoding="utf-8")
        return path

    with AnswerCache(tmp_path / "cache") as cache:
        _, report, rows = run(tmp_path, "1", src, BuildOptions(), cache, results=lying)
        assert report["added"] == 1 and cache.stats()["entries"] == 1
        b, _, rows = run(tmp_path, "2", src, BuildOptions(), cache)
    assert [r["custom_id"] for r in sent(b)] == ["row-0", "row-1"]
    assert [r["answered_from"] for r in rows] == ["batch", "batch", "cache"]


def test_a_cr_inside_an_answer_line_is_kept_as_one_ascii_line_and_read_back_the_same(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])

    def with_cr(build, path):
        by = lines_of(build)
        by["row-0"]["response"]["body"]["choices"][0]["message"]["content"] = "caf\u00e9 \U0001f600 end"
        text = json.dumps(by["row-0"], ensure_ascii=False).replace(', "error"', ',\r "error"')
        path.write_text(text + "\n" + json.dumps(by["row-1"]) + "\n", encoding="utf-8", newline="")
        return path

    with AnswerCache(tmp_path / "cache") as cache:
        _, report, first = run(tmp_path, "1", src, BuildOptions(), cache, results=with_cr)
        assert report["added"] == 2
        kept = cache.get_many(cache.db.execute("SELECT key FROM answers").fetchall()[0])
        assert all(line.isascii() and b"\r" not in line for line in kept.values())
        b, _, second = run(tmp_path, "2", src, BuildOptions(), cache)
    assert b["shards"] == [] and estimate_build(b["manifest"])["cache"]["rows"] == 2
    assert [r["response"] for r in second] == [r["response"] for r in first]
    assert second[0]["response"] == "caf\u00e9 \U0001f600 end"


def test_a_records_file_of_another_build_is_never_read(tmp_path):
    from batchpipe.errors import InputError

    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"]])
    with AnswerCache(tmp_path / "cache") as cache:
        run(tmp_path, "1", src, BuildOptions(), cache)
        b, _, _ = run(tmp_path, "2", src, BuildOptions(), cache)
    stale = Path(b["work_dir"]) / "cached.jsonl"
    assert b["cached"] == 2 and stale.is_file()
    kept = stale.read_bytes()
    # the CSV is edited and built again without the cache (a work folder in object storage keeps what an
    # earlier build stored: the old cached.jsonl is still there)
    write_csv(src, ["prompt"], [["new a"], ["new b"]])
    b2 = build_jsonl(src, BuildOptions(), tmp_path / "3", allowed_roots=None)
    (tmp_path / "3" / "cached.jsonl").write_bytes(kept)
    res = answer_all(b2, tmp_path / "3" / "out.jsonl")
    merge_results(b2["manifest"], [res], tmp_path / "3" / "results.csv", allowed_roots=None)
    rows = read_csv(tmp_path / "3" / "results.csv")
    assert [(r["response"], r["answered_from"]) for r in rows] == [("answer to new a", "batch"),
                                                                   ("answer to new b", "batch")]  # fmt: skip
    # a file holding other records than the manifest counts fails the merge
    manifest = json.loads(Path(b2["manifest"]).read_text())
    manifest["cached"] = 1
    Path(b2["manifest"]).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="the build manifest says 1"):
        merge_results(b2["manifest"], [res], tmp_path / "3" / "again.csv", allowed_roots=None)


def test_cli_merge_read_only_lands_the_rows_and_keeps_nothing(tmp_path, capsys):
    from batchpipe.cli import main

    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"]])
    assert main(["build", str(src), "--out-dir", str(tmp_path / "b"), "--json"]) == 0
    build = json.loads(capsys.readouterr().out)
    res = answer_all(build, tmp_path / "out.jsonl")
    argv = [
        "merge",
        "--build-dir",
        str(tmp_path / "b"),
        str(res),
        "--out",
        str(tmp_path / "r" / "results.csv"),
    ]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--cache-mode", "read_only"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["added"] == 0
    assert (tmp_path / "r" / "report.json").is_file() and list((tmp_path / "b").glob(".new-answers*")) == []


def test_prune_gives_the_space_back(tmp_path):
    big = (
        b'{"custom_id":"x","response":{"status_code":200,"body":{"pad":"' + b"x" * 4000 + b'"}},"error":null}'
    )
    with AnswerCache(tmp_path / "c") as cache:
        cache.put_many((f"{i:064x}", big, None, None) for i in range(2000))
        cache.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        full = cache.stats()["file_bytes"]
        assert cache.prune(0) == 2000
        assert cache.stats()["file_bytes"] < full / 4


def anthropic_results(build: dict, path: Path, fail: frozenset = frozenset()) -> Path:
    """Message Batches result lines for what ``build`` sent: ``succeeded``, or ``errored`` for ``fail``."""
    with open(path, "w", encoding="utf-8") as fh:
        for request in sent(build):
            cid, text = request["custom_id"], request["params"]["messages"][-1]["content"]
            if cid in fail:
                error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
                result = {"type": "errored", "error": error}
            else:
                message = {"type": "message", "role": "assistant", "content": [{"type": "text",
                           "text": f"claude on {text}"}], "stop_reason": "end_turn",
                           "usage": {"input_tokens": 9, "output_tokens": 4}}  # fmt: skip
                result = {"type": "succeeded", "message": message}
            fh.write(json.dumps({"custom_id": cid, "result": result}) + "\n")
    return path


def test_anthropic_answers_are_kept_and_answer_the_next_run(tmp_path):
    """Message Batches answers are kept like OpenAI's (errored ones never): the next run sends only
    what failed, and the same prompt sent to OpenAI is another request (another key)."""
    src = write_csv(tmp_path / "in.csv", ["prompt"], [["a"], ["b"], ["c"], ["a"]])
    opts = BuildOptions(provider="anthropic", model="claude-haiku-4-5", max_tokens=100)
    with AnswerCache(tmp_path / "cache") as cache:
        b1, r1, rows1 = run(tmp_path, "1", src, opts, cache,
                            results=lambda b, p: anthropic_results(b, p, frozenset({"row-1"})))  # fmt: skip
        assert r1["added"] == 2 and cache.stats()["entries"] == 2  # a, c; b errored; the copy of a
        assert [r["response"] for r in rows1] == ["claude on a", "", "claude on c", "claude on a"]
        first = Path(b1["shards"][0]["path"]).read_bytes().splitlines()[0]  # the request of "a"
        kept = cache.get_many([request_key(first)])
        assert all(is_answer_line(v.rstrip(b"\n")) for v in kept.values()) and len(kept) == 1
        b2, r2, rows2 = run(tmp_path, "2", src, opts, cache, results=anthropic_results)
        assert [r["custom_id"] for r in sent(b2)] == ["row-1"]  # only the one that failed
        assert [r["response"] for r in rows2] == ["claude on a", "claude on b", "claude on c", "claude on a"]
        assert [r["answered_from"] for r in rows2] == ["cache", "batch", "cache", "row 0"]
        b3, _, _ = run(tmp_path, "3", src, BuildOptions(), cache)  # OpenAI: other requests, nothing kept
        assert b3["cached"] == 0 and len(sent(b3)) == 3

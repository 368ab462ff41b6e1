"""Selecting transient failures for a follow-up batch; checking downloads are complete."""

from __future__ import annotations

import json

import pytest

from batchpipe.resubmit import (
    RETRYABLE_CODES,
    DownloadMismatch,
    check_download,
    count_result_lines,
    is_retryable,
    select_retryable,
    write_followup,
)


def out_line(cid, status, body=None):
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": {"status_code": status, "request_id": f"req_{cid}", "body": body or {}},
        "error": None,
    }


def err_line(cid, code, message="..."):
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message},
    }


def http_err(cid, status, code):
    return out_line(cid, status, {"error": {"message": "x", "type": "invalid_request_error", "code": code}})


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line if isinstance(line, str) else json.dumps(line))
            fh.write("\n")
    return path


# --------------------------------------------------------------------------- is_retryable


@pytest.mark.parametrize(
    "line, expected",
    [
        (out_line("a", 200, {"choices": []}), False),
        (
            err_line("a", "batch_expired", "This request could not be executed before the window expired."),
            True,
        ),
        (err_line("a", "batch_cancelled"), False),
        (err_line("a", "rate_limit_exceeded"), True),
        (err_line("a", "server_error"), True),
        (err_line("a", "invalid_request"), False),
        (err_line("a", "some_new_code"), False),
        (http_err("a", 429, "rate_limit_exceeded"), True),
        (http_err("a", 500, None), True),
        (http_err("a", 502, None), True),
        (http_err("a", 503, None), True),
        (http_err("a", 400, "invalid_request"), False),
        (http_err("a", 401, "invalid_api_key"), False),
        (http_err("a", 404, "model_not_found"), False),
        (http_err("a", 422, None), False),
        # the HTTP status wins over a stray error code
        ({**http_err("a", 400, None), "error": {"code": "server_error"}}, False),
        ({**out_line("a", 200), "error": {"code": "batch_expired"}}, False),
        ({"custom_id": "a", "response": None, "error": None}, False),
        ({"custom_id": "a", "response": None, "error": {"message": "no code"}}, False),
        ({"custom_id": "a", "response": {"status_code": "500"}, "error": None}, False),
        ("not a dict", False),
        (None, False),
    ],
)
def test_is_retryable(line, expected):
    assert is_retryable(line) is expected


def test_retryable_codes():
    assert {"batch_expired", "rate_limit_exceeded", "server_error"} <= RETRYABLE_CODES
    assert "batch_cancelled" not in RETRYABLE_CODES
    assert "invalid_request" not in RETRYABLE_CODES


# --------------------------------------------------------------------------- select_retryable


def test_select_retryable_from_output_and_error_files(tmp_path):
    output = write_jsonl(
        tmp_path / "output.jsonl",
        [
            out_line("ok-1", 200, {"choices": [{"message": {"content": "hi"}}]}),
            http_err("slow-1", 429, "rate_limit_exceeded"),
            http_err("bad-1", 400, "invalid_request"),
            http_err("boom-1", 500, None),
        ],
    )
    error = write_jsonl(
        tmp_path / "error.jsonl",
        [
            err_line("exp-2", "batch_expired"),
            "this line is {not json",
            "",
            err_line("cancel-1", "batch_cancelled"),
            err_line("exp-1", "batch_expired"),
            err_line("exp-2", "batch_expired"),  # duplicate: listed once
            {"response": None, "error": {"code": "batch_expired"}},  # no custom_id: ignored
            http_err("gone-1", 404, "model_not_found"),
        ],
    )
    assert select_retryable([output, str(error)]) == ["slow-1", "boom-1", "exp-2", "exp-1"]


def test_select_retryable_never_resubmits_a_success(tmp_path):
    output = write_jsonl(tmp_path / "o.jsonl", [out_line("a", 200), out_line("b", 200)])
    error = write_jsonl(
        tmp_path / "e.jsonl", [err_line("a", "batch_expired"), err_line("c", "batch_expired")]
    )
    assert select_retryable([error, output]) == ["c"]


def test_select_retryable_empty(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert select_retryable([empty]) == []
    assert select_retryable([]) == []


# --------------------------------------------------------------------------- write_followup


def shard_bytes():
    # hand-written lines with spacing and escapes json.dumps would not reproduce
    return (
        b'{"custom_id":"row-0","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",'
        b'"messages":[{"role":"user","content":"caf\xc3\xa9 \\u00e9"}]}}\n'
        b'{"custom_id": "row-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
        b'"gpt-4o", "messages": [{"role": "user", "content": "two"}]}}\n'
        b'{"custom_id":"row-2","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",'
        b'"messages":[{"role":"user","content":"three\\n"}]}}\n'
        b'{"custom_id":"row-3","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o",'
        b'"messages":[{"role":"user","content":"four"}]}}'  # no final newline
    )


def test_write_followup_copies_lines_byte_for_byte(tmp_path):
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_bytes(shard_bytes())
    lines = shard_bytes().split(b"\n")
    out = tmp_path / "retry" / "shard-00000.jsonl"
    info = write_followup(shard, ["row-3", "row-0", "row-1"], out)
    expected = lines[0] + b"\n" + lines[1] + b"\n" + lines[3] + b"\n"
    assert out.read_bytes() == expected
    assert info == {"path": str(out), "requests": 3, "bytes": len(expected), "unknown": 0, "unknown_ids": ""}
    assert [p.name for p in out.parent.iterdir()] == ["shard-00000.jsonl"]  # no temp file left


def test_write_followup_skips_and_counts_ids_the_shard_never_had(tmp_path):
    # a service that lists a custom_id it was never sent must not stop the known ones going out again
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_bytes(shard_bytes())
    out = tmp_path / "followup.jsonl"
    info = write_followup(shard, {"row-1", "row-9", "zzz"}, out)
    assert out.read_bytes() == shard_bytes().split(b"\n")[1] + b"\n"
    assert info["requests"] == 1 and info["unknown"] == 2 and info["unknown_ids"] == "'row-9', 'zzz'"
    # none known: nothing written, no temp file left
    info = write_followup(shard, {"nobody"}, tmp_path / "none.jsonl")
    assert info["requests"] == 0 and info["unknown"] == 1 and not (tmp_path / "none.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["followup.jsonl", "shard-00000.jsonl"]


def test_write_followup_no_ids(tmp_path):
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_bytes(shard_bytes())
    with pytest.raises(ValueError, match="no custom_ids"):
        write_followup(shard, [], tmp_path / "f.jsonl")


def test_write_followup_duplicate_in_shard_written_once(tmp_path):
    shard = tmp_path / "shard-00000.jsonl"
    a = b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}\n'
    a2 = b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"y"}}\n'
    shard.write_bytes(a + b"\n" + a2)
    info = write_followup(shard, ["a"], tmp_path / "f.jsonl")
    assert (tmp_path / "f.jsonl").read_bytes() == a and info["requests"] == 1


def test_end_to_end_expired_batch(tmp_path):
    shard = tmp_path / "shard-00000.jsonl"
    shard.write_bytes(shard_bytes())
    output = write_jsonl(
        tmp_path / "o.jsonl", [out_line("row-2", 200), http_err("row-0", 400, "invalid_request")]
    )
    error = write_jsonl(
        tmp_path / "e.jsonl", [err_line("row-3", "batch_expired"), err_line("row-1", "batch_expired")]
    )
    ids = select_retryable([output, error])
    info = write_followup(shard, ids, tmp_path / "f.jsonl")
    assert info["requests"] == 2
    got = [json.loads(x)["custom_id"] for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert got == ["row-1", "row-3"]  # shard order


# --------------------------------------------------------------------------- downloads


def test_count_result_lines(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"a":1}\n\n{"b":2}\n  \n{"c":3}')
    assert count_result_lines(p) == 3
    assert count_result_lines(None) == 0
    (tmp_path / "empty").write_bytes(b"")
    assert count_result_lines(tmp_path / "empty") == 0


def test_check_download_ok():
    check_download({"total": 10, "completed": 8, "failed": 2}, 8, 2, "completed")
    check_download({"total": 10, "completed": 4, "failed": 6}, 4, 6, "expired")
    check_download({"total": 10, "completed": 3, "failed": 0}, 3, 7, "cancelled")
    # a non-200 response counted as completed but sitting in the output file: still 10 lines
    check_download({"total": 10, "completed": 10, "failed": 0}, 10, 0, "completed")


def test_check_download_short():
    with pytest.raises(DownloadMismatch) as exc:
        check_download({"total": 100, "completed": 95, "failed": 5}, 90, 5, "completed")
    msg = str(exc.value)
    assert "95" in msg and "100" in msg and "short" in msg
    assert (exc.value.expected, exc.value.got, exc.value.status) == (100, 95, "completed")
    assert isinstance(exc.value, ValueError)


def test_check_download_missing_error_file():
    with pytest.raises(DownloadMismatch, match="4 output \\+ 0 error = 4 lines.*total is 10"):
        check_download({"total": 10, "completed": 4, "failed": 6}, 4, 0, "expired")


def test_check_download_too_long():
    with pytest.raises(DownloadMismatch, match="too long"):
        check_download({"total": 2, "completed": 2, "failed": 0}, 3, 0, "completed")


@pytest.mark.parametrize(
    "counts, status",
    [
        ({"total": 10, "completed": 0, "failed": 0}, "in_progress"),
        ({"total": 10, "completed": 0, "failed": 0}, "failed"),
        ({"total": 0, "completed": 0, "failed": 0}, "completed"),
        ({}, "completed"),
        (None, "completed"),
    ],
)
def test_check_download_not_checked(counts, status):
    check_download(counts, 0, 0, status)


def test_download_problem_names_unreadable_lines_and_count_mismatches(tmp_path):
    from batchpipe.resubmit import download_problem

    good = json.dumps(out_line("row-0", 200))
    out = tmp_path / "o.jsonl"
    err = tmp_path / "e.jsonl"
    counts = {"total": 3, "completed": 2, "failed": 1}
    out.write_text(f"{good}\n{json.dumps(out_line('row-1', 200))}\n", encoding="utf-8")
    err.write_text(json.dumps(http_err("row-2", 400, "invalid_request")) + "\n", encoding="utf-8")
    assert download_problem(counts, out, err, "completed") is None
    # a cut-off last line: the count still matches, the line does not parse
    out.write_text(f"{good}\n{good[:40]}\n", encoding="utf-8")
    assert download_problem(counts, out, err, "completed").startswith(
        "1 unreadable line(s) in the output file (cut off or not JSON); batch completed: downloaded results "
        "are short: 2 output + 1 error lines name 2 requests"
    )
    # lines missing
    out.write_text(f"{good}\n", encoding="utf-8")
    assert "results are short: 1 output + 1 error lines name 2 requests, but request_counts.total is 3" in (
        download_problem(counts, out, err, "completed")
    )
    # a duplicated line or an id never sent: not a broken download (the merge counts them)
    dup = json.dumps(http_err("row-0", 400, "invalid_request"))
    out.write_text(f"{good}\n{json.dumps(out_line('row-1', 200))}\n", encoding="utf-8")
    err.write_text(f"{json.dumps(http_err('row-2', 400, 'x'))}\n{dup}\n", encoding="utf-8")
    assert download_problem(counts, out, err, "completed") is None
    # a JSON line without a custom_id is unreadable too
    out.write_text(f"{good}\n[1, 2]\n", encoding="utf-8")
    assert download_problem(counts, out, None, "completed").startswith("1 unreadable line(s) in the output")

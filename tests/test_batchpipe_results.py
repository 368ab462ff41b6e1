"""Parsing Batch API output/error lines."""

import json

from batchpipe import iter_outcomes, parse_result_line

CHAT = "/v1/chat/completions"


def ok_line(cid, body):
    return {
        "id": "batch_req_1",
        "custom_id": cid,
        "response": {"status_code": 200, "request_id": "r", "body": body},
        "error": None,
    }


def test_chat_200():
    body = {
        "choices": [{"message": {"role": "assistant", "content": "Paris"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
    o = parse_result_line(ok_line("row-0", body), CHAT)
    assert (o.custom_id, o.response, o.error) == ("row-0", "Paris", None)
    assert (o.prompt_tokens, o.completion_tokens, o.total_tokens) == (12, 1, 13)


def test_responses_200():
    body = {
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [{"type": "output_text", "text": "Hel"}, {"type": "output_text", "text": "lo"}],
            },
        ],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
    }
    o = parse_result_line(ok_line("a", body), "/v1/responses")
    assert o.response == "Hello" and (o.prompt_tokens, o.completion_tokens, o.total_tokens) == (5, 2, 7)


def test_embeddings_200():
    body = {"data": [{"embedding": [0.1, -0.2]}], "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    o = parse_result_line(ok_line("a", body), "/v1/embeddings")
    assert json.loads(o.response) == [0.1, -0.2] and o.prompt_tokens == 3 and o.completion_tokens is None


def test_http_400():
    line = {
        "custom_id": "x",
        "response": {
            "status_code": 400,
            "body": {
                "error": {
                    "message": "Invalid image",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                }
            },
        },
        "error": None,
    }
    o = parse_result_line(line, CHAT)
    assert o.response is None and o.error == "HTTP 400 invalid_request: Invalid image"
    assert o.error_code == "invalid_request"


def test_batch_expired():
    line = {
        "custom_id": "x",
        "response": None,
        "error": {"code": "batch_expired", "message": "This request could not be executed before the window"},
    }
    o = parse_result_line(line, CHAT)
    assert o.error == "batch_expired: This request could not be executed before the window"
    assert o.error_code == "batch_expired" and o.response is None


def test_malformed_never_crashes():
    for line in [
        ok_line("m", {"choices": []}),
        ok_line("m", None),
        ok_line("m", {"choices": [{"message": 3}]}),
        {"custom_id": "m"},
        {"custom_id": "m", "response": {"status_code": 200, "body": "not json"}},
        ok_line("m", {"choices": [{"message": {"content": None}}], "usage": "weird"}),
    ]:
        o = parse_result_line(line, CHAT)
        assert o.custom_id == "m" and o.response is None and o.error
    assert parse_result_line([1, 2], CHAT).error
    o = parse_result_line(ok_line("m", {"output": "x"}), "/v1/responses")
    assert o.error.startswith("malformed result")


def test_refusal():
    o = parse_result_line(
        ok_line("r", {"choices": [{"message": {"content": None, "refusal": "I can't"}}]}), CHAT
    )
    assert o.error == "refusal: I can't" and o.error_code == "refusal"


def test_iter_outcomes_files(tmp_path):
    a = tmp_path / "out.jsonl"
    a.write_text(
        json.dumps(ok_line("row-1", {"choices": [{"message": {"content": "x"}}]})) + "\n\nnot json\n",
        encoding="utf-8",
    )
    outs = list(iter_outcomes([a], CHAT))
    assert [o.custom_id for o in outs] == ["row-1", None]
    assert "line 3: not valid JSON" in outs[1].error


# -- Anthropic Message Batches result lines (told apart by their shape) ----------------------------------
def anthropic(cid: str, result: dict) -> dict:
    return {"custom_id": cid, "result": result}


def claude_message(content: list, stop: str = "end_turn", usage: dict | None = None) -> dict:
    return {"type": "succeeded", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
        "stop_reason": stop, "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 2,
                           "cache_read_input_tokens": 3},
    }}  # fmt: skip


def test_anthropic_results_become_outcomes():
    from batchpipe.results import TRUNCATED, parse_result_line

    two = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    ok = parse_result_line(anthropic("row-0", claude_message(two)), "/v1/messages")
    assert (ok.custom_id, ok.response, ok.error, ok.error_code) == ("row-0", "Hello", None, None)
    assert (ok.prompt_tokens, ok.completion_tokens, ok.total_tokens) == (
        15,
        5,
        20,
    )  # input + cache writes/reads
    cut = parse_result_line(
        anthropic("row-1", claude_message([{"type": "text", "text": "Hal"}], "max_tokens")), ""
    )
    assert cut.response == "Hal" and cut.error is None and cut.error_code == TRUNCATED
    use = [{"type": "tool_use", "id": "t", "name": "answer", "input": {"n": 1, "s": "é"}}]
    tool = parse_result_line(anthropic("row-2", claude_message(use, "tool_use")), "")
    assert tool.response == '{"n": 1, "s": "é"}' and tool.error is None
    refused = parse_result_line(
        anthropic("row-3", claude_message([{"type": "text", "text": "No."}], "refusal")), ""
    )
    assert (refused.error, refused.error_code, refused.response) == ("refusal: No.", "refusal", None)
    empty = parse_result_line(anthropic("row-4", claude_message([])), "")
    assert empty.error_code == "malformed_result" and empty.prompt_tokens == 15
    inner = {"type": "invalid_request_error", "message": "max_tokens: field required"}
    errored = parse_result_line(
        anthropic("row-5", {"type": "errored", "error": {"type": "error", "error": inner}}), ""
    )
    assert errored.error == "invalid_request_error: max_tokens: field required"
    assert errored.error_code == "invalid_request_error"
    expired = parse_result_line(anthropic("row-6", {"type": "expired"}), "")
    assert expired.error_code == "batch_expired" and expired.error.startswith("batch_expired: ")
    assert parse_result_line(anthropic("row-7", {"type": "canceled"}), "").error_code == "batch_cancelled"
    for content in (7, "text", {"type": "text"}, None):  # a lying service: no crash, a precise error
        lied = claude_message([])
        lied["message"]["content"] = content
        assert parse_result_line(anthropic("row-9", lied), "").error_code == "malformed_result"
    odd = parse_result_line(anthropic("row-8", {"type": "mystery"}), "")
    assert odd.error_code == "malformed_result" and "mystery" in odd.error


def test_anthropic_retryable_errors_are_resubmitted_invalid_ones_not():
    from batchpipe.resubmit import RETRYABLE_CODES

    assert {"batch_expired", "overloaded_error", "api_error", "rate_limit_error"} <= RETRYABLE_CODES
    assert "invalid_request_error" not in RETRYABLE_CODES and "batch_cancelled" not in RETRYABLE_CODES


def test_merge_joins_anthropic_results_onto_rows(tmp_path):
    from batchpipe import BuildOptions, build_jsonl, merge_results

    src = tmp_path / "in.csv"
    src.write_text("id,prompt\nk0,a\nk1,b\nk2,c\n", encoding="utf-8")
    b = build_jsonl(src, BuildOptions(), tmp_path / "b", allowed_roots=None)
    lines = [anthropic("row-0", claude_message([{"type": "text", "text": "A"}])),
             anthropic("row-1", {"type": "expired"}),
             anthropic("row-2", claude_message([{"type": "text", "text": "C"}], "max_tokens"))]  # fmt: skip
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    report = merge_results(b["manifest"], [res], tmp_path / "out" / "results.csv", allowed_roots=None)
    assert (report["answered"], report["failed"]) == (2, 1)
    assert report["errors_by_code"] == {"batch_expired": 1}
    assert report["tokens"] == {"prompt": 30, "completion": 10, "total": 40}

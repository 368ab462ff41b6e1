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

"""Offline prompt-token estimates: text, images, request bodies, shards."""

from __future__ import annotations

import base64
import io
import json
import warnings
from functools import cache

import pytest
from PIL import Image

from batchpipe.tokens import (
    UnknownModel,
    count_text_tokens,
    encoding_for,
    image_size_from_data_url,
    image_tokens,
    request_prompt_tokens,
    shard_prompt_tokens,
)

CHAT = "/v1/chat/completions"


@cache
def _encoding(name):
    with warnings.catch_warnings():  # bpe-openai 0.1.4 uses a deprecated importlib.resources call
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return bpe_openai.get_encoding(name)


def n_tokens(text, encoding):
    """The tokenizer's own count (public, tiktoken-compatible API of bpe-openai)."""
    return len(_encoding(encoding).encode_ordinary(text))


def png_data_url(width, height, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "model, encoding",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1-pro", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::x", "cl100k_base"),
        ("some-future-model", "o200k_base"),
    ],
)
def test_encoding_for(model, encoding):
    assert encoding_for(model) == encoding


# --------------------------------------------------------------------------- text

TEXTS = [
    "Hello, world! What is the capital of France?",
    "  leading spaces,\ttabs\nand\n\nnew lines  ",
    "Grüße aus Köln — «ça va?» 日本語のテキスト، مرحبا بالعالم",
    "emoji 🎉👩‍👩‍👧‍👦 🇫🇷 👍🏽",
    "special-token text <|endoftext|> is ordinary text",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model, encoding", [("gpt-4o", "o200k_base"), ("gpt-3.5-turbo", "cl100k_base")])
def test_text_counts_match_the_tokenizer(text, model, encoding):
    assert count_text_tokens(text, model) == n_tokens(text, encoding)


def test_text_known_values():
    assert count_text_tokens("hello world", "gpt-4o") == 2
    assert count_text_tokens("", "gpt-4o") == 0
    assert count_text_tokens("a\ud800b", "gpt-4o") > 0  # lone surrogate: no crash


def test_long_text():
    text = "The quick brown fox jumps over the lazy dog. " * 40_000  # 1.8 M characters
    assert count_text_tokens(text, "gpt-4o") == 10 * 40_000 + 1  # 10 per sentence + the final space


# --------------------------------------------------------------------------- images: tile models


def test_documented_tile_examples():
    # 1024x1024 -> shortest side 768 -> 768x768 -> 2x2 tiles -> 85 + 4*170
    assert image_tokens(1024, 1024, "gpt-4o", "high") == 765
    # 2048x4096 -> fits 2048 as 1024x2048 -> 768x1536 -> 2x3 tiles -> 85 + 6*170
    assert image_tokens(2048, 4096, "gpt-4o", "high") == 1105
    assert image_tokens(2048, 4096, "gpt-4o", "low") == 85
    assert image_tokens(4096, 8192, "gpt-4o", "low") == 85


def test_tile_models_and_details():
    assert image_tokens(1024, 1024, "gpt-4o", "auto") == 765  # auto estimated as high
    assert image_tokens(1024, 1024, "gpt-4o", None) == 765
    assert image_tokens(512, 512, "gpt-4o", "high") == 85 + 170  # small images are not enlarged
    assert image_tokens(513, 500, "gpt-4o", "high") == 85 + 2 * 170
    assert image_tokens(1024, 1024, "gpt-4o-2024-08-06", "high") == 765
    assert image_tokens(1024, 1024, "gpt-4.1", "high") == 765
    assert image_tokens(1024, 1024, "gpt-4.5-preview", "high") == 765
    assert image_tokens(1024, 1024, "gpt-4o-mini", "high") == 2833 + 4 * 5667
    assert image_tokens(1024, 1024, "gpt-4o-mini", "low") == 2833
    assert image_tokens(1024, 1024, "gpt-5", "high") == 70 + 4 * 140
    assert image_tokens(1024, 1024, "gpt-5-chat-latest", "low") == 70
    assert image_tokens(2048, 4096, "o3", "high") == 75 + 6 * 150
    assert image_tokens(100, 100, "o1-pro", "high") == 75 + 150
    assert image_tokens(1024, 1024, "ft:gpt-4o-2024-08-06:acme::x", "high") == 765


# --------------------------------------------------------------------------- images: patch models


def test_patch_models():
    # 1024x1024: ceil(1024/32)^2 = 32*32 = 1024 patches (<= 1536, no resize);
    #   gpt-4.1-mini: 1024 * 1.62 = 1658.88 -> rounded up to 1659
    assert image_tokens(1024, 1024, "gpt-4.1-mini", "high") == 1659
    # gpt-5-nano: 1024 * 2.46 = 2519.04 -> 2520
    assert image_tokens(1024, 1024, "gpt-5-nano", "high") == 2520
    # 1800x2400 (OpenAI's example): 57*75 = 4275 patches > 1536 -> shrink r = sqrt(32*32*1536/(1800*2400))
    #   = 0.6034; 1800r/32 = 33.94, 2400r/32 = 45.25; r *= min(33/33.94, 45/45.25) = 0.9723
    #   -> 1056 x 1408 px -> 33 * 44 = 1452 patches; gpt-4.1-mini: 1452 * 1.62 = 2352.24 -> 2353
    assert image_tokens(1800, 2400, "gpt-4.1-mini", "high") == 2353
    assert image_tokens(2400, 1800, "gpt-4.1-mini", "high") == 2353
    # o4-mini, 100x50: ceil(100/32)=4 * ceil(50/32)=2 = 8 patches * 1.72 = 13.76 -> 14
    assert image_tokens(100, 50, "o4-mini", "high") == 14
    # 320x320 = 10*10 = 100 patches * 1.62 = 162 exactly (no float noise pushing it to 163)
    assert image_tokens(320, 320, "gpt-5-mini", "auto") == 162
    # detail is not used by patch models
    assert image_tokens(320, 320, "gpt-5-mini", "low") == 162
    # 2048x768 = 64*24 = 1536 patches: at the cap, no resize; * 2.46 = 3778.56 -> 3779
    assert image_tokens(2048, 768, "gpt-4.1-nano", "high") == 3779


@pytest.mark.parametrize("size", [(4000, 4000), (1801, 2399), (10, 100_000), (8000, 33), (3000, 1000)])
def test_patch_cap(size):
    # never more than 1536 patches
    assert image_tokens(*size, "gpt-4.1-mini") <= -(-1536 * 162 // 100)


def test_image_errors():
    with pytest.raises(UnknownModel, match="gpt-3.5-turbo"):
        image_tokens(100, 100, "gpt-3.5-turbo", "high")
    with pytest.raises(UnknownModel):
        image_tokens(100, 100, "o3-mini", "high")
    assert isinstance(UnknownModel("x"), ValueError)
    with pytest.raises(ValueError, match="detail"):
        image_tokens(100, 100, "gpt-4o", "medium")
    with pytest.raises(ValueError, match="positive"):
        image_tokens(0, 100, "gpt-4o", "high")


# --------------------------------------------------------------------------- data URLs


def test_image_size_from_data_url():
    assert image_size_from_data_url(png_data_url(37, 21)) == (37, 21)
    assert image_size_from_data_url(png_data_url(300, 200, "JPEG")) == (300, 200)
    assert image_size_from_data_url("data:image/png;base64,AAAA") is None
    assert image_size_from_data_url("data:image/png;base64,%%%") is None
    assert image_size_from_data_url("https://example.com/a.png") is None


def test_jpeg_size_after_large_exif():
    # the SOF marker comes after ~60 kB of EXIF: read in growing prefixes until it is found
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription
    Image.new("RGB", (640, 480)).save(buf, "JPEG", exif=exif.tobytes())
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    assert image_size_from_data_url(url) == (640, 480)


# --------------------------------------------------------------------------- request bodies


def test_chat_text_body():
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    }
    t = lambda s: n_tokens(s, "o200k_base")  # noqa: E731
    expected = (
        (3 + t("system") + t("You are terse.")) + (3 + t("user") + t("What is the capital of France?")) + 3
    )
    assert request_prompt_tokens(body, CHAT, "gpt-4o") == expected
    assert request_prompt_tokens(body, "chat/completions", "gpt-4o") == expected


def test_chat_body_with_image_data_url():
    url = png_data_url(1024, 1024)
    body = {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this picture."},
                    {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                ],
            }
        ],
    }
    t = lambda s: n_tokens(s, "o200k_base")  # noqa: E731
    text_and_framing = 3 + t("user") + t("Describe this picture.") + 3
    assert request_prompt_tokens(body, CHAT, "gpt-4o") == text_and_framing + 765
    body["messages"][0]["content"][1]["image_url"]["detail"] = "low"
    assert request_prompt_tokens(body, CHAT, "gpt-4o") == text_and_framing + 85
    # patch model: 32*32 patches * 1.62 -> 1659
    assert request_prompt_tokens(body, CHAT, "gpt-4.1-mini") == text_and_framing + 1659


def test_chat_body_with_http_image():
    url = "https://example.com/cat.png"
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ]
    }
    t = lambda s: n_tokens(s, "o200k_base")  # noqa: E731
    base = 3 + t("user") + t("hi") + 3
    assert request_prompt_tokens(body, CHAT, "gpt-4o") == base + 85  # unknown size: low-detail base cost
    assert request_prompt_tokens(body, CHAT, "gpt-4o", {url: (2048, 4096)}) == base + 1105
    assert request_prompt_tokens(body, CHAT, "o4-mini") == base + 441  # as 512x512: 256 * 1.72 = 440.32
    with pytest.raises(UnknownModel):
        request_prompt_tokens(body, CHAT, "gpt-3.5-turbo")


def test_chat_name_tool_calls_and_tools():
    t = lambda s: n_tokens(s, "o200k_base")  # noqa: E731
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {
        "messages": [
            {"role": "user", "name": "ann", "content": "x"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
            },
        ],
        "tools": tools,
    }
    expected = (3 + t("user") + 1 + t("ann") + t("x")) + (3 + t("assistant") + t("f") + t("{}")) + 3
    expected += t(json.dumps(tools, separators=(",", ":")))
    assert request_prompt_tokens(body, CHAT, "gpt-4o") == expected


def test_responses_bodies():
    t = lambda s: n_tokens(s, "o200k_base")  # noqa: E731
    body = {"model": "gpt-5", "input": "Say hi.", "instructions": "Be brief."}
    expected = (3 + t("system") + t("Be brief.")) + (3 + t("user") + t("Say hi.")) + 3
    assert request_prompt_tokens(body, "/v1/responses", "gpt-5") == expected

    url = png_data_url(2048, 4096)
    body = {
        "model": "gpt-5",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is it?"},
                    {"type": "input_image", "image_url": url, "detail": "high"},
                ],
            }
        ],
    }
    assert request_prompt_tokens(body, "/v1/responses", "gpt-5") == 3 + t("user") + t("What is it?") + 3 + (
        70 + 6 * 140
    )


def test_embeddings_and_completions():
    t = lambda s: n_tokens(s, "cl100k_base")  # noqa: E731
    m = "text-embedding-3-small"
    assert request_prompt_tokens({"input": "héllo wörld"}, "/v1/embeddings", m) == t("héllo wörld")
    assert request_prompt_tokens({"input": ["a b", "c"]}, "/v1/embeddings", m) == t("a b") + t("c")
    assert request_prompt_tokens({"input": [1, 2, 3]}, "/v1/embeddings", m) == 3
    assert request_prompt_tokens({"input": [[1, 2], [3]]}, "/v1/embeddings", m) == 3
    assert request_prompt_tokens({"prompt": "once upon"}, "/v1/completions", "gpt-3.5-turbo-instruct") == t(
        "once upon"
    )
    with pytest.raises(ValueError, match="endpoint"):
        request_prompt_tokens({}, "/v1/moderations", m)


# --------------------------------------------------------------------------- shards


def test_shard_prompt_tokens(tmp_path):
    bodies = [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "one"}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "zwei drei"}]},
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "img"},
                        {
                            "type": "image_url",
                            "image_url": {"url": png_data_url(1024, 1024), "detail": "auto"},
                        },
                    ],
                }
            ],
        },
    ]
    shard = tmp_path / "shard-00000.jsonl"
    with open(shard, "w", encoding="utf-8") as fh:
        for i, body in enumerate(bodies):
            line = {"custom_id": f"row-{i}", "method": "POST", "url": CHAT, "body": body}
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        fh.write("\n")
    expected = sum(request_prompt_tokens(b, CHAT, "gpt-4o") for b in bodies)
    assert shard_prompt_tokens(shard, CHAT, "gpt-4o") == expected
    assert expected > 765

    with open(shard, "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValueError, match="line 5"):
        shard_prompt_tokens(shard, CHAT, "gpt-4o")

"""Offline estimates of the prompt tokens of Batch API requests.

Used before submitting a batch (enqueued-token limits, cost estimates). Everything runs offline:
text is counted with the BPE tables shipped in the ``bpe-openai`` package (``tiktoken`` would download
them at run time), images with the formulas of OpenAI's vision guide.

These are *estimates*: chat framing is approximated (3 tokens per message plus 3 for the reply, as in
OpenAI's cookbook), and where a figure is unknown (an image behind an http URL, files, audio) the
docstrings say what is assumed. Where the documented formulas and observed billing disagree, the
documented (higher) figure is used, so the estimate errs on the high side.

No Airflow import.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from fractions import Fraction
from functools import cache
from typing import Any

__all__ = [
    "PATCH_MODELS",
    "TILE_MODELS",
    "UnknownModel",
    "count_text_tokens",
    "encoding_for",
    "image_size_from_data_url",
    "image_tokens",
    "iter_request_images",
    "request_prompt_tokens",
    "request_text_tokens",
    "request_token_breakdown",
    "shard_prompt_tokens",
]


class UnknownModel(ValueError):
    """No image-token rule is known for this model (callers decide: skip the estimate, warn, ...)."""

    def __init__(self, model: str):
        super().__init__(f"no image token rule known for model {model!r}")
        self.model = model


# --------------------------------------------------------------------------- model names


def _base_model(model: str) -> str:
    """Lower-cased model name without a fine-tune wrapper (``ft:gpt-4o-mini-2024-07-18:org::id``)."""
    m = model.strip().lower()
    if m.startswith("ft:"):
        m = m[3:].split(":", 1)[0]
    return m


_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-", "davinci-002", "babbage-002")


def encoding_for(model: str) -> str:
    """Name of the BPE encoding of ``model``: ``"o200k_base"`` or ``"cl100k_base"``.

    o200k_base: gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4*, chatgpt-4o*.
    cl100k_base: other gpt-4*, gpt-3.5*, text-embedding-*, davinci-002, babbage-002.
    Anything else (newer models): o200k_base. Fine-tuned names (``ft:<base>:...``) use their base.
    """
    m = _base_model(model)
    if m.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


# --------------------------------------------------------------------------- text


def _sanitize(text: str) -> str:
    """Lone surrogates (invalid UTF-8) become U+FFFD, as the encoder would do."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@cache
def _counter(encoding: str) -> Callable[[str], int]:
    """A token-counting function for ``encoding``, built once per process.

    ``bpe_openai`` is imported here, not at module level: its import reads its tables (~1 s).
    """
    with warnings.catch_warnings():  # bpe-openai 0.1.4 uses importlib.resources.open_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        try:  # the Rust tokenizer itself: counts without building a list, no length limits
            from bpe_openai._bindings import tokenizer_for_encoding

            return tokenizer_for_encoding(encoding).count
        except (ImportError, AttributeError):  # pragma: no cover - other bpe-openai versions
            import bpe_openai

            enc = bpe_openai.get_encoding(encoding)
            return lambda text: len(enc.encode_ordinary(text))


def count_text_tokens(text: str, model: str) -> int:
    """Tokens of ``text`` in the encoding of ``model``.

    Special-token strings such as ``<|endoftext|>`` are counted as ordinary text, as the API does for
    user content.
    """
    if not text:
        return 0
    return _counter(encoding_for(model))(_sanitize(text))


# --------------------------------------------------------------------------- images

#: Tile models: (base tokens, tokens per 512-px tile).
TILE_MODELS: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "gpt-4o-mini": (2833, 5667),
    "gpt-5": (70, 140),
    "gpt-5-chat-latest": (70, 140),
    "o1": (75, 150),
    "o1-pro": (75, 150),
    "o3": (75, 150),
}

#: Patch models: multiplier applied to the number of 32-px patches.
PATCH_MODELS: dict[str, Fraction] = {
    "gpt-4.1-mini": Fraction("1.62"),
    "gpt-5-mini": Fraction("1.62"),
    "gpt-4.1-nano": Fraction("2.46"),
    "gpt-5-nano": Fraction("2.46"),
    "o4-mini": Fraction("1.72"),
}

PATCH_SIZE = 32
MAX_PATCHES = 1536
TILE_SIZE = 512
#: Assumed size of an image whose size is unknown, for patch models (they have no size-free base cost):
#: the 512x512 version the vision guide says ``detail: "low"`` sends.
UNKNOWN_SIZE = (512, 512)

_SNAPSHOT = re.compile(r"(-preview)?(-\d{4}-\d{2}-\d{2})?$")


def _image_rule(model: str) -> tuple[int, int] | Fraction:
    m = _SNAPSHOT.sub("", _base_model(model))
    if m in TILE_MODELS:
        return TILE_MODELS[m]
    if m in PATCH_MODELS:
        return PATCH_MODELS[m]
    raise UnknownModel(model)


def _check_detail(detail: str | None) -> str:
    d = "auto" if detail is None else detail
    if d not in ("low", "high", "auto"):
        raise ValueError(f"image detail must be 'low', 'high' or 'auto', not {detail!r}")
    return d


def _tiles(width: int, height: int) -> int:
    w, h = width, height
    if max(w, h) > 2048:  # fit inside 2048x2048
        m = max(w, h)
        w, h = w * 2048 // m, h * 2048 // m
    if min(w, h) > 768:  # shortest side to 768 (scaling down only: small images are not enlarged)
        m = min(w, h)
        w, h = w * 768 // m, h * 768 // m
    return -(-w // TILE_SIZE) * -(-h // TILE_SIZE)


def _patches(width: int, height: int) -> int:
    patches = -(-width // PATCH_SIZE) * -(-height // PATCH_SIZE)
    if patches <= MAX_PATCHES:
        return patches
    # OpenAI's documented resize: shrink by sqrt(32*32*1536 / (w*h)), then shrink a bit more so that the
    # binding side is a whole number of patches.
    r = math.sqrt(PATCH_SIZE * PATCH_SIZE * MAX_PATCHES / (width * height))
    pw, ph = width * r / PATCH_SIZE, height * r / PATCH_SIZE
    r *= min(max(1, math.floor(pw)) / pw, max(1, math.floor(ph)) / ph)
    eps = 1e-9  # the binding side is an exact multiple of 32 in theory: do not let float noise add a patch
    pw = math.ceil(width * r / PATCH_SIZE - eps)
    ph = math.ceil(height * r / PATCH_SIZE - eps)
    return min(max(1, pw) * max(1, ph), MAX_PATCHES)


def image_tokens(width: int, height: int, model: str, detail: str | None = "auto") -> int:
    """Prompt tokens of one image of ``width`` x ``height`` pixels sent to ``model``.

    Tile models (``TILE_MODELS``): ``detail="low"`` costs the base alone. ``"high"`` and ``"auto"``
    (estimated as high, the worst case): the image is scaled down to fit in 2048x2048, then scaled down
    so its shortest side is 768 px (smaller images are not enlarged; sizes are truncated to whole
    pixels), and tokens = base + per_tile x (number of 512-px tiles covering it).
    E.g. gpt-4o: 1024x1024 high = 85 + 170 x 4 = 765; 2048x4096 high = 85 + 170 x 6 = 1105.

    Patch models (``PATCH_MODELS``): patches = ceil(w/32) x ceil(h/32); above 1536 the image is shrunk
    as OpenAI documents (factor sqrt(32*32*1536/(w*h)), adjusted so the binding side is a whole number of
    patches), capped at 1536; tokens = patches x multiplier, **rounded up** (the estimate guards
    limits and budgets, so it must not fall short; OpenAI does not document the rounding). ``detail`` is
    not used for patch models (the guide gives no patch rule for it; counting the full size is the upper
    bound).

    Raises ``UnknownModel`` for a model without a known rule, ``ValueError`` for a non-positive size or
    an unknown ``detail``.
    """
    detail = _check_detail(detail)
    if (
        isinstance(width, bool)
        or isinstance(height, bool)
        or not isinstance(width, int)
        or not isinstance(height, int)
        or width <= 0
        or height <= 0
    ):
        raise ValueError(f"image size must be two positive integers, not {width!r} x {height!r}")
    rule = _image_rule(model)
    if isinstance(rule, Fraction):
        return math.ceil(_patches(width, height) * rule)
    base, per_tile = rule
    if detail == "low":
        return base
    return base + per_tile * _tiles(width, height)


def _unknown_size_tokens(model: str, detail: str) -> int:
    rule = _image_rule(model)
    if isinstance(rule, Fraction):
        return image_tokens(*UNKNOWN_SIZE, model, detail)
    return rule[0]


def _pil_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image  # Pillow is only needed when a data URL must be measured

    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP", "GIF"]) as im:
            w, h = im.size
    except Exception:  # truncated header, not an image, decompression-bomb guard, ...
        return None
    return (w, h) if w > 0 and h > 0 else None


_WS = re.compile(r"\s+")


def image_size_from_data_url(url: str) -> tuple[int, int] | None:
    """(width, height) of the image in a ``data:`` URL, or ``None`` when it cannot be read.

    Base64 payloads are decoded a growing prefix at a time (4 KiB of base64, then x8) until Pillow can
    read the header: PNG/GIF/WebP need the first bytes only; JPEG needs everything up to its SOF
    marker (after EXIF data). The image itself is never decoded.
    """
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:"):
        return None
    if not header.lower().endswith(";base64"):
        return _pil_size(urllib.parse.unquote_to_bytes(payload))
    n = 4096
    while True:
        chunk = _WS.sub("", payload[:n])
        whole = n >= len(payload)
        if not whole:
            chunk = chunk[: len(chunk) - len(chunk) % 4]
        try:
            raw = base64.b64decode(chunk)
        except (binascii.Error, ValueError):
            return None
        size = _pil_size(raw)
        if size is not None or whole:
            return size
        n *= 8


def _image_part_tokens(
    url: Any, detail: Any, model: str, image_sizes: Mapping[str, tuple[int, int]] | None
) -> int:
    d = _check_detail(detail if isinstance(detail, str) else None)
    rule = _image_rule(model)  # raises UnknownModel before any decoding
    if not isinstance(rule, Fraction) and d == "low":
        return rule[0]
    size = None
    if isinstance(url, str):
        if image_sizes and url in image_sizes:
            size = image_sizes[url]
        elif url.startswith("data:"):
            size = image_size_from_data_url(url)
    if size is None:
        return _unknown_size_tokens(model, d)
    return image_tokens(int(size[0]), int(size[1]), model, d)


# --------------------------------------------------------------------------- request bodies

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_TOKENS = 3


def _json_tokens(obj: Any, model: str) -> int:
    return count_text_tokens(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), model)


def _chat_content_tokens(content: Any, model: str, image_sizes) -> int:
    if isinstance(content, str):
        return count_text_tokens(content, model)
    if not isinstance(content, list):
        return 0
    n = 0
    for part in content:
        if isinstance(part, str):
            n += count_text_tokens(part, model)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            n += count_text_tokens(part["text"], model)
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            n += count_text_tokens(part["refusal"], model)
        elif kind == "image_url":
            img = part.get("image_url")
            if isinstance(img, str):
                n += _image_part_tokens(img, None, model, image_sizes)
            elif isinstance(img, dict):
                n += _image_part_tokens(img.get("url"), img.get("detail"), model, image_sizes)
        elif kind == "input_image":
            n += _image_part_tokens(part.get("image_url"), part.get("detail"), model, image_sizes)
        # input_audio, file, input_file: not estimated (0)
    return n


def _message_tokens(msg: Mapping[str, Any], model: str, image_sizes) -> int:
    n = TOKENS_PER_MESSAGE
    role = msg.get("role")
    if isinstance(role, str):
        n += count_text_tokens(role, model)
    name = msg.get("name")
    if isinstance(name, str):
        n += TOKENS_PER_NAME + count_text_tokens(name, model)
    n += _chat_content_tokens(msg.get("content"), model, image_sizes)
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    n += count_text_tokens(fn[key], model)
    return n


def _schema_tokens(body: Mapping[str, Any], model: str) -> int:
    """Rough cost of tool definitions and structured-output schemas: their compact JSON."""
    n = 0
    for key in ("tools", "functions"):
        if body.get(key):
            n += _json_tokens(body[key], model)
    fmt = body.get("response_format")  # chat
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        n += _json_tokens(fmt.get("json_schema"), model)
    text = body.get("text")  # responses
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        if text["format"].get("type") == "json_schema":
            n += _json_tokens(text["format"].get("schema"), model)
    return n


def _responses_item_tokens(item: Any, model: str, image_sizes) -> int:
    if isinstance(item, str):
        return count_text_tokens(item, model)
    if not isinstance(item, dict):
        return 0
    kind = item.get("type")
    if "role" in item and kind in (None, "message"):
        return _message_tokens(item, model, image_sizes)
    if kind == "function_call":
        return sum(
            count_text_tokens(item[k], model) for k in ("name", "arguments") if isinstance(item.get(k), str)
        )
    if kind == "function_call_output" and isinstance(item.get("output"), str):
        return count_text_tokens(item["output"], model)
    return 0  # reasoning items, item references, ...: not estimated


def _plain_input_tokens(value: Any, model: str) -> int:
    """Embeddings ``input`` / completions ``prompt``: a string, strings, token ids or lists of them."""
    if isinstance(value, str):
        return count_text_tokens(value, model)
    if not isinstance(value, list):
        return 0
    n = 0
    for item in value:
        if isinstance(item, str):
            n += count_text_tokens(item, model)
        elif isinstance(item, int) and not isinstance(item, bool):
            n += 1
        elif isinstance(item, list):
            n += len(item)
    return n


def _endpoint(endpoint: str) -> str:
    e = "/" + endpoint.strip().strip("/")
    return e if e.startswith("/v1/") else "/v1" + e


def request_prompt_tokens(
    body: Mapping[str, Any],
    endpoint: str,
    model: str,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> int:
    """Estimated prompt tokens of one request ``body`` for ``endpoint`` (``/v1/chat/completions``,
    ``/v1/responses``, ``/v1/embeddings``, ``/v1/completions``; the ``/v1`` prefix is optional).

    * chat: per message 3 + role + content (+ 1 + name), plus 3 for the reply. Text parts are counted;
      assistant ``tool_calls`` count their name and arguments.
    * responses: ``instructions`` counts as a system message; ``input`` as a user message when a
      string, else each item (messages with ``input_text``/``input_image`` parts, function calls and
      their outputs); plus 3 for the reply.
    * embeddings / completions: the tokens of ``input`` / ``prompt`` (strings, or token-id lists),
      no framing.
    * chat and responses: ``tools`` and JSON-schema response formats add the tokens of their compact
      JSON (rough: the service renders them in its own format).

    Images: size from ``image_sizes[url]`` when given, else read from the header of a ``data:`` URL
    (Pillow; only the header is decoded). An ``http(s)`` URL (or a file id, or an unreadable data URL)
    has no known size: it is counted at the ``detail="low"`` base cost for tile models, and as a
    512x512 image for patch models -- an underestimate for large images; pass ``image_sizes`` to do
    better. Audio and file parts are not counted. Raises ``UnknownModel`` when the body holds an image
    and ``model`` has no image rule, ``ValueError`` for an unknown endpoint.
    """
    ep = _endpoint(endpoint)
    if ep == "/v1/chat/completions":
        n = REPLY_TOKENS
        for msg in body.get("messages") or ():
            if isinstance(msg, dict):
                n += _message_tokens(msg, model, image_sizes)
        return n + _schema_tokens(body, model)
    if ep == "/v1/responses":
        n = REPLY_TOKENS
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            n += _message_tokens({"role": "system", "content": instructions}, model, image_sizes)
        inp = body.get("input")
        if isinstance(inp, str):
            n += _message_tokens({"role": "user", "content": inp}, model, image_sizes)
        elif isinstance(inp, list):
            for item in inp:
                n += _responses_item_tokens(item, model, image_sizes)
        return n + _schema_tokens(body, model)
    if ep == "/v1/embeddings":
        return _plain_input_tokens(body.get("input"), model)
    if ep == "/v1/completions":
        return _plain_input_tokens(body.get("prompt"), model)
    raise ValueError(f"no token estimate for endpoint {endpoint!r}")


def shard_prompt_tokens(shard_path: str | os.PathLike, endpoint: str, model: str) -> int:
    """Sum of ``request_prompt_tokens`` over the request lines of a shard file (read line by line).

    Blank lines are skipped; a line that is not a JSON request object raises ``ValueError`` naming the
    file and line (shards are written by ``build_jsonl``, so this is a bug, not bad input).
    """
    total = 0
    with open(shard_path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{shard_path}: line {lineno}: not valid JSON ({exc})") from exc
            body = line.get("body") if isinstance(line, dict) else None
            if not isinstance(body, dict):
                raise ValueError(f"{shard_path}: line {lineno}: no request body")
            total += request_prompt_tokens(body, endpoint, model)
    return total


# --------------------------------------------------------------------------- text / image split

_IMAGE_PART_TYPES = ("image_url", "input_image")


def _request_messages(body: Mapping[str, Any], ep: str) -> list[Any]:
    """The message dicts of a chat/responses body (the only places images can be)."""
    if ep == "/v1/chat/completions":
        msgs = body.get("messages")
        return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
    if ep == "/v1/responses":
        inp = body.get("input")
        if not isinstance(inp, list):
            return []
        return [i for i in inp if isinstance(i, dict) and "role" in i and i.get("type") in (None, "message")]
    return []


def _image_part(part: Any) -> tuple[Any, Any] | None:
    """(url, detail) of an image content part, or None for any other part."""
    if not isinstance(part, dict) or part.get("type") not in _IMAGE_PART_TYPES:
        return None
    if part["type"] == "image_url":
        img = part.get("image_url")
        if isinstance(img, str):
            return img, None
        if isinstance(img, dict):
            return img.get("url"), img.get("detail")
        return None
    return part.get("image_url"), part.get("detail")


def iter_request_images(body: Mapping[str, Any], endpoint: str) -> list[tuple[Any, Any]]:
    """``(url, detail)`` of every image part that ``request_prompt_tokens`` counts, in body order."""
    out = []
    for msg in _request_messages(body, _endpoint(endpoint)):
        content = msg.get("content")
        if isinstance(content, list):
            out.extend(ip for ip in map(_image_part, content) if ip is not None)
    return out


def _without_images(body: Mapping[str, Any], ep: str) -> Mapping[str, Any]:
    """A shallow copy of ``body`` with the image parts removed from the message contents."""
    key = "messages" if ep == "/v1/chat/completions" else "input"
    items = body.get(key)
    if ep not in ("/v1/chat/completions", "/v1/responses") or not isinstance(items, list):
        return body
    new_items = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            item = {**item, "content": [p for p in item["content"] if _image_part(p) is None]}
        new_items.append(item)
    return {**body, key: new_items}


def request_token_breakdown(
    body: Mapping[str, Any],
    endpoint: str,
    model: str,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """``(text_tokens, image_tokens)`` of one request; their sum is ``request_prompt_tokens(...)``.

    Text tokens include the chat framing, tools and schemas; image tokens are the image parts alone
    (same rules and assumptions as ``request_prompt_tokens``). Raises ``UnknownModel`` when the body
    holds an image and ``model`` has no image rule: ``request_text_tokens`` then still counts the text.
    """
    text = request_text_tokens(body, endpoint, model)
    image = 0
    for url, detail in iter_request_images(body, endpoint):
        image += _image_part_tokens(url, detail, model, image_sizes)
    return text, image


def request_text_tokens(body: Mapping[str, Any], endpoint: str, model: str) -> int:
    """Prompt tokens of one request without its images (never raises ``UnknownModel``)."""
    ep = _endpoint(endpoint)
    return request_prompt_tokens(_without_images(body, ep), ep, model)


# --------------------------------------------------------------------------- Anthropic (approximate)

#: Anthropic downscales an image whose long edge is over 1,568 px or that would cost over about 1,600
#: tokens (1.2 MP) before counting it at width x height / 750 tokens (their vision guide).
ANTHROPIC_LONG_EDGE = 1568
ANTHROPIC_MAX_PIXELS = 1_200_000
#: An image given by URL (its size unknown offline) is counted as a full-size image.
ANTHROPIC_UNKNOWN_IMAGE_TOKENS = ANTHROPIC_MAX_PIXELS // 750 + 1
#: No offline tokenizer exists for Claude: text is counted with this encoding, an approximation.
ANTHROPIC_TEXT_MODEL = "gpt-4o"


def anthropic_image_tokens(width: int, height: int) -> int:
    """Tokens of a ``width`` x ``height`` image on Claude: ceil(w x h / 750) after the API's downscaling."""
    scale = min(
        1.0, ANTHROPIC_LONG_EDGE / max(width, height), (ANTHROPIC_MAX_PIXELS / (width * height)) ** 0.5
    )
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return -(-(w * h) // 750)


def anthropic_token_breakdown(params: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(text tokens, image tokens, images, images by URL)`` of the ``params`` of an Anthropic request:
    the system prompt, the text blocks and the output schema counted with :data:`ANTHROPIC_TEXT_MODEL`'s
    encoding plus a few tokens of framing per message (approximate: Claude's tokenizer is not
    available offline), the images by :func:`anthropic_image_tokens`."""
    count = _counter(encoding_for(ANTHROPIC_TEXT_MODEL))
    text = 0
    system = params.get("system")
    if isinstance(system, str):
        text += count(system) + 3
    image = images = by_url = 0
    for message in params.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        text += 4  # role and framing
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or ()
        for block in blocks:
            if not isinstance(block, Mapping):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text += count(block["text"])
            elif block.get("type") == "image":
                images += 1
                source = block.get("source") if isinstance(block.get("source"), Mapping) else {}
                size = None
                if source.get("type") == "base64":
                    size = image_size_from_data_url(
                        f"data:{source.get('media_type')};base64,{source.get('data')}"
                    )
                else:
                    by_url += 1
                image += anthropic_image_tokens(*size) if size else ANTHROPIC_UNKNOWN_IMAGE_TOKENS
    output = params.get("output_config")
    if output:
        text += count(json.dumps(output, ensure_ascii=False))
    return text, image, images, by_url

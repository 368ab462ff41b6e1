"""Offline cost estimate of a build, before anything is uploaded.

* ``load_prices(override=None) -> dict`` — the dated price table shipped in ``prices.json``, with an
  override (dict, JSON string or JSON file path; same shape) merged in.
* ``price_for(prices, model) -> dict | None`` — exact model name, then without a ``-YYYY-MM-DD``
  snapshot suffix; unknown → None (never guessed).
* ``estimate_build(manifest_path, prices=None, expected_output_tokens=None) -> dict`` — streams the
  shards of a build: prompt tokens (text and images apart), output tokens (expected and worst case),
  cost at Batch and at standard prices.
* ``write_estimate(estimate, folder) -> (json_path, md_path)`` and ``exceeds_budget(estimate, cap)``.

Prices are data (``prices.json``: ``as_of``, ``source``, ``currency``, ``per`` tokens,
``batch_discount`` = the fraction of the standard price taken off for Batch, ``models``:
``{name: {"input": x, "output": y}}``), never logic. No Airflow import.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError
from .paths import clip
from .tokens import (
    UnknownModel,
    anthropic_token_breakdown,
    iter_request_images,
    request_text_tokens,
    request_token_breakdown,
)

PRICES_FILE = Path(__file__).with_name("prices.json")
ESTIMATE_JSON = "estimate.json"
ESTIMATE_MD = "estimate.md"
#: Output tokens assumed per request for the *expected* figure when the caller gives none (a short
#: paragraph). Capped by the request's own max_tokens; 0 for embeddings (they produce no tokens).
DEFAULT_EXPECTED_OUTPUT_TOKENS = 200
EMBEDDINGS = "/v1/embeddings"
_TOP_KEYS = ("as_of", "source", "currency", "per", "batch_discount", "models")
_MAX_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")  # OpenAI -2024-08-06, Anthropic -20250514


# --------------------------------------------------------------------------- prices


def _parse_override(override: dict | str | os.PathLike) -> dict[str, Any]:
    if isinstance(override, dict):
        return override
    text = os.fspath(override)
    source = "prices override"
    if not text.lstrip().startswith("{"):
        p = Path(text)
        if not p.is_file():
            raise InputError(f"prices override: {clip(repr(text), 80)} is neither a JSON object nor a file")
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{p}: cannot read the prices ({exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{source}: must be a JSON object")
    return obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_prices(prices: dict[str, Any], where: str) -> None:
    unknown = [k for k in prices if k not in _TOP_KEYS]
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_TOP_KEYS)} "
            '(model prices go under "models": {"<model>": {"input": x, "output": y}})'
        )
    models = prices.get("models", {})
    if not isinstance(models, dict):
        raise InputError(f'{where}: "models" must be an object')
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise InputError(f"{where}: models[{name!r}] must be an object with input/output prices")
        for k in ("input", "output"):
            v = entry.get(k)
            if v is not None and (not _is_number(v) or v < 0):
                raise InputError(f"{where}: models[{name!r}].{k} must be a number >= 0 or null")
    d = prices.get("batch_discount")
    if d is not None and (not _is_number(d) or not 0 <= d < 1):
        raise InputError(f"{where}: batch_discount must be a number in [0, 1)")
    per = prices.get("per")
    if per is not None and (not _is_number(per) or per <= 0):
        raise InputError(f"{where}: per must be a number > 0")


def load_prices(override: dict | str | os.PathLike | None = None) -> dict[str, Any]:
    """The shipped price table with ``override`` merged in.

    ``override``: a dict, a JSON object string, or the path of a JSON file, shaped like the file
    (any of ``models``, ``batch_discount``, ``as_of``, ``source``, ``currency``, ``per``). Model entries
    are merged per model (an override entry replaces that model's ``input``/``output`` given in it);
    other keys replace the file's. ``""``/None: no override. Bad shapes raise ``InputError``.
    """
    base = json.loads(PRICES_FILE.read_text(encoding="utf-8"))
    if override is None or (isinstance(override, str) and not override.strip()):
        return base
    extra = _parse_override(override)
    _check_prices(extra, "prices override")
    merged = {k: v for k, v in base.items() if k != "models"}
    merged.update({k: v for k, v in extra.items() if k != "models"})
    models = {name: dict(entry) for name, entry in base.get("models", {}).items()}
    for name, entry in (extra.get("models") or {}).items():
        models.setdefault(name.strip().lower(), {}).update(entry)
    merged["models"] = models
    merged["overridden"] = True
    return merged


def with_aliases(prices: dict[str, Any], aliases: Mapping[str, Any] | None) -> dict[str, Any]:
    """``prices`` with each alias priced as the model it names: ``{"my-gpt-4o-batch": "gpt-4o"}`` (an Azure
    deployment and its model). An alias with an entry of its own keeps it; one naming a model the table
    does not price, or not a string, is left out. Returns a new table (``prices`` is not changed)."""
    models = dict(prices.get("models") or {})
    for alias, model in (aliases or {}).items():
        if (
            not isinstance(alias, str)
            or not isinstance(model, str)
            or alias.lower() in {m.lower() for m in models}
        ):
            continue
        found = price_for(prices, model)
        if found is not None:
            models[alias] = {
                k: found[k] for k in ("input", "output", "as_of", "source") if found.get(k) is not None
            }
    return {**prices, "models": models}


def price_for(prices: dict[str, Any], model: str) -> dict[str, Any] | None:
    """Price entry for ``model``: ``{"model" (the table's name), "input", "output", "currency", "per",
    "batch_discount", "as_of", "source"}``, or None when the table has no entry for it.

    Looked up exactly (case-insensitive), then without a ``-YYYY-MM-DD`` or ``-YYYYMMDD`` snapshot suffix
    (``gpt-4o-2024-08-06`` → ``gpt-4o``, ``claude-sonnet-4-20250514`` → ``claude-sonnet-4``). A model entry's
    own ``as_of`` / ``source`` (another provider's table) win over the file's. Fine-tuned models
    (``ft:...``) are not matched: their prices differ from the base model's.
    """
    models = {k.lower(): v for k, v in (prices.get("models") or {}).items()}
    m = model.strip().lower()
    for name in (m, _SNAPSHOT.sub("", m)):
        entry = models.get(name)
        if entry is not None and entry.get("input") is not None:
            return {
                "model": name,
                "input": entry.get("input"),
                "output": entry.get("output"),
                "currency": prices.get("currency", "USD"),
                "per": prices.get("per", 1_000_000),
                "batch_discount": prices.get("batch_discount", 0.5),
                "as_of": entry.get("as_of") or prices.get("as_of"),
                "source": entry.get("source") or prices.get("source"),
            }
    return None


def token_cost(
    price: dict[str, Any], input_tokens: int, output_tokens: int | None, batch: bool
) -> float | None:
    """Cost of the tokens at ``price`` (Batch or standard), rounded to 6 dp; None when a needed price
    is missing (no output price but output tokens) or ``output_tokens`` is None (unbounded)."""
    if output_tokens is None:
        return None
    out_price = price.get("output")
    if out_price is None and output_tokens:
        return None
    cost = (input_tokens * price["input"] + output_tokens * (out_price or 0)) / price["per"]
    if batch:
        cost *= 1 - price["batch_discount"]
    return round(cost, 6)


# --------------------------------------------------------------------------- estimate


def _copies(build_dir: Path, expected: int) -> dict[str, int]:
    """From the build's ``duplicates.jsonl`` (read when the manifest counts ``expected`` > 0 of them): for
    each sent request's custom_id, how many rows it also answers (rows not sent because they repeat
    it)."""
    from .build import DUPLICATES_NAME

    path = build_dir / DUPLICATES_NAME
    counts: dict[str, int] = {}
    if expected and path.is_file():
        with open(path, encoding="utf-8", newline="\n") as fh:
            for raw in fh:
                if raw.strip():
                    of = json.loads(raw).get("of")
                    counts[of] = counts.get(of, 0) + 1
    return counts


def _cached_usage(
    build_dir: Path, expected: int, endpoint: str, copies: dict[str, int]
) -> tuple[int, int, int, int]:
    """From the build's ``cached.jsonl`` (read when the manifest counts ``expected`` > 0 of them): the
    prompt and completion tokens the kept answers cost when they were paid for, then those of the rows
    repeating them (``copies``: rows per custom_id)."""
    from .build import CACHED_NAME
    from .results import parse_result_line

    prompt = completion = copy_prompt = copy_completion = 0
    path = build_dir / CACHED_NAME
    if expected and path.is_file():
        with open(path, encoding="utf-8", newline="\n") as fh:
            for raw in fh:
                if raw.strip():
                    record = json.loads(raw)
                    o = parse_result_line(record.get("line"), endpoint)
                    p, c = o.prompt_tokens or 0, o.completion_tokens or 0
                    also = copies.get(record.get("custom_id"), 0)
                    prompt, completion = prompt + p, completion + c
                    copy_prompt, copy_completion = copy_prompt + p * also, copy_completion + c * also
    return prompt, completion, copy_prompt, copy_completion


def _request_max_tokens(body: dict[str, Any]) -> int | None:
    for key in _MAX_KEYS:
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _shard_path(recorded: str, build_dir: Path) -> Path:
    p = Path(recorded)
    if p.is_file():
        return p
    moved = build_dir / p.name  # the build folder was moved or copied
    return moved if moved.is_file() else p


def estimate_build(
    manifest_path: str | os.PathLike,
    prices: dict[str, Any] | None = None,
    expected_output_tokens: int | None = None,
) -> dict[str, Any]:
    """Estimate tokens and cost of the build whose ``build_manifest.json`` (or folder) is given.

    Streams every shard line. Prompt tokens come from ``tokens`` (text and images apart). Output:
    ``output_tokens_max`` = sum of every request's ``max_tokens``/``max_completion_tokens``/
    ``max_output_tokens`` (None — unbounded — if any request has none; 0 for embeddings);
    ``output_tokens_expected`` = requests x ``expected_output_tokens`` (default
    ``DEFAULT_EXPECTED_OUTPUT_TOKENS``, each capped by its request's max; 0 for embeddings).

    ``prices``: a table from ``load_prices`` (default: the shipped one). Returns ``{"model",
    "endpoint", "rows", "requests", "invalid", "prompt_tokens", "text_tokens", "image_tokens", "images",
    "output_tokens_expected", "expected_output_tokens_per_request", "output_tokens_max", "price"
    (see ``price_for``, or None), "cost": {"batch": {"expected", "max"}, "standard": {...}} (USD, max
    None when unbounded) or None when the model's price is unknown, "duplicates": {"rows",
    "prompt_tokens", "output_tokens_expected", "batch_usd_expected"} (rows not sent because they repeat
    an earlier row's request, and what sending them would have cost: estimated for a repeat of a sent
    request, the kept answer's tokens for a repeat of a cached one), "cache": {"rows", "prompt_tokens",
    "completion_tokens", "batch_usd"} (rows answered from the answer cache, and what their answers cost
    when they were paid for: exact, from their usage), "notes": [...], "shards":
    [{"index", "requests", "prompt_tokens", "image_tokens", "output_tokens_max"}]}``.
    """
    from .merge import load_manifest  # merge imports build; keep this module light to import

    mpath, manifest = load_manifest(manifest_path)
    opts = manifest.get("options") or {}
    model = str(opts.get("model") or "")
    endpoint = str(opts.get("endpoint") or "/v1/chat/completions")
    embeddings = endpoint == EMBEDDINGS
    if expected_output_tokens is None:
        per_request = 0 if embeddings else DEFAULT_EXPECTED_OUTPUT_TOKENS
    else:
        if isinstance(expected_output_tokens, bool) or not isinstance(expected_output_tokens, int):
            raise InputError(f"expected_output_tokens={expected_output_tokens!r}: must be an integer >= 0")
        if expected_output_tokens < 0:
            raise InputError(f"expected_output_tokens={expected_output_tokens!r}: must be >= 0")
        per_request = 0 if embeddings else expected_output_tokens
    prices = load_prices() if prices is None else prices
    price = price_for(prices, model)

    notes: list[str] = []
    anthropic = opts.get("provider") == "anthropic"
    if anthropic:
        notes.append(
            "Anthropic request: prompt tokens are approximate (no offline tokenizer exists for Claude: text "
            "counted with o200k_base, images at width x height / 750 after Anthropic's downscaling)."
        )
    repeated = int(manifest.get("duplicates") or 0)
    from_cache = int(manifest.get("cached") or 0)
    copies = _copies(mpath.parent, repeated)  # custom_id -> rows answered by that request (not sent)
    saved_prompt = saved_out = 0
    requests = text_total = image_total = images = 0
    url_images = unknown_images = 0
    out_expected = 0
    out_max: int | None = 0
    unbounded = 0
    shards_out: list[dict[str, Any]] = []
    for shard in manifest.get("shards") or ():
        path = _shard_path(shard["path"], mpath.parent)
        s_req = s_prompt = s_image = 0
        s_max: int | None = 0
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise InputError(f"{path}: cannot read the shard ({exc}); rebuild") from None
        with fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    request = json.loads(raw)
                    body = request["params"] if anthropic else request["body"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}: line {lineno}: not a request line ({exc})") from None
                also = copies.get(request.get("custom_id"), 0) if copies else 0
                if anthropic:
                    text, image, n_images, n_urls = anthropic_token_breakdown(body)
                    images += n_images
                    url_images += n_urls
                else:
                    imgs = iter_request_images(body, endpoint)
                    try:
                        text, image = request_token_breakdown(body, endpoint, model)
                    except UnknownModel:
                        text, image = request_text_tokens(body, endpoint, model), 0
                        unknown_images += len(imgs)
                    images += len(imgs)
                    url_images += sum(1 for url, _ in imgs if not str(url).startswith("data:"))
                s_req += 1
                s_prompt += text + image
                s_image += image
                text_total += text
                saved_prompt += (text + image) * also
                if embeddings:
                    continue
                mx = _request_max_tokens(body)
                if mx is None:
                    unbounded += 1
                    s_max = None
                    out_expected += per_request
                    saved_out += per_request * also
                else:
                    if s_max is not None:
                        s_max += mx
                    out_expected += min(per_request, mx)
                    saved_out += min(per_request, mx) * also
        requests += s_req
        image_total += s_image
        if s_max is None or out_max is None:
            out_max = None
        else:
            out_max += s_max
        shards_out.append(
            {
                "index": shard.get("index", len(shards_out)),
                "requests": s_req,
                "prompt_tokens": s_prompt,
                "image_tokens": s_image,
                "output_tokens_max": s_max if not embeddings else 0,
            }
        )

    if unbounded:
        notes.append(
            f"{unbounded} of {requests} requests set no max_tokens: the output (and the cost) has no upper "
            "bound; output_tokens_max and the maximum costs are null. Set max_tokens to bound them."
        )
    if not embeddings:
        notes.append(
            f"expected output assumes {per_request} tokens per request (capped by max_tokens); "
            "reasoning models also bill hidden reasoning tokens as output."
        )
    if unknown_images:
        notes.append(
            f"{unknown_images} images not counted: no image token rule is known for model {model!r} "
            "(prompt tokens are too low)."
        )
    if url_images:
        notes.append(
            f"{url_images} images are given by URL: their size is unknown offline, so they are counted at "
            + (
                "full size (an overestimate for small images)."
                if anthropic
                else "the low-detail base cost (an underestimate for large images)."
            )
        )
    cost = None
    price_ok = False
    if price is None:
        notes.append(
            f"no price known for model {model!r}: cost not estimated (add it with a prices override, e.g. "
            f'{{"models": {{"{model}": {{"input": 1.0, "output": 4.0}}}}}} in USD per 1M tokens).'
        )
    elif price.get("output") is None and not embeddings:
        notes.append(f"no output price known for model {model!r}: cost not estimated.")
    else:
        price_ok = True
    prompt_total = text_total + image_total
    if price is not None and price_ok:
        omax = 0 if embeddings else out_max
        cost = {
            kind: {
                "expected": token_cost(price, prompt_total, out_expected, batch),
                "max": token_cost(price, prompt_total, omax, batch),
            }
            for kind, batch in (("batch", True), ("standard", False))
        }
        if prices.get("overridden"):
            notes.append("prices include an override.")
        notes.append(
            f"prices as of {price.get('as_of')}: {price['input']} / {price.get('output')} "
            f"{price['currency']} per {price['per']:,} input / output tokens (standard), "
            f"Batch {round((1 - price['batch_discount']) * 100, 2):g} % of that."
        )
    if manifest.get("invalid"):
        notes.append(f"{manifest['invalid']} invalid rows are not sent and not counted.")
    usage = _cached_usage(mpath.parent, from_cache, endpoint, copies)
    cache_prompt, cache_completion, copy_prompt, copy_completion = usage
    saved_prompt += copy_prompt
    saved_out += copy_completion
    priced = price is not None and price_ok
    not_spent = token_cost(price, saved_prompt, saved_out, True) if priced else None
    cache_usd = token_cost(price, cache_prompt, cache_completion, True) if priced else None
    if from_cache:
        notes.append(
            f"{from_cache} rows are answered from the answer cache: not sent, not counted "
            f"({cache_prompt:,} prompt and {cache_completion:,} output tokens when they were paid for"
            + (f", {_usd(cache_usd)} at Batch prices" if cache_usd is not None else "")
            + " not spent again)."
        )
    if repeated:
        notes.append(
            f"{repeated} rows repeat an earlier row's request: sent once, answered from it, not counted "
            f"({saved_prompt:,} prompt tokens"
            + (f", about {_usd(not_spent)} at Batch prices" if not_spent is not None else "")
            + " not spent)."
        )

    return {
        "model": model,
        "endpoint": endpoint,
        "rows": manifest.get("rows"),
        "requests": requests,
        "invalid": manifest.get("invalid"),
        "prompt_tokens": prompt_total,
        "text_tokens": text_total,
        "image_tokens": image_total,
        "images": images,
        "expected_output_tokens_per_request": per_request,
        "output_tokens_expected": out_expected,
        "output_tokens_max": 0 if embeddings else out_max,
        "price": price,
        "cost": cost,
        "duplicates": {
            "rows": repeated,
            "prompt_tokens": saved_prompt,
            "output_tokens_expected": saved_out,
            "batch_usd_expected": not_spent,
        },
        "cache": {
            "rows": from_cache,
            "prompt_tokens": cache_prompt,
            "completion_tokens": cache_completion,
            "batch_usd": cache_usd,
        },
        "notes": notes,
        "shards": shards_out,
    }


# --------------------------------------------------------------------------- output


def _usd(v: float | None) -> str:
    if v is None:
        return "unbounded"
    if v >= 1:
        return f"${v:,.2f}"
    return "$" + (f"{v:.6f}".rstrip("0").rstrip(".") or "0")


def _n(v: int | None, none: str = "unbounded") -> str:
    return none if v is None else f"{v:,}"


def format_estimate(estimate: dict[str, Any]) -> str:
    """A short Markdown summary (the content of ``estimate.md``; also what the CLI prints)."""
    e = estimate
    cost = e.get("cost")
    lines = [
        f"# Cost estimate: {e['model']} {e['endpoint']}",
        "",
        "| | |",
        "|---|---|",
        f"| rows | {_n(e.get('rows'), '?')} ({_n(e.get('requests'), '?')} requests, "
        f"{_n(e.get('invalid'), '0')} invalid) |",
        f"| prompt tokens | {_n(e['prompt_tokens'])} |",
        f"| of which image tokens | {_n(e['image_tokens'])} ({_n(e.get('images'), '0')} images) |",
        f"| output tokens, expected | {_n(e['output_tokens_expected'])} |",
        f"| output tokens, at most | {_n(e['output_tokens_max'])} |",
    ]
    for part, label, usd_key, spent in (
        ("duplicates", "from a repeated request", "batch_usd_expected", "about {} not spent"),
        ("cache", "from the cache", "batch_usd", "{} not spent again"),
    ):
        saved = e.get(part) or {}
        if saved.get("rows"):
            usd = saved.get(usd_key)
            lines.append(
                f"| rows answered {label} | {_n(saved['rows'])} (not sent"
                + (f": {spent.format(_usd(usd))} at Batch prices" if usd is not None else "")
                + ") |"
            )
    if cost is None:
        lines.append("| cost | unknown (no price for this model) |")
    else:
        for kind, label in (("batch", "Batch"), ("standard", "standard")):
            c = cost[kind]
            lines.append(
                f"| cost at {label} prices | {_usd(c['expected'])} expected, {_usd(c['max'])} at most |"
            )
    if e.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in e["notes"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_estimate(estimate: dict[str, Any], folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``estimate.json`` and ``estimate.md`` into ``folder``; returns their paths."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    jp, mp = d / ESTIMATE_JSON, d / ESTIMATE_MD
    _write_atomic(jp, json.dumps(estimate, ensure_ascii=False, indent=2) + "\n")
    _write_atomic(mp, format_estimate(estimate))
    return jp, mp


def exceeds_budget(estimate: dict[str, Any], max_cost_usd: float | None) -> str | None:
    """None when the estimate fits ``max_cost_usd`` (or no cap is set), else why not.

    Compares the worst-case Batch cost with the cap; when the worst case is unbounded (no max_tokens)
    the expected Batch cost is compared instead, and the message says so. When the cost is unknown (no
    price for the model) a cap cannot be checked: that is reported as a failure too, so a budget is
    never silently ignored.
    """
    if max_cost_usd is None:
        return None
    cap = float(max_cost_usd)
    cost = estimate.get("cost")
    if cost is None:
        return (
            f"cost unknown (no price for model {estimate.get('model')!r}): cannot check the budget of "
            f"{_usd(cap)}; add the model's price with a prices override"
        )
    worst = cost["batch"]["max"]
    if worst is not None:
        if worst <= cap:
            return None
        return f"worst-case Batch cost {_usd(worst)} exceeds the budget of {_usd(cap)}"
    expected = cost["batch"]["expected"]
    if expected <= cap:
        return None
    return (
        f"expected Batch cost {_usd(expected)} exceeds the budget of {_usd(cap)} (the worst case is "
        "unbounded because max_tokens is not set)"
    )

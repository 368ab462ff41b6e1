"""The ``openai_batch_pipeline`` DAG's params: the form's fields, defaults and enums.

Defaults and enums of the build options come from the library (:mod:`batchpipe.options`), so the form,
the CLI and the library agree; the inbox takes the pipeline's param names from here
(:data:`openai_batch_airflow.inbox.PIPELINE_PARAMS`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from airflow.sdk import Param

from batchpipe import options
from batchpipe.cache import RUN_CACHE_MODES
from batchpipe.options import ENDPOINTS, IMAGE_DETAILS, MAX_REQUESTS_PER_FILE, PROVIDERS, BuildOptions

_BUILD = BuildOptions()  # the library's defaults

INPUT, MODEL, BATCHING, COST, OUTPUT = "Input", "Model and request", "Batching", "Cost", "Output"


def _nullable(kind: str) -> list[str]:
    return ["null", kind]


def _shipped_models() -> list[str]:
    """The model names of the shipped price table (``batchpipe/prices.json``, read without importing the
    estimator): suggestions for the form's model field. Empty when the table cannot be read."""
    try:
        table = Path(options.__file__).with_name("prices.json")
        return [str(name) for name in json.loads(table.read_text(encoding="utf-8"))["models"]]
    except Exception:  # never break the DAG over suggestions
        return []


SHIPPED_MODELS = _shipped_models()

_PARAMS = {
    # -- input ----------------------------------------------------------------------------------
    "input_csv": Param(
        type="string",
        minLength=1,
        title="Input CSV",
        description="Path or URL (s3://bucket/x.csv, ...) of the CSV of prompts. Relative image paths "
        "resolve against its folder.",
        section=INPUT,
    ),
    "prompt_column": Param(
        _BUILD.prompt_column,
        type="string",
        minLength=1,
        title="Prompt column",
        description="Column holding the prompt text (ignored when a prompt template is given).",
        section=INPUT,
    ),
    "prompt_template": Param(
        None,
        type=_nullable("string"),
        title="Prompt template",
        format="multiline",
        description="Optional. Text with {column} placeholders filled from each row; {{ and }} are "
        "literal braces. Overrides the prompt column.",
        section=INPUT,
    ),
    "image_column": Param(
        None,
        type=_nullable("string"),
        title="Image column",
        description="Optional. Column with an image path (relative to the CSV) or http(s) URL per row. "
        "An empty cell means a text-only request.",
        section=INPUT,
    ),
    "image_base_dir": Param(
        None,
        type=["null", "string"],
        title="Image folder",
        description="Optional. Folder that relative image paths resolve against (default: the CSV's "
        "folder); a local path or a URL such as s3://bucket/images.",
        section=INPUT,
    ),
    "id_column": Param(
        None,
        type=_nullable("string"),
        title="ID column",
        description="Optional. Column with a unique id per row, used as the request's custom_id "
        "(default: the row number).",
        section=INPUT,
    ),
    "start_row": Param(
        _BUILD.start_row,
        type="integer",
        minimum=0,
        title="Start row",
        description="First data row to send, 0-based, inclusive.",
        section=INPUT,
    ),
    "end_row": Param(
        None,
        type=_nullable("integer"),
        minimum=1,
        title="End row",
        description="Stop before this data row (exclusive). 10 = the first ten rows. Empty = to the end.",
        section=INPUT,
    ),
    "max_image_mb": Param(
        _BUILD.max_image_mb,
        type="number",
        exclusiveMinimum=0,
        title="Largest image (MB)",
        description="Rows whose image is larger are not sent and come back with an error.",
        section=INPUT,
    ),
    # -- model ----------------------------------------------------------------------------------
    "provider": Param(
        _BUILD.provider,
        type="string",
        enum=list(PROVIDERS),
        title="Batch API",
        description="openai (or any OpenAI-compatible URL), azure_openai (model = the deployment name) or "
        "anthropic (Message Batches: max_tokens required, no temperature).",
        section=MODEL,
    ),
    "model": Param(
        _BUILD.model,
        type="string",
        minLength=1,
        title="Model",
        description="One model per run.",
        section=MODEL,
        # suggestions only (a datalist in the form): any model name is accepted, and validate_csv asks the
        # API whether it knows it
        **({"examples": SHIPPED_MODELS} if SHIPPED_MODELS else {}),
    ),
    "endpoint": Param(
        _BUILD.endpoint,
        type="string",
        enum=list(ENDPOINTS),
        title="Endpoint",
        description="Batch endpoint. Embeddings return the vector as JSON in the response column.",
        section=MODEL,
    ),
    "system_prompt": Param(
        None,
        type=_nullable("string"),
        title="System prompt",
        format="multiline",
        description="Optional system (or, for /v1/responses, instructions) text for every request.",
        section=MODEL,
    ),
    "image_detail": Param(
        _BUILD.image_detail,
        type="string",
        enum=list(IMAGE_DETAILS),
        title="Image detail",
        description="Vision detail level; low is cheapest.",
        section=MODEL,
    ),
    "max_tokens": Param(
        None,
        type=_nullable("integer"),
        minimum=1,
        title="Max output tokens",
        description="Optional cap on each answer's length (at least 16 for /v1/responses).",
        section=MODEL,
    ),
    "temperature": Param(
        None,
        type=_nullable("number"),
        minimum=0,
        maximum=2,
        title="Temperature",
        description="Optional sampling temperature.",
        section=MODEL,
    ),
    "extra_body": Param(
        None,
        type=_nullable("object"),
        title="Extra request fields",
        description='Optional JSON object merged into every request body, e.g. {"response_format": '
        '{"type": "json_object"}}. It may not set model, messages, input, instructions, n or stream '
        "(the params own them).",
        section=MODEL,
    ),
    "response_schema": Param(
        None,
        type=_nullable("object"),
        title="Answer schema (JSON Schema)",
        description="Optional. Every answer is JSON following this schema (strict structured outputs) and "
        "each top-level property becomes a results column, e.g. "
        '{"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", '
        '"negative"]}, "score": {"type": "number"}}, "required": ["sentiment", "score"]}. Every property '
        'must be listed in "required" (allow null for an optional one); "additionalProperties": false is '
        "added where missing. Checked before anything is uploaded. Not for /v1/embeddings.",
        section=MODEL,
    ),
    # -- batching -------------------------------------------------------------------------------
    "completion_window": Param(
        "24h",
        type="string",
        enum=["24h"],
        title="Completion window",
        description="The Batch API accepts only 24h.",
        section=BATCHING,
    ),
    "check_interval": Param(
        60,
        type="integer",
        minimum=1,
        title="Check interval (s)",
        description="Seconds between status checks while waiting (done by the triggerer).",
        section=BATCHING,
    ),
    "max_requests_per_batch": Param(
        _BUILD.max_requests_per_batch,
        type="integer",
        minimum=1,
        maximum=MAX_REQUESTS_PER_FILE,
        title="Requests per batch",
        description="Split into several batches above this many requests (API limit 50,000).",
        section=BATCHING,
    ),
    "max_batch_bytes": Param(
        _BUILD.max_batch_bytes,
        type="integer",
        minimum=1000,
        maximum=200_000_000,
        title="Bytes per batch file",
        description="Split when a request file would exceed this size (API limit 200 MB).",
        section=BATCHING,
    ),
    "max_resubmits": Param(
        2,
        type="integer",
        minimum=0,
        maximum=10,
        title="Resubmit rounds",
        description="Requests that failed for a retryable reason (batch expired, 429, 5xx) are sent again "
        "in a follow-up batch, up to this many rounds. Permanent errors (4xx) are never resubmitted.",
        section=BATCHING,
    ),
    "token_limit_wait": Param(
        600,
        type="integer",
        minimum=1,
        title="Wait after token-limit refusal (s)",
        description="A batch refused for the enqueued token limit is submitted again after this pause.",
        section=BATCHING,
    ),
    "max_enqueued_tokens": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Enqueued token limit",
        description="Optional. Your organisation's enqueued prompt-token limit for the model: shards "
        "are submitted in waves that stay under it. Empty: Variable openai_batch_max_enqueued_tokens, "
        "else no limit.",
        section=BATCHING,
    ),
    "dedupe": Param(
        _BUILD.dedupe,
        type="boolean",
        title="Send each distinct request once",
        description="A row whose request repeats an earlier row's exactly (same prompt, images by their "
        "bytes, same settings) is not sent: it gets that row's answer, and answered_from says which row. "
        "Off: every row is sent (several samples of one prompt).",
        section=BATCHING,
    ),
    "cancel_on_kill": Param(
        True,
        type="boolean",
        title="Cancel batch when the task is stopped",
        description="Killing, clearing or marking the waiting task failed cancels its batch.",
        section=BATCHING,
    ),
    "conn_id": Param(
        None,
        type=_nullable("string"),
        title="Connection",
        description="Airflow connection of the batch API; empty: openai_default, azure_openai_default or "
        "anthropic_default, by provider. An openai connection's host may be any OpenAI-compatible base URL.",
        section=BATCHING,
    ),
    # -- cost -----------------------------------------------------------------------------------
    "estimate_only": Param(
        False,
        type="boolean",
        title="Estimate only",
        description="Validate, build and estimate tokens and cost (estimate.json and estimate.md in the run "
        "folder), upload nothing, end successfully.",
        section=COST,
    ),
    "max_cost_usd": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0,
        title="Budget (USD)",
        description="Optional. Stop before upload when the worst-case Batch cost exceeds this (the expected "
        "cost when max_tokens is unset, as the worst case is then unbounded).",
        section=COST,
    ),
    "cache_dir": Param(
        None,
        type=_nullable("string"),
        title="Answer cache",
        description="Optional. A folder (local path, or a URL such as s3://bucket/cache) keeping the answers "
        "paid for: a row whose exact request was answered before is answered from it and not sent again; "
        "new answers are added after the merge (errors never). Empty: Variable openai_batch_cache_dir, else "
        "env OPENAI_BATCH_CACHE_DIR, else no cache. A local folder is for one machine; several workers "
        "share a URL.",
        section=COST,
    ),
    "cache_mode": Param(
        "read_write",
        type="string",
        enum=list(RUN_CACHE_MODES),
        title="Answer cache mode",
        description="read_write: use kept answers, add new ones. read_only: use them, add nothing. refresh: "
        "send every row, replace the kept answers. off: no cache for this run, even when one is configured.",
        section=COST,
    ),
    "expected_output_tokens": Param(
        200,
        type="integer",
        minimum=0,
        title="Expected answer length (tokens)",
        description="Used for the expected cost; the worst case uses max_tokens.",
        section=COST,
    ),
    "prices": Param(
        None,
        type=["null", "object"],
        title="Price overrides",
        description='Optional. {"models": {"my-model": {"input": 1.0, "output": 4.0}}} in USD per 1M tokens '
        "at standard prices, merged over the shipped dated table (Variable openai_batch_prices too).",
        section=COST,
    ),
    # -- output ---------------------------------------------------------------------------------
    "output_dir": Param(
        None,
        type=_nullable("string"),
        title="Output folder",
        description="Where results land: a local path or a URL such as s3://bucket/results. Empty: "
        "Variable openai_batch_output_dir, else env OPENAI_BATCH_OUTPUT_DIR, else "
        "$AIRFLOW_HOME/openai_batch_results.",
        section=OUTPUT,
    ),
    "work_dir": Param(
        None,
        type=_nullable("string"),
        title="Work folder",
        description="Where the request shards and downloaded batch files go while the run lasts (a "
        "folder per run below it). Empty: <output folder>/<csv name>/<run id>/work. A local path or a "
        "URL such as s3://bucket/prefix; with several workers it must be storage they all reach.",
        section=OUTPUT,
    ),
    "storage_conn_id": Param(
        None,
        type=_nullable("string"),
        title="Storage connection",
        description="Airflow connection for object-storage URLs in input_csv, output_dir and work_dir "
        "(e.g. an aws connection for s3://). Empty: a connection named in the URL itself "
        "(s3://conn_id@bucket/...), else the filesystem's default credentials.",
        section=OUTPUT,
    ),
    "keep_temp_files": Param(
        False,
        type="boolean",
        title="Keep temporary files",
        description="Keep the JSONL request files and downloaded batch files after a successful merge.",
        section=OUTPUT,
    ),
    "output_prefix": Param(
        None,
        type=_nullable("string"),
        pattern="^[^\\u0000-\\u001f\\u007f]*$",
        title="Answer column prefix",
        description="Put before each answer schema column's name (answer_ makes sentiment answer_sentiment), "
        "e.g. when the CSV already has a column of that name.",
        section=OUTPUT,
    ),
    "csv_formula_escape": Param(
        True,
        type="boolean",
        title="Escape formulas in answers",
        description="Put a ' before a response, error or text answer cell that starts with = + - @ tab or "
        "CR, so that Excel and other spreadsheets do not run it as a formula (OWASP CSV injection). Input "
        "columns are never changed. Turn off when a program, not a person, reads results.csv.",
        section=OUTPUT,
    ),
}


def pipeline_params() -> dict[str, Param]:
    """The pipeline's params, copied anew on each call: a DAG owns its Param objects (``Param.resolve``
    keeps the value it resolved), so two parses of the DAG file never share one."""
    return copy.deepcopy(_PARAMS)


#: The pipeline's param names.
PARAM_NAMES = frozenset(_PARAMS)

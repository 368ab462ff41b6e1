"""``batchpipe`` command line: validate, build, merge (no Airflow needed).

    batchpipe validate INPUT.csv [options]
    batchpipe build INPUT.csv --out-dir DIR [options]
    batchpipe merge --build-dir DIR RESULT.jsonl... --out results.csv [--batch-id ID ...]

Fatal input problems print the message on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .build import build_jsonl, validate_csv
from .errors import InputError
from .options import ENDPOINTS, IMAGE_DETAILS, BuildOptions


def _add_build_options(p: argparse.ArgumentParser) -> None:
    d = BuildOptions()
    p.add_argument("input", metavar="INPUT.csv", help="CSV file with a header row")
    p.add_argument(
        "--prompt-column", default=d.prompt_column, help="column holding the prompt (default: prompt)"
    )
    p.add_argument("--prompt-template", help="template with {column} placeholders; {{ }} are literal braces")
    p.add_argument("--system-prompt", help="system prompt (instructions for /v1/responses)")
    p.add_argument("--image-column", help="column with an image path (relative to the CSV) or http(s) URL")
    p.add_argument("--image-detail", default=d.image_detail, choices=IMAGE_DETAILS)
    p.add_argument("--id-column", help="column with unique ids used as custom_id (default: row-N)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--endpoint", default=d.endpoint, choices=ENDPOINTS)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument("--start-row", type=int, default=d.start_row, help="first data row, 0-based (inclusive)")
    p.add_argument("--end-row", type=int, help="end data row, 0-based (exclusive); default: to the end")
    p.add_argument("--max-requests-per-batch", type=int, default=d.max_requests_per_batch)
    p.add_argument("--max-batch-bytes", type=int, default=d.max_batch_bytes)
    p.add_argument("--max-image-mb", type=float, default=d.max_image_mb)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _options(args: argparse.Namespace) -> BuildOptions:
    # The argparse destinations are named like the option fields; from_dict ignores the rest.
    d = vars(args)
    opts = BuildOptions.from_dict(d)
    opts.validate()
    return opts


def _print_invalid(examples: list[dict[str, Any]], total: int) -> None:
    if not examples:
        return
    print(f"first invalid rows ({len(examples)} of {total}):")
    for e in examples:
        col = f" [{e['column']}]" if e.get("column") else ""
        print(f"  row {e['row']}{col}: {e['error']}")


def _cmd_validate(args: argparse.Namespace) -> int:
    summary = validate_csv(args.input, _options(args))
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(f"file: {summary['file']}")
    print(f"columns: {', '.join(summary['columns'])}")
    print(f"rows in file: {summary['rows_in_file']}, selected: {summary['rows_selected']}")
    print(f"valid: {summary['valid']}, invalid: {summary['invalid']}")
    _print_invalid(summary["first_invalid"], summary["invalid"])
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    result = build_jsonl(args.input, _options(args), args.out_dir)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    print(f"rows: {result['rows']}, valid: {result['valid']}, invalid: {result['invalid']}")
    for s in result["shards"]:
        print(
            f"shard {s['index']}: {s['path']} ({s['requests']} requests, {s['bytes']} bytes, "
            f"rows {s['first_row']}..{s['last_row']})"
        )
    if not result["shards"]:
        print("no valid rows: nothing to submit")
    _print_invalid(result["first_invalid"], result["invalid"])
    print(f"manifest: {result['manifest']}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_results

    report = merge_results(args.build_dir, args.results, args.out, batch_ids=args.batch_id)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchpipe", description="CSV of prompts <-> OpenAI Batch API files"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a CSV and print a summary")
    _add_build_options(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("build", help="write Batch API JSONL shard(s)")
    _add_build_options(p)
    p.add_argument(
        "--out-dir", required=True, help="directory for shards, invalid.jsonl, build_manifest.json"
    )
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("merge", help="merge downloaded output/error files into a results CSV")
    p.add_argument("--build-dir", required=True, help="directory written by 'batchpipe build'")
    p.add_argument("results", nargs="*", metavar="RESULT.jsonl", help="output and error files")
    p.add_argument("--out", required=True, help="results CSV to write (report.json goes beside it)")
    p.add_argument("--batch-id", action="append", help="batch id to record in the report (repeatable)")
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"batchpipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

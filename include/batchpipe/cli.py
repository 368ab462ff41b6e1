"""``batchpipe`` command line: validate, build, merge (no Airflow needed).

    batchpipe validate INPUT.csv [options]
    batchpipe build INPUT.csv --out-dir DIR [options] [--cache-dir DIR [--cache-mode MODE]]
    batchpipe merge --build-dir DIR RESULT.jsonl... --out results.csv [--batch-id ID ...]
                    [--estimate estimate.json] [--batches batches.json] [--model M] [--prices FILE_OR_JSON]
                    [--cache-dir DIR [--cache-mode MODE]]
    batchpipe estimate INPUT.csv [build options] [--expected-output-tokens N] [--prices FILE_OR_JSON]
                       [--max-cost-usd X] [--out-dir DIR] [--json] [--cache-dir DIR [--cache-mode MODE]]
    batchpipe analyze RESULTS.csv|OUTPUT.jsonl... [--json] [--html OUT.html [--estimate estimate.json]
                      [--batches batches.json] [--model M] [--prices FILE_OR_JSON]]
    batchpipe cache stats CACHE_DIR [--json]
    batchpipe cache prune CACHE_DIR --older-than DAYS

Fatal input problems print the message on stderr and exit with code 2; ``estimate`` exits with code 3
when the estimate exceeds ``--max-cost-usd``; output cut off by its reader (``| head``) ends quietly
with code 141 (128 + SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .build import CACHED_NAME, DUPLICATES_NAME, build_jsonl, describe_problem, validate_csv
from .cache import CACHE_MODES, AnswerCache, NewAnswers
from .errors import InputError
from .options import ENDPOINTS, IMAGE_DETAILS, PROVIDERS, BuildOptions


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
    p.add_argument(
        "--provider",
        default=d.provider,
        choices=PROVIDERS,
        help="the batch API the requests are written for (anthropic: Message Batches request lines; "
        "--max-tokens required)",
    )
    p.add_argument("--endpoint", default=d.endpoint, choices=ENDPOINTS)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument(
        "--response-schema",
        metavar="FILE|JSON",
        help="JSON Schema every answer follows (a file, or the JSON itself); each top-level property becomes "
        "a results column",
    )
    p.add_argument("--output-prefix", default=d.output_prefix, help="put before each answer column's name")
    p.add_argument("--start-row", type=int, default=d.start_row, help="first data row, 0-based (inclusive)")
    p.add_argument("--end-row", type=int, help="end data row, 0-based (exclusive); default: to the end")
    p.add_argument("--max-requests-per-batch", type=int, default=d.max_requests_per_batch)
    p.add_argument("--max-batch-bytes", type=int, default=d.max_batch_bytes)
    p.add_argument("--max-image-mb", type=float, default=d.max_image_mb)
    p.add_argument(
        "--no-dedupe",
        dest="dedupe",
        action="store_false",
        help="send every row (default: a request repeating an earlier row's is sent once, and its answer "
        "copied)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_cache_options(p: argparse.ArgumentParser, merge: bool = False) -> None:
    p.add_argument(
        "--cache-dir",
        help="answer cache folder: "
        + ("keep the merged answers there" if merge else "rows whose request is kept there are not sent"),
    )
    p.add_argument(
        "--cache-mode",
        default="read_write",
        choices=CACHE_MODES,
        help="read_write (default): use and add; read_only: use, add nothing; refresh: send all, replace",
    )


def _open_cache(args: argparse.Namespace) -> AnswerCache | None:
    return AnswerCache(args.cache_dir, args.cache_mode) if args.cache_dir else None


def _build(args: argparse.Namespace, opts: BuildOptions, out_dir: str | os.PathLike) -> dict[str, Any]:
    cache = _open_cache(args)
    try:
        return build_jsonl(args.input, opts, out_dir, cache=cache)
    finally:
        if cache is not None:
            cache.close()


def _options(args: argparse.Namespace) -> BuildOptions:
    # The argparse destinations are named like the option fields; from_dict ignores the rest.
    d = dict(vars(args))
    d["response_schema"] = _json_or_file(d.get("response_schema"), "--response-schema")
    opts = BuildOptions.from_dict(d)
    opts.validate()
    return opts


def _json_or_file(value: str | None, flag: str) -> Any:
    """``value`` as JSON text, or the JSON in the file it names (None stays None)."""
    if value is None or value.lstrip().startswith(("{", "[")):
        return value
    try:
        return json.loads(Path(value).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{flag} {value}: no such file (give a file or the JSON itself)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{flag} {value}: cannot read it as JSON ({exc})") from None


def _print_invalid(examples: list[dict[str, Any]], total: int) -> None:
    if not examples:
        return
    print(f"first invalid rows ({len(examples)} of {total}):")
    for e in examples:
        print(f"  {describe_problem(e)}")


def _cmd_validate(args: argparse.Namespace) -> int:
    summary = validate_csv(args.input, _options(args))
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(f"file: {summary['file']}")
    print(f"columns: {', '.join(summary['columns'])}")
    print(f"rows in file: {summary['rows_in_file']}, selected: {summary['rows_selected']}")
    print(f"valid: {summary['valid']}, invalid: {summary['invalid']}")
    if summary["answer_columns"]:
        print(f"answer columns: {', '.join(summary['answer_columns'])}")
    for note in summary["schema_notes"]:
        print(f"response schema: {note}")
    _print_invalid(summary["first_invalid"], summary["invalid"])
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    result = _build(args, _options(args), args.out_dir)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    print(f"rows: {result['rows']}, valid: {result['valid']}, invalid: {result['invalid']}")
    if result["duplicates"]:
        print(
            f"{result['duplicates']} row(s) repeat an earlier row's request: sent once, answered from it "
            f"({DUPLICATES_NAME})"
        )
    if result["cached"]:
        print(f"{result['cached']} row(s) answered from the answer cache: not sent ({CACHED_NAME})")
    for s in result["shards"]:
        print(
            f"shard {s['index']}: {s['path']} ({s['requests']} requests, {s['bytes']} bytes, "
            f"data rows {s['first_row']}..{s['last_row']}, 0-based)"
        )
    if not result["shards"]:
        print("nothing to submit: " + ("no valid rows" if not result["valid"] else "every row is answered"))
    _print_invalid(result["first_invalid"], result["invalid"])
    print(f"manifest: {result['manifest']}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """Merge, then finish report.json / report.html as the pipeline does (:func:`report.finish_report`):
    the same build, result files, estimate, batches, model and prices give the pipeline's report.

    Every report input is read and checked before the merge writes anything."""
    from .estimate import _shard_path, load_prices
    from .merge import load_manifest, merge_results
    from .report import finish_report

    mpath, manifest = load_manifest(args.build_dir)
    model = args.model or BuildOptions.from_dict(manifest.get("options") or {}).model
    estimate = _merge_estimate(args)
    batches = _batches_arg(args.batches) if args.batches else []
    prices = load_prices(args.prices)
    batch_ids = args.batch_id if args.batch_id else [b["id"] for b in batches]
    with contextlib.ExitStack() as stack:
        cache = _open_cache(args)
        new = None
        if cache is not None:
            stack.callback(cache.close)
            if cache.mode != "read_only":
                new = stack.enter_context(NewAnswers(Path(mpath).parent))
        report = merge_results(
            args.build_dir,
            args.results,
            args.out,
            batch_ids=batch_ids,
            formula_escape=args.formula_escape,
            write_report=False,
            answered=new.answered if new is not None else None,
        )
        if cache is not None:
            added = 0
            if new is not None:
                shards = [_shard_path(s["path"], Path(mpath).parent) for s in manifest.get("shards") or ()]
                opts = BuildOptions.from_dict(manifest.get("options") or {})
                added = new.keep(cache, shards, args.results, opts.endpoint, opts.model)
            report["cache"] = {"folder": str(cache.folder), "mode": cache.mode, "added": added}
    report = finish_report(args.out, report, estimate=estimate, batches=batches, model=model, prices=prices)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _merge_estimate(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--estimate``, else the estimate.json in the ``--out`` folder (where the pipeline keeps it), else
    the one in ``--build-dir`` (where ``batchpipe estimate --out-dir`` writes it), else None."""
    if args.estimate:
        path = args.estimate
    else:
        found = [p for p in (Path(args.out).parent, Path(args.build_dir)) if (p / "estimate.json").is_file()]
        if not found:
            return None
        path = str(found[0] / "estimate.json")
    estimate = _read_json_arg(path, "--estimate")
    if not isinstance(estimate, dict):
        raise InputError(f"--estimate {path}: expected the JSON object 'batchpipe estimate' writes")
    return estimate


def _batches_arg(path: str) -> list[dict[str, Any]]:
    """Batch summaries from ``path``: a JSON list, an API list response (``{"data": [...]}``), or a
    report.json (its ``batches``); each an object with an ``id``."""
    batches = _read_json_arg(path, "--batches")
    if isinstance(batches, dict):
        batches = batches.get("batches", batches.get("data"))
    if not isinstance(batches, list):
        raise InputError(f"--batches {path}: expected a JSON list of batch summaries (or report.json)")
    for n, b in enumerate(batches, 1):
        if not isinstance(b, dict):
            raise InputError(f"--batches {path}: batch {n} is not a JSON object")
        if not isinstance(b.get("id"), str) or not b["id"]:
            raise InputError(f"--batches {path}: batch {n} has no 'id'")
    return batches


EXIT_OVER_BUDGET = 3


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate_build, exceeds_budget, format_estimate, load_prices, write_estimate

    prices = load_prices(args.prices)
    opts = _options(args)
    if args.out_dir:
        _build(args, opts, args.out_dir)
        estimate = estimate_build(args.out_dir, prices, args.expected_output_tokens)
        write_estimate(estimate, args.out_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="batchpipe-estimate-") as tmp:
            _build(args, opts, tmp)
            estimate = estimate_build(tmp, prices, args.expected_output_tokens)
    over = exceeds_budget(estimate, args.max_cost_usd)
    if args.json:
        print(json.dumps({**estimate, "over_budget": over}, ensure_ascii=False, indent=2))
    else:
        print(format_estimate(estimate), end="")
        if args.out_dir:
            print(f"\nwritten: {Path(args.out_dir) / 'estimate.json'}, {Path(args.out_dir) / 'estimate.md'}")
    if over:
        print(f"batchpipe: over budget: {over}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    """Summarise results files (text or ``--json``: one summary over all files, with ``per_file``).

    ``--html OUT.html`` with one results.csv writes its report there. With several (``*/results.csv``
    of several runs) each run gets its own full report page, ``OUT-<n>-<run folder>.html`` beside
    OUT.html, and OUT.html is the overview: totals and a line per run linking its page. A run's page is
    per run because its estimate, batches and cost belong to that run only; a report.json and
    estimate.json beside a results.csv (as the pipeline leaves them) give its page the merge's counts,
    the model, the batches and the estimate.
    """
    from .report import analyze, format_analysis, write_overview_html

    for p in args.results:
        if not Path(p).is_file():
            raise InputError(f"{p}: file not found")
    if args.html:
        _check_html_target(args.html, args.results)
    try:
        result = analyze(args.results)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    summary = json.dumps(result, ensure_ascii=False, indent=2) if args.json else format_analysis(result)
    if not args.html:
        print(summary)
        return 0
    # the pages are written before the summary is printed: a reader that stops early (| head) must not
    # cost the report
    unique: dict[Path, str] = {}  # one page per file, however its path is spelled
    for p in args.results:
        if p.lower().endswith(".csv"):
            unique.setdefault(Path(p).resolve(), p)
    csvs = list(unique.values())
    if not csvs:
        raise InputError(
            "--html needs merged results .csv files (raw .jsonl files have no rows to report on)"
        )
    if len(csvs) > 1 and (args.estimate or args.batches):
        raise InputError(
            "--estimate and --batches describe one run: give them with one results.csv (with several, "
            "each run's page takes the estimate.json and report.json beside its results.csv)"
        )
    batches = None
    if args.batches:
        batches = _read_json_arg(args.batches, "--batches")
        if isinstance(batches, dict):  # {"batches": [...]} as some tools write it
            batches = batches.get("batches")
        if not isinstance(batches, list):
            raise InputError("--batches: expected a JSON list of batch summaries")
    prices = None
    if args.prices:
        from .estimate import load_prices

        prices = load_prices(args.prices)
    estimate = _read_json_arg(args.estimate, "--estimate") if args.estimate else None
    to = sys.stderr if args.json else sys.stdout
    out = Path(args.html)
    if len(csvs) == 1:
        page = _run_page(csvs[0], out, estimate, batches, args.model, prices)
        print(summary)
        print(f"report: {page}", file=to)
        return 0
    from .naming import safe_name

    pages = []
    for n, results in enumerate(csvs, 1):
        run = safe_name(Path(results).resolve().parent.name)[:60]
        page = out.with_name(f"{out.stem}-{n}-{run}{out.suffix or '.html'}")
        _check_html_target(page, csvs)
        pages.append((results, _run_page(results, page, None, None, args.model, prices)))
    overview = result if len(csvs) == len(args.results) else analyze(csvs)
    written = write_overview_html(overview, pages, out)
    print(summary)
    print(f"report: {written} ({len(pages)} run pages beside it)", file=to)
    return 0


def _check_html_target(target: str | Path, inputs: list[str]) -> None:
    """Refuse an HTML report path that would overwrite an input, or any file that is not an HTML page:
    ``--html`` placed before a glob takes the first results.csv as its value."""
    out = Path(target)
    results_like = out.suffix.lower() in (".csv", ".jsonl", ".json")
    if results_like or out.resolve() in {Path(p).resolve() for p in inputs}:
        raise InputError(
            f"--html {out}: that is a results file, not a report page: nothing written (put --html "
            "report.html before or after the results files, e.g. --html report.html */results.csv)"
        )
    if out.is_file():
        with open(out, "rb") as fh:
            head = fh.read(512).lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise InputError(f"--html {out}: an existing file that is not an HTML page: not overwritten")


def _run_page(results: str, out: Path, estimate: Any, batches: Any, model: str | None, prices: Any) -> Path:
    """One run's report page; what is not given comes from report.json / estimate.json beside ``results``."""
    from .report import write_report_html

    report_json = Path(results).with_name("report.json")
    report = _read_json_arg(str(report_json), "report.json") if report_json.is_file() else None
    report = report if isinstance(report, dict) else None
    beside = Path(results).with_name("estimate.json")
    if estimate is None and beside.is_file():
        estimate = _read_json_arg(str(beside), "estimate.json")
    if batches is None and isinstance((report or {}).get("batches"), list):
        batches = report["batches"]
    batches = [b for b in batches if isinstance(b, dict)] if batches else None
    estimate = estimate if isinstance(estimate, dict) else None
    model = model if model or not isinstance((report or {}).get("model"), str) else report["model"]
    try:
        return write_report_html(
            results, report, out, estimate=estimate, batches=batches, model=model, prices=prices
        )
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # files beside it of another shape
        print(
            f"batchpipe: warning: {report_json.parent}: report.json / estimate.json there are not what a run "
            f"leaves ({type(exc).__name__}); this page is made from {Path(results).name} alone",
            file=sys.stderr,
        )
        return write_report_html(results, None, out, model=model, prices=prices)


def _cmd_cache(args: argparse.Namespace) -> int:
    """``cache stats``: entries, bytes, oldest and newest of an answer cache; ``cache prune``: remove the
    entries kept more than ``--older-than`` days ago."""
    import time

    from .cache import CACHE_FILE, AnswerCache

    if not (Path(args.cache_dir) / CACHE_FILE).is_file():
        raise InputError(f"{args.cache_dir}: no answer cache here (no {CACHE_FILE})")
    with AnswerCache(args.cache_dir, mode="read_only") as cache:
        if args.action == "prune":
            if args.older_than is None or args.older_than < 0:
                raise InputError("cache prune: --older-than DAYS (0 or more) is required")
            removed = cache.prune(args.older_than * 86400)
            what = "entry" if removed == 1 else "entries"
            print(f"removed {removed:,} {what} kept more than {args.older_than:g} days ago")
        stats = cache.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

    print(f"cache: {stats['path']}")
    print(f"  entries: {stats['entries']:,}  answers: {stats['bytes']:,} bytes", end="")
    print(f"  file: {stats['file_bytes']:,} bytes")
    print(f"  oldest: {when(stats['oldest'])}  newest: {when(stats['newest'])}")
    return 0


def _read_json_arg(path: str, option: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise InputError(f"{option} {path}: cannot read JSON ({exc})") from None


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
    _add_cache_options(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("merge", help="merge downloaded output/error files into a results CSV")
    p.add_argument("--build-dir", required=True, help="directory written by 'batchpipe build'")
    p.add_argument("results", nargs="*", metavar="RESULT.jsonl", help="output and error files")
    p.add_argument("--out", required=True, help="results CSV to write (report.json goes beside it)")
    p.add_argument(
        "--batch-id",
        action="append",
        help="batch id to record in the report (repeatable; default: the ids of --batches)",
    )
    p.add_argument(
        "--estimate",
        help="estimate.json to compare the cost with (default: the one in the --out folder, else in "
        "--build-dir)",
    )
    p.add_argument(
        "--batches",
        help="batch summaries for the report: a JSON list, an API list response or a run's report.json",
    )
    p.add_argument("--model", help="model for the actual cost (default: the build's)")
    p.add_argument("--prices", help="price override: a JSON file or string, e.g. '{\"models\": {...}}'")
    p.add_argument(
        "--no-formula-escape",
        dest="formula_escape",
        action="store_false",
        help="write answers starting with = + - @ tab CR as they are (default: a leading ' so that "
        "spreadsheets do not run them as formulas)",
    )
    _add_cache_options(p, merge=True)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("estimate", help="build into a temporary folder and estimate tokens and cost")
    _add_build_options(p)
    p.add_argument(
        "--expected-output-tokens",
        type=int,
        help="output tokens expected per request (default 200; capped by --max-tokens; 0 for embeddings)",
    )
    p.add_argument("--prices", help="price override: a JSON file or string, e.g. '{\"models\": {...}}'")
    p.add_argument("--max-cost-usd", type=float, help="exit with code 3 when the Batch cost may exceed this")
    p.add_argument("--out-dir", help="keep the build and write estimate.json/estimate.md here")
    _add_cache_options(p)
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("analyze", help="summarise results.csv or raw output/error .jsonl files")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results .csv and/or output/error .jsonl")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument(
        "--html",
        metavar="OUT.html",
        help="write the HTML report; several results.csv: one page per run beside OUT.html, which links them",
    )
    p.add_argument("--estimate", help="estimate.json to compare with (for --html)")
    p.add_argument("--batches", help="JSON list of batch summaries for the timeline (for --html)")
    p.add_argument("--model", help="model for the actual cost (default: the estimate's)")
    p.add_argument("--prices", help="price override: a JSON file or string (for --html)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("cache", help="look after an answer cache: stats, prune")
    p.add_argument("action", choices=("stats", "prune"))
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="the cache's folder (holds answers.sqlite)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="prune: entries kept more than DAYS ago")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=_cmd_cache)
    for command in (parser, *sub.choices.values()):
        command.allow_abbrev = False  # --max-tok is a typo, not silently --max-tokens
        command.set_defaults(parser=command)
    return parser


def _refuse_unknown(args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit 2 naming the arguments the command does not take, with the closest option for each flag."""
    from difflib import get_close_matches

    command = args.parser
    options = [flag for action in command._actions for flag in action.option_strings]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or len(flag) > 100:
            continue
        # an abbreviation (refused: it would silently change meaning when an option is added) names its
        # options, a typo the closest one
        near = [o for o in options if o.startswith(flag)] or get_close_matches(flag, options, 1)
        if near:
            hints.append(f"{flag}: did you mean {' or '.join(near)}?")
    command.error(
        f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
    )


#: The exit code of a command whose output was cut off by its reader (``| head``): 128 + SIGPIPE, as a
#: shell reports ``yes | head``.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(args, unknown)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone away fails here, not at interpreter exit
        return code
    except InputError as exc:
        print(f"batchpipe: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader (head, less...) has what it wanted: no traceback; stdout goes to devnull so that the
        # interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

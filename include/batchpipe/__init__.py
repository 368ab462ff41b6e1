"""Pure library (no Airflow) turning a CSV of prompts into OpenAI Batch API files and back."""

from .build import build_jsonl, validate_csv
from .errors import InputError, RowError
from .merge import merge_results
from .options import BuildOptions
from .results import Outcome, iter_outcomes, parse_result_line

__all__ = [
    "BuildOptions",
    "InputError",
    "Outcome",
    "RowError",
    "build_jsonl",
    "iter_outcomes",
    "merge_results",
    "parse_result_line",
    "validate_csv",
]

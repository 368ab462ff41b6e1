"""What a pipeline run records in Airflow for the UI (:mod:`openai_batch_airflow.ui`): the XCom keys the
task bodies push and the pages read. Each value is small."""

from __future__ import annotations

#: ``merge``: the run's spend summary (:func:`batchpipe.spend.run_summary`: counts, tokens, cost,
#: savings, where report.html landed), pushed before a run with problems fails.
REPORT_XCOM = "batch_report"
#: ``validate_csv``: why the run stopped before anything was sent (``{"message", "first_invalid"}``).
VALIDATION_XCOM = "validation_error"
#: ``build_jsonl``: the cost estimate (``{"markdown"}``: estimate.md's text).
ESTIMATE_XCOM = "batch_estimate"

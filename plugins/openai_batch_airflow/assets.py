"""The Asset every successful ``openai_batch_pipeline`` run updates; schedule downstream DAGs on it.

Each event's ``extra`` says what landed: ``results_csv``, ``results_parquet``, ``report_json``,
``input_csv``, ``run_id``, the counts (``rows``, ``answered``, ``failed``, ``invalid``) and ``summary``
(:func:`batchpipe.spend.run_summary`: model, tokens billed, actual and estimated cost, what was not spent).
"""

from __future__ import annotations

from airflow.sdk import Asset

RESULTS_ASSET = Asset(name="openai_batch_results", uri="openai-batch://results", group="openai_batch")

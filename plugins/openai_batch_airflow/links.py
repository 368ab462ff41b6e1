"""The "Batch report" extra link: from ``merge`` and ``wait_for_batch`` to the run's report tab
(:mod:`openai_batch_airflow.plugin`). Relative to Airflow's base URL (no leading slash), so it works under a
base URL path. Declared on the tasks, it is computed by the worker when the task ends."""

from __future__ import annotations

from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

#: The report tab's route in the UI (``dags/<dag>/runs/<run>/plugin/batch-report``).
REPORT_ROUTE = "batch-report"


def report_tab(dag_id: str, run_id: str) -> str:
    """The run's "Batch report" tab, relative to Airflow's base URL."""
    return f"dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/plugin/{REPORT_ROUTE}"


class BatchReportLink(BaseOperatorLink):
    """The run's "Batch report" tab: counts, cost, batches; the validation message when it failed."""

    name = "Batch report"

    def get_link(self, operator, *, ti_key) -> str:
        return report_tab(ti_key.dag_id, ti_key.run_id)

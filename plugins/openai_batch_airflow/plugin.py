"""The Airflow plugin of the OpenAI Batch pipeline (registered by the package's ``airflow.plugins`` entry
point, so any Airflow process with the package installed has it, whatever its plugins folder):

* the app of :mod:`openai_batch_airflow.ui`, mounted at ``<base URL>/openai-batch``;
* a **"Batch report"** tab on every DAG run (an external view, destination ``dag_run``; a run of another
  DAG says it has no report) and a **"Batch spend"** page in the Browse menu;
* the "Batch report" extra link on ``merge`` and ``wait_for_batch`` (:mod:`openai_batch_airflow.links`).

Links are relative (no leading slash): the browser resolves them against Airflow's base URL, so they work
under a base URL path too.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from openai_batch_airflow.links import REPORT_ROUTE
from openai_batch_airflow.ui import SPEND_ROUTE, URL_PREFIX, app

PREFIX = URL_PREFIX.strip("/")


class OpenAIBatchPlugin(AirflowPlugin):
    name = "openai_batch"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "OpenAI Batch report and spend"}]
    external_views = [
        {
            "name": "Batch report",
            "href": f"{PREFIX}/report/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": REPORT_ROUTE,
        },
        {
            "name": "Batch spend",
            "href": f"{PREFIX}/spend",
            "destination": "nav",
            "url_route": SPEND_ROUTE,
            "category": "browse",
        },
    ]

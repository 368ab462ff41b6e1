"""
# Downstream of the OpenAI Batch pipeline

An example of a DAG **scheduled on the results Asset**: it runs after every successful
`openai_batch_pipeline` (or inbox) run, with the paths and counts of what landed in the asset
event's `extra`. Replace `summarise` with what your team does next (load into a warehouse, ...).
`results_csv` is a local path or, when the run's `output_dir` is in object storage, a URL such as
`s3://conn@bucket/.../results.csv`: `airflow.sdk.ObjectStoragePath(results_csv).open()` reads both.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from openai_batch_airflow.assets import RESULTS_ASSET


@dag(
    dag_id="openai_batch_results_consumer",
    schedule=[RESULTS_ASSET],
    catchup=False,
    doc_md=__doc__,
    tags=["openai", "batch", "example"],
)
def openai_batch_results_consumer():
    @task
    def summarise(triggering_asset_events=None) -> list[str]:
        landed = []
        for event in (triggering_asset_events or {}).get(RESULTS_ASSET, []):
            extra = event.extra or {}
            print(
                f"results landed: {extra.get('results_csv')} — {extra.get('answered')} answered, "
                f"{extra.get('failed')} failed, {extra.get('invalid')} invalid (run {extra.get('run_id')})"
            )
            landed.append(extra.get("results_csv"))
        return landed

    summarise()


openai_batch_results_consumer()

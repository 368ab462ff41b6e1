"""The package as an Airflow provider (entry point ``apache_airflow_provider``): it registers the connection
types of the batch APIs, so the UI's connection form offers them with their fields.

``openai`` comes from apache-airflow-providers-openai; this adds ``azure_openai_batch``
(:class:`~openai_batch_airflow.hooks.AzureOpenAIBatchHook`) and ``anthropic``
(:class:`~openai_batch_airflow.anthropic_batches.AnthropicBatchHook`). Nothing is imported here: Airflow
imports the hooks when it needs their forms.
"""

from __future__ import annotations


def get_provider_info() -> dict:
    return {
        "package-name": "openai-batch-pipeline",
        "name": "OpenAI Batch pipeline",
        "description": "Batch APIs (OpenAI, Azure OpenAI, Anthropic Message Batches) for the CSV pipeline.",
        "connection-types": [
            {
                "connection-type": "azure_openai_batch",
                "hook-class-name": "openai_batch_airflow.hooks.AzureOpenAIBatchHook",
                "hook-name": "Azure OpenAI (Batch)",
            },
            {
                "connection-type": "anthropic",
                "hook-class-name": "openai_batch_airflow.anthropic_batches.AnthropicBatchHook",
                "hook-name": "Anthropic (Message Batches)",
            },
        ],
    }

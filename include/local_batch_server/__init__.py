"""A local OpenAI-compatible Batch API server (Files + Batches) for demos and tests.

Run it with ``python -m local_batch_server --port 8765 --data-dir DIR [--config cfg.json]`` or, in
tests, with :func:`local_batch_server.testing.running_server`. The real ``openai`` client works
against ``http://127.0.0.1:PORT/v1`` unchanged.

* Endpoints: ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``POST/GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``,
  ``GET /v1/models``, ``GET /v1/models/{model}`` (the ``models`` config: the shipped price table's
  models by default, ``null`` = any name; forwarded to the upstream when one is set); admin:
  ``GET/PUT /_admin/config``, ``POST /_admin/reset``.
* Auth: ``api_key`` guards ``/v1``; ``/_admin`` is open only on a server with no ``api_key`` and no
  upstream, else it needs the admin token (``--admin-token``), and the upstream and keys stay as
  started unless ``--allow-upstream-change``: :class:`local_batch_server.config.AdminPolicy`.
* Every object answered is valid under OpenAI's published OpenAPI spec (``tests/test_server_contract.py``).
* Answers are deterministic; their exact formats are documented in :mod:`local_batch_server.answers`;
  their usage counts tokens as the pipeline's estimate does (:mod:`batchpipe.tokens`).
* Failure injection, timings and limits: :class:`local_batch_server.config.ServerConfig`.
* Batch life cycle and files: :mod:`local_batch_server.app`.
"""

from .config import AdminPolicy, FailValidation, HttpFault, ServerConfig

__all__ = ["AdminPolicy", "FailValidation", "HttpFault", "ServerConfig", "create_app"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)

"""``python -m local_batch_server`` / ``local-batch-server``: run the local batch server.

/_admin (GET/PUT /_admin/config, POST /_admin/reset) is open only on a server with no api_key and
no upstream (the plain offline test server). Once either is configured, /_admin needs
'Authorization: Bearer <admin token>' and is refused (403) when no admin token was given. The admin
token comes from --admin-token, else the LOCAL_BATCH_SERVER_ADMIN_TOKEN environment variable, else
"admin_token" in the --config file (prefer the variable or the file: a flag shows in `ps`).
api_key, upstream_base_url and upstream_api_key keep their start-up values unless the server runs
with --allow-upstream-change (or "allow_upstream_change": true in the config file), which needs an
admin token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import uvicorn

from .app import create_app
from .config import ADMIN_TOKEN_ENV, START_ONLY_FIELDS, AdminPolicy, ServerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="local-batch-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data-dir", default="var/local_batch_server", help="where files are stored")
    parser.add_argument("--config", help="JSON file with the server config (see local_batch_server.config)")
    parser.add_argument(
        "--admin-token",
        help=f"token for /_admin (16+ printable ASCII characters, no spaces); overrides {ADMIN_TOKEN_ENV}",
    )
    parser.add_argument(
        "--allow-upstream-change",
        action="store_true",
        help="let PUT /_admin/config change api_key, upstream_base_url, upstream_api_key "
        "(needs an admin token)",
    )
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[ServerConfig, AdminPolicy]:
    """The server config and the admin policy from the ``--config`` file, the flags and ``environ``
    (admin token: flag, else ``LOCAL_BATCH_SERVER_ADMIN_TOKEN`` if not empty, else the file).
    Raises ``OSError`` / ``ValueError`` with a readable message."""
    data = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    if not isinstance(data, dict):
        raise ValueError("the config file must hold a JSON object")
    policy = {name: data.pop(name) for name in START_ONLY_FIELDS if name in data}
    if args.admin_token is not None:
        policy["admin_token"] = args.admin_token
    elif environ.get(ADMIN_TOKEN_ENV):
        policy["admin_token"] = environ[ADMIN_TOKEN_ENV]
    if args.allow_upstream_change:
        policy["allow_upstream_change"] = True
    return ServerConfig.model_validate(data), AdminPolicy.model_validate(policy)


async def serve(args: argparse.Namespace, config: ServerConfig, policy: AdminPolicy) -> None:
    app = create_app(args.data_dir, config, policy)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        print(f"local batch server listening on http://{args.host}:{args.port}/v1", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, policy = load_settings(args, os.environ)
    except (OSError, ValueError) as exc:
        where = f"bad config {args.config}: " if args.config else ""
        print(f"local-batch-server: {where}{short(exc)}", file=sys.stderr)
        return 2
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(serve(args, config, policy))
    except KeyboardInterrupt:
        pass
    return 0


def short(exc: Exception) -> str:
    """One line: a pydantic error becomes ``field: message`` (the input value, maybe a secret, left out)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc") or ())
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m local_batch_server`` / ``local-batch-server``: run the local batch server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .config import ServerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="local-batch-server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data-dir", default="var/local_batch_server", help="where files are stored")
    parser.add_argument("--config", help="JSON file with the server config (see local_batch_server.config)")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def load_config(path: str | None) -> ServerConfig:
    if not path:
        return ServerConfig()
    return ServerConfig.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


async def serve(args: argparse.Namespace, config: ServerConfig) -> None:
    app = create_app(args.data_dir, config)
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
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"local-batch-server: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(serve(args, config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

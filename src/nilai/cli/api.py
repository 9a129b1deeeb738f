"""``nilai api``: run the gateway alone, configured from the environment."""

from __future__ import annotations

import argparse
import os
from typing import Any

import uvicorn

from nilai.cli.common import load_settings
from nilai.logging import configure_logging


def register(commands: Any) -> None:
    """Add the ``api`` subcommand."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "api", help="run the gateway (settings from NILAI_* variables)"
    )
    parser.add_argument("--host", help="bind address (default: NILAI_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: NILAI_PORT or 8080)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start uvicorn with the app factory."""
    overrides = {"host": args.host, "port": args.port}
    for name, value in overrides.items():
        if value is not None:
            # Worker processes rebuild the settings from the environment.
            os.environ[f"NILAI_{name.upper()}"] = str(value)
    settings = load_settings("api")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "nilai.gateway.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0

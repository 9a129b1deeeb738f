"""``nilai api``: run the gateway alone, configured from the environment."""

from __future__ import annotations

import argparse
import os
from typing import Any

from nilai.cli.common import load_settings
from nilai.gateway.server import run_server
from nilai.logging import configure_logging

APP_FACTORY = "nilai.gateway.app:create_app_from_env"


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
    """Serve the app factory (in each of ``--workers`` processes) with the connection limits."""
    overrides = {"host": args.host, "port": args.port}
    for name, value in overrides.items():
        if value is not None:
            # Worker processes rebuild the settings from the environment.
            os.environ[f"NILAI_{name.upper()}"] = str(value)
    settings = load_settings("api")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    run_server(APP_FACTORY, settings, workers=args.workers)
    return 0

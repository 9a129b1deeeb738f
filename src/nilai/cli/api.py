"""``nilai api``: run the gateway alone, configured from the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from nilai.cli.common import load_settings
from nilai.gateway.lifespan import StartupError, load_signing_key, open_store_at_startup
from nilai.gateway.server import run_server
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings

APP_FACTORY = "nilai.gateway.app:create_app_from_env"

logger = logging.getLogger(__name__)


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
    _warn_if_no_way_in(settings)
    if args.workers > 1:
        # uvicorn's supervisor stops when a worker fails to start, but exits with status 0
        # and prints the failure once per worker: check what every worker needs first.
        try:
            asyncio.run(_check_startup(settings))
        except StartupError as exc:
            logger.error("cannot start: %s", exc)  # noqa: TRY400 (traceback at debug only)
            logger.debug("start-up failure", exc_info=True)
            return 1
    run_server(APP_FACTORY, settings, workers=args.workers)
    return 0


def _warn_if_no_way_in(settings: NilaiSettings) -> None:
    """Warn when only keys stored in the database can get in: a fresh gateway answers 401.

    Stored keys are a way in, but nothing the gateway can see at start-up says one exists, so
    the warning names that route rather than refusing to start.
    """
    static = settings.static_api_keys or settings.api_key_hashes
    if "nuc" in settings.auth_strategies or (static and "api_key" in settings.auth_strategies):
        return
    logger.warning(
        "no API key is configured (NILAI_API_KEY, NILAI_API_KEYS, NILAI_API_KEY_HASHES) and "
        "NILAI_AUTH_STRATEGIES has no nuc: only keys stored with `nilai keys create ACCOUNT` "
        "are accepted, every other request gets 401"
    )


async def _check_startup(settings: NilaiSettings) -> None:
    """Open the database (migrating it once, not in every worker) and read the signing key."""
    store = await open_store_at_startup(settings)
    await store.aclose()
    await asyncio.to_thread(load_signing_key, settings)

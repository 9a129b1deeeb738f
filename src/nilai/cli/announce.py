"""``nilai announce``: keep an OpenAI-compatible server registered in shared discovery."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from nilai.cli.common import fail, load_settings
from nilai.discovery.announcer import Announcer, ModelOverrides
from nilai.discovery.redis import RedisDiscovery
from nilai.logging import configure_logging
from nilai.protocol.models import RESPONSES_FEATURE
from nilai.settings import NilaiSettings
from nilai.state.redis import make_redis
from nilai.upstream.http import make_http_client


def register(commands: Any) -> None:
    """Add the ``announce`` subcommand."""
    # Any: argparse's subparsers action type is private.
    parser: argparse.ArgumentParser = commands.add_parser(
        "announce", help="register a model server in discovery (needs NILAI_REDIS_URL)"
    )
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://h:8000")
    parser.add_argument(
        "--ttl", type=float, help="lease seconds (default: NILAI_DISCOVERY_TTL_S, 15)"
    )
    parser.add_argument(
        "--tool-support",
        action="store_true",
        default=None,
        help="list the models as supporting tool calls "
        "(default: as its /v1/models says; off if it is silent)",
    )
    parser.add_argument(
        "--multimodal",
        action="store_true",
        default=None,
        help="list the models as accepting images "
        "(default: as its /v1/models says; off if it is silent)",
    )
    parser.add_argument(
        "--responses",
        action="store_true",
        help="list the models as served by the server's POST /v1/responses (vLLM serves it)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="context length in tokens (default: as its /v1/models says)",
    )
    parser.add_argument(
        "--description",
        help="text shown in /v1/models (default: as its /v1/models says, else empty)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Announce until SIGTERM or SIGINT, then withdraw."""
    if not str(args.url).startswith(("http://", "https://")):
        return fail("announce", f"--url must start with http:// or https:// (got {args.url!r})")
    settings = load_settings("announce")
    if settings is None:
        return 2
    if settings.redis_url is None:
        return fail(
            "announce",
            "NILAI_REDIS_URL is not set. Gateways without Redis keep discovery in-process; "
            "list the server in NILAI_UPSTREAM_URLS for them instead.",
        )
    configure_logging(settings.log_level, settings.log_format)
    overrides = ModelOverrides(
        tool_support=args.tool_support,
        multimodal_support=args.multimodal,
        max_model_len=args.max_model_len,
        description=args.description,
        features=(RESPONSES_FEATURE,) if args.responses else (),
    )
    asyncio.run(_announce(settings, str(args.url), args.ttl or settings.discovery_ttl_s, overrides))
    return 0


async def _announce(
    settings: NilaiSettings, url: str, ttl_s: float, overrides: ModelOverrides
) -> None:
    redis = make_redis(settings)
    assert redis is not None  # noqa: S101 - checked by the caller
    http = make_http_client(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        discovery = RedisDiscovery(redis, settings.redis_prefix)
        await Announcer(discovery, http, url, ttl_s=ttl_s, overrides=overrides).run(stop)
    finally:
        await http.aclose()
        await redis.aclose()

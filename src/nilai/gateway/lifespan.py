"""The composition root: build the services from the settings, and close them in order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from redis.asyncio import Redis

from nilai.auth.api_keys import StaticApiKeys
from nilai.crypto.keys import load_or_create_key
from nilai.discovery.announcer import Announcer
from nilai.discovery.base import Discovery
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.redis import RedisDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.gateway.chat.service import ChatService
from nilai.gateway.services import Services
from nilai.settings import NilaiSettings
from nilai.upstream.http import make_http_client

logger = logging.getLogger(__name__)


def make_redis(settings: NilaiSettings) -> Redis | None:
    """The shared Redis client, or None for in-process state. Connects lazily."""
    if settings.redis_url is None:
        return None
    return Redis.from_url(  # pyright: ignore[reportUnknownMemberType]
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=30,
    )


def make_authenticator(settings: NilaiSettings) -> StaticApiKeys:
    """The authenticator for the configured strategies; refuses ones this build lacks."""
    missing = [name for name in settings.auth_strategies if name != "api_key"]
    if missing:
        raise ValueError(
            f"NILAI_AUTH_STRATEGIES names {', '.join(missing)}, which this gateway does not "
            "support yet; use api_key"
        )
    return StaticApiKeys(settings.static_api_keys, settings.api_key_hashes)


@asynccontextmanager
async def build_services(settings: NilaiSettings) -> AsyncGenerator[Services]:
    """Create every service, start background tasks, and tear them down on exit."""
    async with AsyncExitStack() as stack:
        http = make_http_client(settings)
        stack.push_async_callback(http.aclose)
        redis = make_redis(settings)
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        discovery: Discovery = (
            RedisDiscovery(redis, settings.redis_prefix) if redis else MemoryDiscovery()
        )
        signer = await asyncio.to_thread(load_or_create_key, settings.key_path)
        await _start_static_upstreams(stack, settings, discovery, http)
        snapshot = DiscoverySnapshot(
            discovery,
            http,
            refresh_s=settings.discovery_refresh_s,
            eject_s=settings.endpoint_eject_s,
        )
        await snapshot.start()
        stack.push_async_callback(snapshot.aclose)
        authenticator = make_authenticator(settings)
        if not len(authenticator):
            logger.warning("no API keys configured (NILAI_API_KEY): every chat request gets 401")
        chat = ChatService(http, snapshot, signer, request_timeout_s=settings.request_timeout_s)
        yield Services(
            settings=settings,
            started_at=time.monotonic(),
            http=http,
            redis=redis,
            discovery=discovery,
            snapshot=snapshot,
            signer=signer,
            authenticator=authenticator,
            chat=chat,
        )


async def _start_static_upstreams(
    stack: AsyncExitStack, settings: NilaiSettings, discovery: Discovery, http: httpx.AsyncClient
) -> None:
    """Announce ``NILAI_UPSTREAM_URLS`` from inside the gateway, as `nilai announce` would."""
    if not settings.upstream_urls:
        return
    stop = asyncio.Event()
    announcers = [
        Announcer(discovery, http, url, ttl_s=settings.discovery_ttl_s)
        for url in settings.upstream_urls
    ]
    await asyncio.gather(*(announcer.tick() for announcer in announcers), return_exceptions=True)
    tasks = [asyncio.create_task(announcer.run(stop)) for announcer in announcers]

    async def _stop() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(_stop)

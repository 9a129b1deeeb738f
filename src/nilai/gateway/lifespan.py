"""The composition root: build the services from the settings, and close them in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from nilai.attestation.factory import close_attestation_provider, make_attestation_provider
from nilai.auth.strategies import make_authenticator
from nilai.crypto.keys import load_or_create_key
from nilai.discovery.announcer import Announcer
from nilai.discovery.base import Discovery
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.redis import RedisDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.gateway.chat.service import ChatService
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.gateway.readiness import SharedChecks
from nilai.gateway.services import Services
from nilai.limits.base import ConcurrencyLimiter, RateLimiter
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.limits.redis import RedisConcurrencyLimiter, RedisRateLimiter
from nilai.settings import NilaiSettings
from nilai.store.migrate import current_revision, head_revision, upgrade
from nilai.store.sql import SqlStore, make_engine
from nilai.upstream.http import make_http_client
from nilai.usage.sink import UsageSink

logger = logging.getLogger(__name__)


REDIS_HEALTH_CHECK_S = 1.0
"""A pooled Redis connection idle for longer is PINGed before its next command."""


def make_redis(settings: NilaiSettings) -> Redis | None:
    """The shared Redis client, or None for in-process state. Connects lazily.

    After Redis restarts (or fails over), every pooled connection is dead. One whose socket
    saw the server close is replaced when it is taken from the pool; one that cannot know (the
    server vanished without closing it) is PINGed first if it has been idle for a second, and a
    failed PING is answered by a new connection before the command is sent. A command that still
    meets a dead socket is sent once more on a new connection: it never reached a live server.

    Only connection errors are retried, never timeouts, because a command that timed out may
    have run: the rate-limit script counts a request's sliding windows by its unique id (a
    second run adds nothing) but lifetime and token-use totals with INCR. A connection error
    hides a command that ran only if the connection breaks between the server running it and
    the reply arriving, and the retry reaches a server that kept that run: at worst one request
    is counted twice in a lifetime total.
    """
    if settings.redis_url is None:
        return None
    # A blocking pool: when every connection is busy (a burst of streams releasing their
    # slots at once), a command waits up to 2 s for one instead of failing at once.
    pool = BlockingConnectionPool.from_url(  # pyright: ignore[reportUnknownMemberType]
        settings.redis_url.get_secret_value(),
        max_connections=settings.redis_max_connections,
        timeout=2.0,
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
        health_check_interval=REDIS_HEALTH_CHECK_S,
        retry=Retry(
            ExponentialBackoff(cap=0.1, base=0.01),
            retries=1,
            supported_errors=(RedisConnectionError,),
        ),
    )
    return Redis.from_pool(pool)


def make_admission(settings: NilaiSettings, redis: Redis | None) -> Admission:
    """Limits in Redis when configured (shared by replicas), else in this process."""
    defaults = LimitDefaults(
        minute=settings.rate_limit_minute or None,
        hour=settings.rate_limit_hour or None,
        day=settings.rate_limit_day or None,
        lifetime=settings.rate_limit_lifetime or None,
        model_concurrency=settings.model_concurrency,
        model_concurrency_overrides=tuple(settings.concurrency_overrides.items()),
        web_search_rps=settings.web_search_rps or None,
        web_search_minute=settings.web_search_rate_limit_minute or None,
        web_search_hour=settings.web_search_rate_limit_hour or None,
        web_search_day=settings.web_search_rate_limit_day or None,
        token_uses_max_s=settings.nuc_max_lifetime_s,
        attestation_minute=settings.attestation_rate_limit_minute or None,
    )
    rate: RateLimiter
    concurrency: ConcurrencyLimiter
    if redis is None:
        rate, concurrency = MemoryRateLimiter(), MemoryConcurrencyLimiter()
    else:
        prefix = settings.redis_prefix
        rate = RedisRateLimiter(redis, prefix)
        ttl = settings.concurrency_lease_ttl_s
        concurrency = RedisConcurrencyLimiter(redis, prefix, ttl_s=ttl)
    return Admission(rate, concurrency, defaults, fail_open=settings.rate_limit_fail_open)


async def open_store(settings: NilaiSettings) -> SqlStore:
    """Connect to the database and make sure its schema is current."""
    url = settings.db_url
    database = make_url(url).database
    if url.startswith("sqlite") and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(url)
    try:
        if settings.db_auto_migrate:
            await upgrade(engine)
        else:
            await _require_current_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    return SqlStore(engine)


async def _require_current_schema(engine: AsyncEngine) -> None:
    if await current_revision(engine) != head_revision():
        raise RuntimeError(
            "the database schema is not current: run `nilai db upgrade` "
            "(or set NILAI_DB_AUTO_MIGRATE=true)"
        )


@asynccontextmanager
async def build_services(settings: NilaiSettings, metrics: Metrics) -> AsyncGenerator[Services]:
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
        attestation = make_attestation_provider(
            settings.attestation_provider,
            signer=signer,
            http=http,
            url=settings.attestation_url,
            tsm_path=settings.attestation_tsm_path,
            timeout_s=settings.attestation_timeout_s,
        )
        stack.push_async_callback(close_attestation_provider, attestation)
        store = await open_store(settings)
        stack.push_async_callback(store.aclose)
        sink = UsageSink(
            store,
            capacity=settings.usage_queue_capacity,
            batch_size=settings.usage_batch_size,
            interval_s=settings.usage_flush_interval_s,
        )
        await sink.start()
        metrics.watch_usage_queue(sink)
        stack.push_async_callback(sink.aclose)
        await _start_static_upstreams(stack, settings, discovery, http)
        snapshot = DiscoverySnapshot(
            discovery,
            http,
            refresh_s=settings.discovery_refresh_s,
            eject_s=settings.endpoint_eject_s,
            grace_s=settings.discovery_grace_s,
            probe_s=settings.endpoint_probe_s,
        )
        await snapshot.start()
        stack.push_async_callback(snapshot.aclose)
        pings = {"database": store.ping}
        if redis is not None:
            pings["redis"] = discovery.ping
        readiness = SharedChecks(pings)
        stack.push_async_callback(readiness.aclose)
        authenticator = make_authenticator(settings, store, signer.public_key_bytes, redis=redis)
        admission = make_admission(settings, redis)
        stack.push_async_callback(admission.aclose)
        drain = Drain(settings.shutdown_grace_s)
        drain.install_signal_handlers()
        stack.callback(drain.restore_signal_handlers)
        chat = ChatService(
            http,
            snapshot,
            signer,
            sink,
            admission,
            metrics=metrics,
            drain=drain,
            request_timeout_s=settings.request_timeout_s,
            first_byte_timeout_s=settings.stream_first_byte_timeout_s,
            idle_timeout_s=settings.stream_idle_timeout_s,
        )
        # Start-up objects (modules, settings, clients) live as long as the process: moving them
        # out of the collector's reach keeps full collections short under load.
        gc.collect()
        gc.freeze()
        yield Services(
            settings=settings,
            started_at=time.monotonic(),
            http=http,
            redis=redis,
            discovery=discovery,
            snapshot=snapshot,
            signer=signer,
            authenticator=authenticator,
            store=store,
            usage_sink=sink,
            chat=chat,
            attestation=attestation,
            admission=admission,
            metrics=metrics,
            drain=drain,
            readiness=readiness,
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

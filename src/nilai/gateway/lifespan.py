"""The composition root: build the services from the settings, and close them in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from alembic.util import CommandError
from redis.asyncio import Redis
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from nilai.attestation.factory import close_attestation_provider, make_attestation_provider
from nilai.auth.strategies import make_authenticator
from nilai.billing.credit import CreditService, HttpCreditService
from nilai.billing.meter import CreditMeter
from nilai.billing.prices import PriceBook
from nilai.context.rag.setup import make_nilrag
from nilai.context.search.setup import make_web_search
from nilai.context.setup import make_private_prompts
from nilai.crypto.keys import Signer, load_or_create_key
from nilai.discovery.announcer import Announcer
from nilai.discovery.base import Discovery
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.redis import RedisDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.gateway.chat.service import ChatService
from nilai.gateway.drain import Drain
from nilai.gateway.metrics import Metrics
from nilai.gateway.readiness import SharedChecks
from nilai.gateway.responses.service import ResponsesService
from nilai.gateway.services import Services
from nilai.limits.base import ConcurrencyLimiter, RateLimiter
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.limits.redis import RedisConcurrencyLimiter, RedisRateLimiter
from nilai.outages import mask_url
from nilai.settings import NilaiSettings
from nilai.startup import StartupError
from nilai.state.redis import make_redis
from nilai.store.open import open_store
from nilai.store.sql import SqlStore
from nilai.tools.setup import make_server_tools
from nilai.upstream.client import open_upstream
from nilai.upstream.http import make_http_client
from nilai.usage.sink import UsageSink

logger = logging.getLogger(__name__)


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
        web_search_lifetime=settings.web_search_rate_limit_lifetime or None,
        token_uses_max_s=settings.nuc_max_lifetime_s,
        attestation_minute=settings.attestation_rate_limit_minute or None,
    )
    rate: RateLimiter
    concurrency: ConcurrencyLimiter
    if redis is None:
        memory = MemoryRateLimiter()
        rate, concurrency = memory, MemoryConcurrencyLimiter(memory)
    else:
        prefix = settings.redis_prefix
        rate = RedisRateLimiter(redis, prefix)
        ttl = settings.concurrency_lease_ttl_s
        concurrency = RedisConcurrencyLimiter(redis, prefix, ttl_s=ttl)
    return Admission(rate, concurrency, defaults, fail_open=settings.rate_limit_fail_open)


# What opening the database raises when the URL, the server or the schema is wrong.
# ImportError: a URL naming a driver nilai does not install (``postgresql+psycopg://``).
_DATABASE_ERRORS = (SQLAlchemyError, OSError, ImportError, CommandError)


async def open_store_at_startup(settings: NilaiSettings) -> SqlStore:
    """``open_store``, its failures said as a ``StartupError`` naming ``NILAI_DATABASE_URL``.

    The URL is shown with its password masked: an operator with several databases needs to
    see which one the gateway tried.
    """
    shown = mask_url(settings.db_url)
    try:
        return await open_store(settings)
    except StartupError:
        raise
    except (ArgumentError, ImportError) as exc:
        raise StartupError(
            f"NILAI_DATABASE_URL={shown} cannot be used ({_first_line(exc)}): write "
            "postgresql+asyncpg://USER:PASSWORD@HOST:5432/DATABASE or "
            "sqlite+aiosqlite:///PATH/nilai.db"
        ) from exc
    except _DATABASE_ERRORS as exc:
        raise StartupError(
            f"cannot open the database NILAI_DATABASE_URL={shown}: {_first_line(exc)}; "
            "check that it is running and reachable, that the database exists (createdb), "
            "and the URL"
        ) from exc


def load_signing_key(settings: NilaiSettings) -> Signer:
    """The signing key (created if missing), or ``StartupError`` naming where it is read from."""
    path = settings.key_path
    try:
        return load_or_create_key(path)
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"cannot read the signing key {path} (NILAI_SIGNING_KEY_PATH, default in "
            f"NILAI_DATA_DIR): {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, without SQLAlchemy's ``(module.Error)`` tag."""
    lines = str(exc).strip().splitlines()
    text = _DBAPI_TAG.sub("", lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_DBAPI_TAG = re.compile(r"^\([\w.]+\)\s*")


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
        signer = await asyncio.to_thread(load_signing_key, settings)
        attestation = make_attestation_provider(
            settings.attestation_provider,
            signer=signer,
            http=http,
            url=settings.attestation_url,
            tsm_path=settings.attestation_tsm_path,
            timeout_s=settings.attestation_timeout_s,
            collateral_path=settings.attestation_collateral,
            pccs_url=settings.attestation_pccs_url,
        )
        stack.push_async_callback(close_attestation_provider, attestation)
        store = await open_store_at_startup(settings)
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
        prices = await open_price_book(settings, store, stack)
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
        credit = make_credit(settings, http, stack, metrics)
        authenticator = make_authenticator(
            settings, store, signer.public_key_bytes, redis=redis, credit=credit
        )
        admission = make_admission(settings, redis)
        stack.push_async_callback(admission.aclose)
        drain = Drain(settings.shutdown_grace_s)
        drain.install_signal_handlers()
        stack.callback(drain.restore_signal_handlers)
        upstream = await open_upstream(
            max_connections=settings.upstream_max_connections,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
        )
        stack.push_async_callback(upstream.aclose)
        private_prompts = make_private_prompts(settings, http)
        web_search = await make_web_search(settings, http, admission, stack)
        # In a thread: the sandbox probes this machine once (it runs a tiny program).
        tools = await asyncio.to_thread(make_server_tools, settings)
        # In a thread: loading the embedding model takes seconds.
        retriever = await asyncio.to_thread(make_nilrag, settings, http)
        if retriever is not None:
            stack.push_async_callback(retriever.aclose)
        if tools is not None:
            stack.push_async_callback(tools.aclose)
        # Chat completions and the Responses API share every stage and its services.
        pipeline: dict[str, Any] = {
            "tools": tools,
            "retriever": retriever,
            "tool_max_rounds": settings.tool_max_rounds,
            "metrics": metrics,
            "drain": drain,
            "request_timeout_s": settings.request_timeout_s,
            "first_byte_timeout_s": settings.stream_first_byte_timeout_s,
            "idle_timeout_s": settings.stream_idle_timeout_s,
            "prompts": private_prompts.vault,
            "web_search": web_search,
            "prices": prices,
            "meter": None if credit is None else credit[1],
            "default_max_tokens": settings.credit_default_max_tokens,
            "max_searches": settings.web_search_max_topics,
        }
        chat = ChatService(upstream, snapshot, signer, sink, admission, **pipeline)
        responses = ResponsesService(upstream, snapshot, signer, sink, admission, **pipeline)
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
            prices=prices,
            chat=chat,
            responses=responses,
            tools=tools,
            attestation=attestation,
            admission=admission,
            metrics=metrics,
            drain=drain,
            readiness=readiness,
            delegations=private_prompts.delegations,
        )


def make_credit(
    settings: NilaiSettings, http: httpx.AsyncClient, stack: AsyncExitStack, metrics: Metrics
) -> tuple[CreditService, CreditMeter] | None:
    """The credit service and its (started) meter when ``NILAI_CREDIT_URL`` is set, else None.

    The meter is closed before the HTTP client (``stack`` is LIFO) and after the server has
    drained its requests: the last requests' unlocks are made on the way out.
    """
    if not settings.credit_url or settings.credit_api_token is None:
        return None
    service = HttpCreditService(
        http, settings.credit_url, settings.credit_api_token, timeout_s=settings.credit_timeout_s
    )
    meter = CreditMeter(
        service,
        retry_after_s=settings.credit_retry_after_s,
        fail_open=settings.credit_fail_open,
        where=mask_url(settings.credit_url),
    )
    meter.start()
    stack.push_async_callback(meter.aclose, settings.credit_unlock_grace_s)
    metrics.watch_credit_meter(meter)
    return service, meter


async def open_price_book(
    settings: NilaiSettings, store: SqlStore, stack: AsyncExitStack
) -> PriceBook:
    """The models' prices, read now and then refreshed in the background until ``stack`` closes.

    Read before the first request, so that it is charged the stored price, not the default.
    """
    prices = PriceBook(store, settings.default_price, refresh_s=settings.price_refresh_s)
    await prices.refresh()
    prices.start()
    stack.push_async_callback(prices.aclose)
    return prices


async def _start_static_upstreams(
    stack: AsyncExitStack, settings: NilaiSettings, discovery: Discovery, http: httpx.AsyncClient
) -> None:
    """Announce ``NILAI_UPSTREAM_URLS`` from inside the gateway, as `nilai announce` would."""
    if not settings.upstream_urls:
        return
    stop = asyncio.Event()
    announcers = [
        # Every replica announces the same URLs under the same ids: a stopping replica leaves
        # them to their lease rather than withdraw what the others still serve.
        Announcer(discovery, http, url, ttl_s=settings.discovery_ttl_s, withdraw_on_stop=False)
        for url in settings.upstream_urls
    ]
    await asyncio.gather(*(announcer.tick() for announcer in announcers), return_exceptions=True)
    tasks = [asyncio.create_task(announcer.run(stop)) for announcer in announcers]

    async def _stop() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(_stop)

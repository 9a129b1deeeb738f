"""The shared Redis client used by the gateway, the workers and the CLI."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from nilai.settings import NilaiSettings

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


def redis_location(redis: Redis) -> str:
    """``redis``'s address as a URL with the password masked: ``redis://:***@host:6379/0``.

    Outage lines name the Redis they could not reach; the operator may run several.
    """
    # Any: redis-py types its connection keyword arguments loosely.
    options: dict[str, Any] = redis.connection_pool.connection_kwargs
    user = options.get("username") or ""
    credentials = f"{user}:***@" if options.get("password") else (f"{user}@" if user else "")
    database = options.get("db", 0)
    if options.get("path"):
        return f"unix://{credentials}{options['path']}?db={database}"
    tls = issubclass(redis.connection_pool.connection_class, SSLConnection)
    address = f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    return f"{'rediss' if tls else 'redis'}://{credentials}{address}/{database}"

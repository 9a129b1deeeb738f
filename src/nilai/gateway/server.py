"""The HTTP server the gateway runs in: uvicorn, with limits on what one client connection holds.

uvicorn's httptools protocol has no limit on header size (the parser buffers a header of any
length, copying it on every read), no header or body read timeout, no timer on a connection
that never sends a request, and its ``limit_concurrency`` answers 503 only once a request's
headers are complete, so it cannot stop connections that never complete them.
``LimitedHttpProtocol`` adds what is missing, per connection, ahead of the parser:

- The request line and headers may take ``max_header_bytes``: the parser is never fed more, and
  the client gets 431. The connection then lingers for a moment, discarding what the client
  still sends, so the client reads the answer rather than a reset.
- The headers must arrive within ``header_read_timeout_s`` (from connecting or from the
  request's first byte), the body within ``body_read_timeout_s`` after the headers: then 408
  and the connection closes. Both are deadlines for the whole, not gaps between reads, so a
  client that trickles a byte at a time is cut off too. (When the deadline finds the app
  behind, with unread body buffered and reading paused, the client is not at fault: the body
  deadline is pushed back.)
- An idle keep-alive connection closes after ``keepalive_timeout_s``.
- A process holds at most ``max_connections`` client connections. At the cap, the connection
  idle for longest (no request in progress for ``RECLAIM_IDLE_AFTER_S``) is closed to make room,
  as nginx reuses keep-alive connections. If none is idle, a small reserve of connections may
  still ask for liveness (``/healthz``: the kubelet must not restart a replica that is busy,
  which would cut every open stream); any other request on them gets 503 with ``Retry-After``
  (``/readyz`` included, so a readiness probe takes a saturated replica out of rotation).
  Beyond the reserve new connections are closed at once.

Refusals are logged at most once a minute, as counts, so an attack cannot flood the log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import resource
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, cast, override

import httptools
import orjson
import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from nilai.errors import (
    NilaiError,
    RequestHeadersTooLarge,
    RequestTimeout,
    TooManyConnections,
    to_error_body,
)
from nilai.settings import NilaiSettings

logger = logging.getLogger(__name__)

LIVENESS_PATHS = frozenset({b"/healthz", b"/v1/healthz", b"/v1/health"})
OVERFLOW_CONNECTIONS = 32
"""Connections accepted beyond the cap, only to answer a liveness probe or a 503."""
OVERFLOW_HEADER_TIMEOUT_S = 2.0
"""Probes send their request at once; an overflow connection that dawdles is not one."""
RECLAIM_IDLE_AFTER_S = 1.0
"""At the cap, only a connection idle this long is closed for a new one: a client that just
connected, or just got its answer, is likely sending its request right now."""
LINGER_S = 2.0
LINGER_MAX_BYTES = 1024 * 1024
"""After a 431 or 503, how long and how much the server keeps discarding before it closes."""
FILE_DESCRIPTOR_HEADROOM = 256
"""Open files besides client and model-server connections: logs, database, Redis, the key."""
REPORT_EVERY_S = 60.0

type Phase = Literal["idle", "headers", "body", "busy", "linger"]
type Role = Literal["member", "overflow"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may hold, and how many a process keeps open."""

    max_header_bytes: int
    header_read_timeout_s: float
    body_read_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: NilaiSettings) -> ConnectionLimits:
        """The limits the operator configured (``NILAI_MAX_HEADER_BYTES`` and the rest)."""
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_read_timeout_s=settings.header_read_timeout_s,
            body_read_timeout_s=settings.body_read_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            max_connections=settings.max_connections,
        )


def run_server(app: ASGIApp | str, settings: NilaiSettings, *, workers: int = 1) -> None:
    """Serve ``app`` with uvicorn and the connection limits until SIGTERM or SIGINT.

    A string names an app factory (``module:function``), which ``workers`` > 1 needs: each
    worker process builds its own app, and gets the limits with uvicorn's configuration.
    """
    limits = ConnectionLimits.from_settings(settings)
    _raise_open_file_limit(settings)
    logger.info(
        "connection limits per process: %d connections, headers up to %d bytes within %gs, "
        "body within %gs, keep-alive %gs",
        limits.max_connections,
        limits.max_header_bytes,
        limits.header_read_timeout_s,
        limits.body_read_timeout_s,
        limits.keepalive_timeout_s,
    )
    if settings.forwarded_allow_ips:
        logger.info(
            "X-Forwarded-For and X-Forwarded-Proto trusted from: %s",
            ", ".join(settings.forwarded_allow_ips),
        )
    uvicorn.run(
        app,
        factory=isinstance(app, str),
        host=settings.host,
        port=settings.port,
        workers=workers,
        http=protocol_class(limits),
        # No route speaks WebSocket; an Upgrade request is served as plain HTTP.
        ws="none",
        log_config=None,
        access_log=False,
        # uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 (or from whatever its
        # FORWARDED_ALLOW_IPS variable says), so a proxy on loopback that passes the header
        # through lets any client pick the address /metrics checks. Only the proxies the
        # operator names are believed; with none, the peer address is the client.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips),
        # uvicorn's parameter is typed int; rounding up never cuts a request the app's own
        # shutdown drain (which uses the exact value) still lets finish.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )


def protocol_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The ``http`` option of uvicorn: ``LimitedHttpProtocol`` bound to ``limits``.

    A ``functools.partial`` of a module-level class pickles, so ``--workers`` processes (which
    uvicorn spawns with the pickled configuration) get the same limits.
    """
    bound = functools.partial(LimitedHttpProtocol, limits=limits)
    # uvicorn only ever calls it (with config, server_state, app_state) as it would a class.
    return cast("type[asyncio.Protocol]", bound)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, time and connection limits (module docstring).

    One timer per connection follows its phase: ``headers`` (reading a request's headers),
    ``body`` (reading its body), ``busy`` (the app answers; no timer: the app's own time limits
    apply), ``idle`` (keep-alive, between requests) and ``linger`` (answered, closing).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._table = _table_for(server_state, limits)
        self._role: Role | None = None
        self._phase: Phase = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._header_timeout_s = limits.header_read_timeout_s
        self._awaiting_headers = True
        self._header_bytes = 0
        self._headers_completed = 0
        self._lingered_bytes = 0

    # --- connection events -----------------------------------------------------------------

    @override
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._role = self._table.admit()
        if self._role is None:
            transport.close()
            return
        if self._role == "overflow":
            self._header_timeout_s = min(self._header_timeout_s, OVERFLOW_HEADER_TIMEOUT_S)
        self._mark_idle()
        self._arm(self._header_timeout_s, "headers")

    @override
    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        role, self._role = self._role, None
        self._table.release(self, role)
        super().connection_lost(exc)

    @override
    def data_received(self, data: bytes) -> None:
        if self._phase == "linger":
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        if self._role is None:
            return  # refused or reclaimed: closing
        if self._phase == "idle":
            # The first byte of the next request: its headers are on the clock from now.
            self._arm(self._header_timeout_s, "headers")
        while data:
            if not self._awaiting_headers:
                self._feed(data)
                return
            room = self._limits.max_header_bytes - self._header_bytes
            if len(data) <= room:
                self._header_bytes += len(data)
                self._feed(data)
                return
            # Feed only what the limit allows: if the headers do not end within it, the
            # parser never buffers (and copies) the rest.
            completed = self._headers_completed
            self._header_bytes += room
            self._feed(data[:room])
            if self.transport.is_closing() or self._lingering():
                return
            if self._headers_completed == completed:
                self._refuse_headers()
                return
            data = data[room:]

    def reclaim(self) -> None:
        """Close this idle connection: the cap is reached and its slot goes to a new one."""
        self._role = None
        self._table.leave_idle(self)
        self.transport.close()

    # --- parser callbacks ------------------------------------------------------------------

    @override
    def on_headers_complete(self) -> None:
        if self._phase == "linger":
            return
        self._awaiting_headers = False
        self._header_bytes = 0
        self._headers_completed += 1
        self._table.leave_idle(self)
        if self._role == "overflow" and not self._asks_for_liveness():
            self._table.report.note("requests refused at the connection cap (503)")
            self._respond_and_linger(
                TooManyConnections("The gateway has too many open connections; retry in a moment.")
            )
            return
        self._arm(self._limits.body_read_timeout_s, "body")
        super().on_headers_complete()
        if self._role == "overflow":
            self.cycle.keep_alive = False  # the reserve is for one probe at a time

    @override
    def on_body(self, body: bytes) -> None:
        if self._phase != "linger":
            super().on_body(body)

    @override
    def on_message_complete(self) -> None:
        if self._phase == "linger":
            return
        super().on_message_complete()
        self._awaiting_headers = True
        if self.cycle.response_complete:
            self._become_idle()  # answered before the body was in (a 413, a 404)
        else:
            self._set_phase("busy")

    @override
    def on_response_complete(self) -> None:
        super().on_response_complete()
        # This protocol keeps its own idle timer (the keep-alive one uvicorn just armed would
        # start only now, and not on a connection's first request).
        self._unset_keepalive_if_required()
        if self.transport.is_closing() or not self._awaiting_headers:
            return  # closing, or the request's body is still arriving (its timer runs on)
        cycle = self._current_cycle()
        if cycle is None or cycle.response_complete:  # no pipelined request started
            self._become_idle()

    # --- helpers ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        # As uvicorn's own data_received does.
        parser = self.parser
        if parser is None:  # the connection is gone
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()

    def _current_cycle(self) -> RequestResponseCycle | None:
        # uvicorn annotates ``cycle`` as always set; it is None until the first request.
        return self.cycle

    def _asks_for_liveness(self) -> bool:
        path = self.url.split(b"?", 1)[0]
        parser = self.parser
        method = parser.get_method() if parser is not None else b""
        return method in (b"GET", b"HEAD") and path in LIVENESS_PATHS

    def _lingering(self) -> bool:
        return self._phase == "linger"

    def _mark_idle(self) -> None:
        """Reclaimable at the cap from now on (only a member holds a slot to hand over)."""
        if self._role == "member":
            self._table.enter_idle(self)

    def _become_idle(self) -> None:
        """No request in progress: wait for the next one."""
        self._mark_idle()
        if self._header_bytes:  # part of the next request came while this one was answered
            self._arm(self._header_timeout_s, "headers")
        else:
            self._arm(self._limits.keepalive_timeout_s, "idle")

    def _arm(self, delay_s: float, phase: Phase) -> None:
        self._cancel_timer()
        self._phase = phase
        self._timer = self.loop.call_later(delay_s, self._deadline_passed)

    def _set_phase(self, phase: Phase) -> None:
        self._cancel_timer()
        self._phase = phase

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "headers" and self._header_bytes:
            self._table.report.note("requests whose headers came too slowly (408)")
            self._write_error(
                RequestTimeout(
                    f"The request headers did not arrive within {self._header_timeout_s:g} seconds."
                )
            )
        elif self._phase == "body":
            self._body_deadline_passed()
            return
        self.transport.close()  # also: idle, lingering, or connected and silent

    def _body_deadline_passed(self) -> None:
        if self.flow.read_paused:
            # The app has not read what already came: the client is not the one holding
            # things up. Look again later.
            self._arm(self._limits.body_read_timeout_s, "body")
            return
        self._table.report.note("requests whose body came too slowly (408)")
        cycle = self._current_cycle()
        if cycle is not None and not cycle.response_started:
            # The app waits in receive(): it gets a disconnect, and anything it sends later
            # is dropped, so the 408 below is the whole answer.
            cycle.disconnected = True
            cycle.message_event.set()
            self._write_error(
                RequestTimeout(
                    "The request body did not arrive within "
                    f"{self._limits.body_read_timeout_s:g} seconds."
                )
            )
        self.transport.close()

    def _refuse_headers(self) -> None:
        self._table.report.note("requests with headers over the size limit (431)")
        cycle = self._current_cycle()
        if cycle is not None and not cycle.response_complete:
            self.transport.close()  # an answer is being written; a 431 cannot go in between
            return
        self._respond_and_linger(
            RequestHeadersTooLarge(
                "The request line and headers are larger than the limit of "
                f"{self._limits.max_header_bytes} bytes."
            )
        )

    def _respond_and_linger(self, error: NilaiError) -> None:
        """Answer ``error``, then discard what the client still sends for a moment.

        Closing right away while the client's bytes are unread makes the kernel reset the
        connection, and a client still sending often sees the reset instead of the answer.
        """
        self._write_error(error)
        self._table.leave_idle(self)
        self._arm(LINGER_S, "linger")
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def _write_error(self, error: NilaiError) -> None:
        self.transport.write(_render(error, self.server_state.default_headers))


def _render(error: NilaiError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 response carrying ``error`` in the OpenAI shape, closing."""
    body = orjson.dumps(to_error_body(error))
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"x-content-type-options", b"nosniff"),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    head = [STATUS_LINE[error.status]]
    for name, value in headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"\r\n")
    return b"".join(head) + body


class _ConnectionTable:
    """The client connections of one server: how many hold a slot, and which are idle."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.members = 0
        self.overflow = 0
        # Insertion order is idle-since order: the first entry has been idle longest.
        self.idle: dict[LimitedHttpProtocol, float] = {}
        self.report = _Report()

    def admit(self) -> Role | None:
        """A new connection's role, or None when it must be closed at once."""
        if self.members < self.limits.max_connections:
            self.members += 1
            return "member"
        victim = self._longest_idle()
        if victim is not None:
            victim.reclaim()  # its slot passes to the new connection
            self.report.note("idle connections closed at the connection cap")
            return "member"
        if self.overflow < OVERFLOW_CONNECTIONS:
            self.overflow += 1
            return "overflow"
        self.report.note("connections closed at once: the cap and its reserve are full")
        return None

    def release(self, connection: LimitedHttpProtocol, role: Role | None) -> None:
        """``connection`` is gone; its slot, if it still held one, is free."""
        self.leave_idle(connection)
        if role == "member":
            self.members -= 1
        elif role == "overflow":
            self.overflow -= 1

    def enter_idle(self, connection: LimitedHttpProtocol) -> None:
        """``connection`` has no request in progress from now on."""
        self.idle.pop(connection, None)
        self.idle[connection] = time.monotonic()

    def leave_idle(self, connection: LimitedHttpProtocol) -> None:
        """``connection`` has a request in progress, or is closing."""
        self.idle.pop(connection, None)

    def _longest_idle(self) -> LimitedHttpProtocol | None:
        for connection, since in self.idle.items():
            if time.monotonic() - since >= RECLAIM_IDLE_AFTER_S:
                return connection
            return None  # the longest-idle one is too fresh, so is every other
        return None


_tables: weakref.WeakKeyDictionary[ServerState, _ConnectionTable] = weakref.WeakKeyDictionary()


def _table_for(server_state: ServerState, limits: ConnectionLimits) -> _ConnectionTable:
    """The table shared by every connection of one server (uvicorn's ``ServerState``)."""
    table = _tables.get(server_state)
    if table is None:
        table = _tables[server_state] = _ConnectionTable(limits)
    return table


class _Report:
    """Counts refusals and logs them at most once a minute."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._logged_at = -math.inf

    def note(self, event: str) -> None:
        """Count one ``event``; log the counts if the last line is a minute old."""
        self._counts[event] += 1
        now = time.monotonic()
        if now - self._logged_at >= REPORT_EVERY_S:
            counts = ", ".join(f"{count} {name}" for name, count in self._counts.items())
            logger.warning("client connection limits: %s (reported at most once a minute)", counts)
            self._counts.clear()
            self._logged_at = now


def _raise_open_file_limit(settings: NilaiSettings) -> None:
    """Let the process open every connection it may hold: clients' and model servers'."""
    needed = (
        settings.max_connections
        + OVERFLOW_CONNECTIONS
        + settings.upstream_max_connections
        + FILE_DESCRIPTOR_HEADROOM
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        logger.warning(
            "the open-file limit (%d) is below the %d that NILAI_MAX_CONNECTIONS and "
            "NILAI_UPSTREAM_MAX_CONNECTIONS may need: raise it (ulimit -n) or lower them",
            soft,
            needed,
        )

"""The app factory: ``create_app(settings)`` wires routes, middleware and the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilai import __version__
from nilai.gateway.chat.validate import IGNORED_FIELDS_HEADER
from nilai.gateway.cors import OpenAIErrorCORS
from nilai.gateway.lifespan import StartupError, build_services
from nilai.gateway.metrics import Metrics, MetricsMiddleware
from nilai.gateway.middleware import KeepServerSend, RequestIdMiddleware
from nilai.gateway.routes import (
    attestation,
    chat,
    delegation,
    health,
    keys,
    models,
    pricing,
    responses,
    usage,
)
from nilai.gateway.routes import metrics as metrics_route
from nilai.gateway.security import BodySizeLimit, SecurityHeaders
from nilai.http_errors import InternalErrors, install_error_handlers
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings

logger = logging.getLogger(__name__)


def create_app(settings: NilaiSettings | None = None) -> FastAPI:
    """Build the gateway; services are created when the app starts, not here."""
    settings = settings or NilaiSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        async with AsyncExitStack() as stack:
            try:
                services = await stack.enter_async_context(build_services(settings, metrics))
            except StartupError as exc:
                # One line naming the setting and the fix; the traceback only for debugging.
                logger.error("cannot start: %s", exc)  # noqa: TRY400 (traceback at debug only)
                logger.debug("start-up failure", exc_info=True)
                raise
            app.state.services = services
            yield

    docs = settings.docs_enabled
    app = FastAPI(
        title="nilai",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    routers = [health, keys, models, chat, responses, usage, pricing, attestation, delegation]
    if settings.metrics_enabled:
        routers.append(metrics_route)
    for module in routers:
        app.include_router(module.router)
    # Middleware runs outermost-last-added: headers, request id, metrics, CORS, body limit,
    # errors.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    allow_any = "*" in settings.cors_origins
    app.add_middleware(
        OpenAIErrorCORS,
        allow_origins=["*"] if allow_any else settings.cors_origins,
        allow_credentials=not allow_any,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", IGNORED_FIELDS_HEADER],
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    # Outermost, so every response gets the headers, including those of the layers inside.
    app.add_middleware(SecurityHeaders, hsts=settings.hsts)
    app.add_middleware(StartupFailureInOneLine)
    app.add_middleware(KeepServerSend)
    return app


class StartupFailureInOneLine:
    """Keep a ``StartupError`` to the one line the lifespan logged, without a traceback.

    Starlette reports any lifespan failure to the server with its formatted traceback, which
    uvicorn logs in full (the cause at the bottom of a hundred lines). For a ``StartupError``
    the server is told the start-up failed with no message instead; uvicorn still exits with
    status 3. Any other failure keeps its traceback: it is a bug to read, not a setting to fix.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass everything through; hold a lifespan start-up failure until its cause is known."""
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except StartupError:
            if held:
                await send({"type": "lifespan.startup.failed", "message": ""})
            raise
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)


START_ONLY_MIDDLEWARE: frozenset[type] = frozenset(
    {
        KeepServerSend,
        StartupFailureInOneLine,
        SecurityHeaders,
        RequestIdMiddleware,
        MetricsMiddleware,
        OpenAIErrorCORS,
        BodySizeLimit,
        InternalErrors,
    }
)
"""The middleware a stream's chunks may pass by (``KeepServerSend``): each acts on a response's
start and on the end of the call, never on the body messages between. (Starlette's own outer
and inner layers, server errors and exception handlers, only note that the response started.)
A layer that reads or rewrites bodies, compression say, must not be added to this list."""


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker runs: settings from the environment.

    Each worker process starts afresh, so it sets up logging as ``nilai api`` did for itself.
    """
    settings = NilaiSettings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)

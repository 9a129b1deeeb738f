"""The app factory: ``create_app(settings)`` wires routes, middleware and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from nilai import __version__
from nilai.gateway.errors import install_error_handlers
from nilai.gateway.lifespan import build_services
from nilai.gateway.metrics import Metrics, MetricsMiddleware
from nilai.gateway.middleware import RequestIdMiddleware
from nilai.gateway.routes import attestation, chat, health, keys, models, usage
from nilai.gateway.routes import metrics as metrics_route
from nilai.gateway.security import BodySizeLimit, SecurityHeaders
from nilai.logging import configure_logging
from nilai.settings import NilaiSettings


def create_app(settings: NilaiSettings | None = None) -> FastAPI:
    """Build the gateway; services are created when the app starts, not here."""
    settings = settings or NilaiSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        async with build_services(settings, metrics) as services:
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
    routers = [health, keys, models, chat, usage, attestation]
    if settings.metrics_enabled:
        routers.append(metrics_route)
    for module in routers:
        app.include_router(module.router)
    # Middleware runs outermost-last-added: headers, request id, metrics, CORS, body limit,
    # errors.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    allow_any = "*" in settings.cors_origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if allow_any else settings.cors_origins,
        allow_credentials=not allow_any,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID"],
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    # Outermost, so every response gets the headers, including those of the layers inside.
    app.add_middleware(SecurityHeaders, hsts=settings.hsts)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker runs: settings from the environment.

    Each worker process starts afresh, so it sets up logging as ``nilai api`` did for itself.
    """
    settings = NilaiSettings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)

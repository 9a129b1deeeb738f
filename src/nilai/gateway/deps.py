"""Typed accessors for request handlers: the services, the caller, the request id.

Dependencies are ``async def`` even when they do not await: FastAPI runs a plain ``def``
dependency in its thread pool, a thread hand-off on every request for nothing.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from nilai.auth.base import Principal
from nilai.errors import AuthenticationFailed
from nilai.gateway.services import Services
from nilai.logging import request_id_var


async def get_services(request: Request) -> Services:
    """The process's services (the one place ``app.state`` is read)."""
    return cast(Services, request.app.state.services)


ServicesDep = Annotated[Services, Depends(get_services)]


def bearer_credential(request: Request) -> str:
    """The credential of an ``Authorization: Bearer ...`` header, or 401."""
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationFailed(
            "Missing credentials: send 'Authorization: Bearer <API key>'.", code="missing_api_key"
        )
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise AuthenticationFailed("The Authorization header must be 'Bearer <API key>'.")
    return credential


# Declares the bearer scheme in the OpenAPI document; the header is parsed below, so that each
# failure gets its own message.
_bearer_scheme = HTTPBearer(auto_error=False, description="An API key (or NUC token).")


async def authenticate(
    request: Request,
    services: ServicesDep,
    _scheme: Annotated[object, Security(_bearer_scheme)],
) -> Principal:
    """Authenticate the caller with the configured strategies."""
    return await services.authenticator.authenticate(bearer_credential(request))


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def current_request_id() -> str:
    """The id of the request being served."""
    return request_id_var.get()


RequestIdDep = Annotated[str, Depends(current_request_id)]

"""Per-model prices: anyone with an API key reads them; the admin token changes them.

The admin token (``NILAI_ADMIN_TOKEN``) is not an API key: ``PUT`` and ``DELETE`` check it
alone, in constant time, and never consult the authenticator. Without one configured, prices
are changed with ``nilai prices`` only.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from nilai.billing.prices import priced_model_id
from nilai.errors import (
    AuthenticationFailed,
    Forbidden,
    NilaiError,
    NotFound,
    PricesUnavailable,
    ValidationFailed,
)
from nilai.gateway.deps import PrincipalDep, ServicesDep
from nilai.protocol.errors import error_responses
from nilai.protocol.pricing import ModelPrice, PriceFields, PriceList, PriceUpdate

logger = logging.getLogger(__name__)

router = APIRouter(tags=["pricing"])

# Declares the admin scheme in the OpenAPI document; the header is read by ``require_admin``,
# so that each failure gets its own message.
_admin_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The gateway's admin token (NILAI_ADMIN_TOKEN); not an API key.",
)


async def require_admin(
    request: Request,
    services: ServicesDep,
    _scheme: Annotated[object, Security(_admin_scheme)],
) -> None:
    """Let the request through only with ``Authorization: Bearer <NILAI_ADMIN_TOKEN>``."""
    configured = services.settings.admin_token
    expected = configured.get_secret_value() if configured is not None else ""
    if not expected.strip():
        raise Forbidden(
            "Prices cannot be changed through the API on this gateway: NILAI_ADMIN_TOKEN is "
            "not set (use `nilai prices`).",
            code="admin_disabled",
        )
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationFailed(
            "Missing credentials: send 'Authorization: Bearer <admin token>'.",
            code="missing_admin_token",
        )
    scheme, _, credential = header.partition(" ")
    # Compared in constant time, as bytes (compare_digest refuses non-ASCII str).
    matches = hmac.compare_digest(credential.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not matches:
        raise AuthenticationFailed("The admin token is not valid.", code="invalid_admin_token")


AdminDep = Annotated[None, Depends(require_admin)]

_UNAVAILABLE = (SQLAlchemyError, OSError)
"""What the database raises when it cannot take a change now."""


def _model_id(model: str) -> str:
    """The model id as prices are kept under it, or 422."""
    try:
        return priced_model_id(model)
    except ValueError as exc:
        message = str(exc).capitalize() + "."
        raise ValidationFailed(message, param="model", code="invalid_value") from None


def _unavailable() -> NilaiError:
    return PricesUnavailable("The price database cannot be reached now; retry shortly.")


def _not_priced(what: str) -> NotFound:
    return NotFound(
        f"{what}; GET /v1/pricing lists the models.", param="model", code="model_not_found"
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/v1/pricing", responses=error_responses(401))
async def list_prices(services: ServicesDep, _principal: PrincipalDep) -> PriceList:
    """Every model served (the discovery snapshot) or with a price of its own, and the default.

    Prices are in currency units: tokens per million, web searches each.
    """
    book = services.prices
    own = book.own_prices()
    models = sorted({card.id for card in services.snapshot.models()} | own.keys())
    return PriceList(
        data=[ModelPrice.for_model(m, book.price(m), default=m not in own) for m in models],
        default=PriceFields.of(book.default),
    )


@router.get("/v1/pricing/{model:path}", responses=error_responses(401, 404))
async def get_price(model: str, services: ServicesDep, _principal: PrincipalDep) -> ModelPrice:
    """The price ``model`` is charged: its own, or the default.

    404 if the model is neither served nor priced.
    """
    book = services.prices
    model = model.strip()
    own = book.has_own_price(model)
    if not own and services.snapshot.card(model) is None:
        raise _not_priced("No such model: it is neither served nor priced")
    return ModelPrice.for_model(model, book.price(model), default=not own)


_CHANGE_RESPONSES: dict[int | str, dict[str, Any]] = error_responses(400, 401, 403, 422, 503)


@router.put("/v1/pricing/{model:path}", responses=_CHANGE_RESPONSES)
async def set_price(
    model: str, body: PriceUpdate, services: ServicesDep, request: Request, _admin: AdminDep
) -> ModelPrice:
    """Give ``model`` a price of its own (admin token).

    This replica applies it at once, the others within ``NILAI_PRICE_REFRESH_S``.
    """
    model = _model_id(model)
    price = body.price()
    try:
        await services.prices.set(model, price)
    except _UNAVAILABLE as exc:
        logger.warning("setting a price failed: %s", type(exc).__name__)
        raise _unavailable() from exc
    logger.info(
        "price of model %s set with the admin token from %s", ascii(model), _client(request)
    )
    return ModelPrice.for_model(model, price, default=False)


@router.delete("/v1/pricing/{model:path}", responses={**_CHANGE_RESPONSES, **error_responses(404)})
async def delete_price(
    model: str, services: ServicesDep, request: Request, _admin: AdminDep
) -> ModelPrice:
    """Put ``model`` back on the default price (admin token); 404 if it had none of its own."""
    model = _model_id(model)
    try:
        deleted = await services.prices.delete(model)
    except _UNAVAILABLE as exc:
        logger.warning("deleting a price failed: %s", type(exc).__name__)
        raise _unavailable() from exc
    if not deleted:
        raise _not_priced("This model has no price of its own")
    logger.info(
        "price of model %s deleted with the admin token from %s", ascii(model), _client(request)
    )
    return ModelPrice.for_model(model, services.prices.default, default=True)

"""Per-model prices and what a request costs, in integer micro-units.

Amounts are whole micro-units of the credit service's currency (1 unit = 1_000_000 micro), so
sums never drift the way floats do. Token prices are per million tokens; a web search has a fee
of its own. A model without a price of its own is charged the default from the settings.

``PriceBook`` keeps the models' own prices from the database in memory: a request reads its
price without waiting on anything, a change made here applies at once, and one made by another
replica (or ``nilai prices``) applies within ``NILAI_PRICE_REFRESH_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from nilai.outages import OutageLog
from nilai.protocol.chat import CONTROL_CHARACTERS
from nilai.store.base import PriceRepo, StoredPrice

logger = logging.getLogger(__name__)

MICRO = 1_000_000
"""Micro-units in one unit of currency; also the tokens a per-million price is for."""
MAX_AMOUNT_MICRO = 10**15
"""The largest amount a price may be (one billion units): far above any real price, and small
enough that every amount is exact as a JSON number (fewer than 16 significant digits)."""
DECIMALS = 6
"""Decimal places an amount may have: the smallest amount is one micro-unit (0.000001)."""
MAX_MODEL_LENGTH = 200
"""The longest model id a price can be kept for (the ``model_prices.model`` column)."""


def priced_model_id(model: str) -> str:
    """The model id as prices are kept under it: stripped, as chat requests' ids are.

    ``ValueError`` unless it is 1 to ``MAX_MODEL_LENGTH`` characters of plain text (it is
    stored, logged and compared with the ids of chat requests).
    """
    model = model.strip()
    if not model or len(model) > MAX_MODEL_LENGTH or CONTROL_CHARACTERS.search(model):
        raise ValueError(
            f"a model id must be 1 to {MAX_MODEL_LENGTH} characters without control characters"
        )
    return model


def parse_amount(value: str | int | float | Decimal) -> int:
    """An amount of currency as whole micro-units: ``"0.05"`` → ``50_000``.

    Exact: the value is read as the decimal it is written as (a float as its shortest repr,
    so ``0.1`` is one tenth). ``ValueError``, with a message that says what is allowed, for
    anything not a finite number, a negative one, one with more than six decimal places, or
    one over ``MAX_AMOUNT_MICRO`` micro-units. The message never repeats the value.
    """
    if isinstance(value, bool):  # a bool is an int to Python, never an amount
        # ValueError, not TypeError: the settings and the CLI report ValueErrors as bad input.
        raise ValueError("must be a number, not a boolean")  # noqa: TRY004
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("must be a decimal number such as 2.5") from None
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0:
        raise ValueError("must not be negative")
    if amount > Decimal(MAX_AMOUNT_MICRO) / MICRO:
        raise ValueError(f"must be at most {MAX_AMOUNT_MICRO // MICRO}")
    # From the digits themselves: Decimal arithmetic rounds to the context's 28 digits, which
    # would pass "1.0000000000000000000000000001" and round "1e-9999999" down to 0.
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # noqa: S101 - finite, checked above
    places = list(digits)
    while exponent < -DECIMALS and places and places[-1] == 0:  # trailing zeros are not decimals
        places.pop()
        exponent += 1
    if not any(places):
        return 0
    if exponent < -DECIMALS:
        raise ValueError(f"must have at most {DECIMALS} decimal places (0.000001 is the smallest)")
    # At most 1e9 with at most 6 places: 16 digits at most, and a small non-negative shift.
    return int("".join(map(str, places))) * 10 ** (exponent + DECIMALS)


def amount_json(micro: int) -> float:
    """Micro-units as a JSON number of units: ``50_000`` → ``0.05``.

    The division is correctly rounded, so an amount of up to 15 significant digits (every
    amount ``parse_amount`` accepts) prints as exactly the decimal it is.
    """
    return micro / MICRO


def amount_text(micro: int) -> str:
    """Micro-units as a plain decimal string of units, for people: ``50_000`` → ``"0.05"``."""
    # normalize() drops trailing zeros; the "f" format spells out its exponents ("2E+1": "20").
    return f"{Decimal(micro).scaleb(-DECIMALS).normalize():f}"


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price, every amount in micro-units."""

    prompt_per_million: int
    """Per million prompt tokens."""
    completion_per_million: int
    """Per million completion tokens."""
    web_search: int
    """Per web search made at the provider."""

    def cost(self, prompt_tokens: int, completion_tokens: int, searches: int) -> int:
        """What a request with these counts costs, in micro-units.

        The token part is rounded up to the next micro-unit, once per request (never per
        token, so a request is never charged more than one micro-unit over the exact cost);
        searches add their fee. Integer arithmetic only. ``ValueError`` on a negative count.
        """
        if prompt_tokens < 0 or completion_tokens < 0 or searches < 0:
            raise ValueError("token and search counts cannot be negative")
        tokens = prompt_tokens * self.prompt_per_million + completion_tokens * (
            self.completion_per_million
        )
        return -(-tokens // MICRO) + searches * self.web_search


def stored(model: str, price: Price) -> StoredPrice:
    """``price`` as the store keeps it."""
    return StoredPrice(
        model=model,
        prompt_per_million=price.prompt_per_million,
        completion_per_million=price.completion_per_million,
        web_search=price.web_search,
    )


def from_stored(row: StoredPrice) -> Price:
    """A stored price as a ``Price``."""
    return Price(row.prompt_per_million, row.completion_per_million, row.web_search)


class PriceBook:
    """The models' own prices, cached from the database, and the default for the rest.

    ``price`` never waits and never fails: while the database cannot be read the last prices
    read stay in use, and the outage is logged when it starts and when it ends.
    """

    def __init__(self, repo: PriceRepo, default: Price, *, refresh_s: float = 10.0) -> None:
        self._repo = repo
        self._default = default
        self._refresh_s = refresh_s
        self._own: dict[str, Price] = {}
        # Bumped by every change made here: a refresh that read the database before the change
        # landed would put the old price back, so it leaves the cache alone.
        self._changes = 0
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(
            logger,
            "price database",
            f"prices stay as last read, and are read again every {refresh_s:g} s",
        )

    @property
    def default(self) -> Price:
        """The price of a model without one of its own (from the settings)."""
        return self._default

    def price(self, model: str) -> Price:
        """The price ``model`` is charged: its own, or the default. From memory, never waits."""
        return self._own.get(model, self._default)

    def own_prices(self) -> dict[str, Price]:
        """The models' own prices as last read or changed here (a copy), from memory."""
        return dict(self._own)

    def has_own_price(self, model: str) -> bool:
        """Whether ``model`` has a price of its own (as last read or changed here)."""
        return model in self._own

    async def all(self) -> dict[str, Price]:
        """The models' own prices, read from the database now (the cache takes them too)."""
        return await self._read()

    async def set(self, model: str, price: Price) -> None:
        """Give ``model`` a price of its own, in the database and in this process at once."""
        self._changes += 1
        await self._repo.set_price(stored(model, price))
        self._changes += 1
        self._own[model] = price

    async def delete(self, model: str) -> bool:
        """Put ``model`` back on the default price; False if it had no price of its own."""
        self._changes += 1
        deleted = await self._repo.delete_price(model)
        self._changes += 1
        self._own.pop(model, None)
        return deleted

    async def refresh(self) -> None:
        """Read every model's own price from the database into the cache; raise if it cannot."""
        await self._read()

    async def _read(self) -> dict[str, Price]:
        changes = self._changes
        rows = await self._repo.list_prices()
        prices = {row.model: from_stored(row) for row in rows}
        if changes == self._changes:
            self._own = prices
        return dict(prices)

    def start(self) -> None:
        """Refresh every ``refresh_s`` in the background until ``aclose``, so replicas converge."""
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_loop(), name="price-refresh")

    async def aclose(self) -> None:
        """Stop refreshing."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001 - any failure keeps the last prices
                self._outage.failed(error)
            else:
                self._outage.answered()

"""Amounts, costs and the price book: exact integer micro-units, and a cache that never fails."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from nilai.billing.prices import (
    MAX_AMOUNT_MICRO,
    Price,
    PriceBook,
    amount_json,
    amount_text,
    parse_amount,
    priced_model_id,
)
from nilai.settings import NilaiSettings, settings_problems
from nilai.store.base import StoredPrice
from tests.support.servers import wait_until_async

DEFAULT = Price(2_000_000, 2_000_000, 50_000)

# --- parse_amount ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("2.0", 2_000_000),
        ("0.05", 50_000),
        ("0.000001", 1),
        ("0", 0),
        ("-0", 0),
        (" 1.5 ", 1_500_000),
        ("2.50000000", 2_500_000),  # trailing zeros are not decimals
        (3, 3_000_000),
        (0.1, 100_000),  # a float is read as the decimal it prints as
        (0.3, 300_000),
        (Decimal("1.234567"), 1_234_567),
        ("1000000000", MAX_AMOUNT_MICRO),
        ("1e3", 1_000_000_000),
    ],
)
def test_parse_amount_is_exact(value: str | int | float | Decimal, micro: int):
    assert parse_amount(value) == micro


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0.0000001", "at most 6 decimal places"),
        (1e-7, "at most 6 decimal places"),
        ("1.2345678", "at most 6 decimal places"),
        ("-0.01", "negative"),
        (-1, "negative"),
        ("NaN", "finite"),
        ("inf", "finite"),
        (float("-inf"), "finite"),
        ("1000000000.000001", "at most 1000000000"),
        (10**20, "at most 1000000000"),
        ("1e400", "at most 1000000000"),
        ("two", "decimal number"),
        ("", "decimal number"),
        (True, "boolean"),
    ],
)
def test_parse_amount_refuses_with_a_clear_message(value: object, problem: str):
    with pytest.raises(ValueError, match=problem):
        parse_amount(value)  # pyright: ignore[reportArgumentType] - bad input on purpose


def test_parse_amount_never_repeats_the_value():
    # Settings errors never show a value (it may sit next to a secret in a YAML file).
    for value in ("12.34567891", "-98.76", "abc123xyz"):
        with pytest.raises(ValueError, match="must") as raised:
            parse_amount(value)
        assert value not in str(raised.value)


@given(st.integers(min_value=0, max_value=MAX_AMOUNT_MICRO))
def test_amounts_round_trip_through_json_numbers_and_text(micro: int):
    assert parse_amount(amount_json(micro)) == micro
    assert parse_amount(amount_text(micro)) == micro
    assert Decimal(repr(amount_json(micro))) == Decimal(micro) / 1_000_000


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=0, max_value=10**9))
def test_parse_amount_is_exact_for_any_decimal(value: Decimal):
    micro = Fraction(value) * 1_000_000
    if micro.denominator == 1:
        assert parse_amount(value) == micro
        assert parse_amount(str(value)) == micro
    else:
        with pytest.raises(ValueError, match="decimal places"):
            parse_amount(value)


@pytest.mark.parametrize(
    ("text", "micro"),
    [("1.0000000000000000000000000001", None), ("1e-9999999", None), ("0e-999999999", 0)],
)
def test_parse_amount_does_not_round_to_a_context_precision(text: str, micro: int | None):
    if micro is None:
        with pytest.raises(ValueError, match="decimal places"):
            parse_amount(text)
    else:
        assert parse_amount(text) == micro


def test_amount_text_is_plain():
    assert [amount_text(m) for m in (0, 1, 50_000, 2_000_000, 20_000_000)] == [
        "0",
        "0.000001",
        "0.05",
        "2",
        "20",
    ]


# --- cost -----------------------------------------------------------------------------------


def test_cost_rounds_the_token_part_up_once_per_request():
    price = Price(prompt_per_million=1, completion_per_million=3, web_search=0)
    assert price.cost(1, 0, 0) == 1  # a millionth of a micro-unit is charged one micro-unit
    assert price.cost(1_000_000, 0, 0) == 1
    assert price.cost(1_000_001, 0, 0) == 2
    assert price.cost(500_000, 166_666, 0) == 1  # 999_998 millionths
    assert price.cost(500_000, 166_667, 0) == 2  # 1_000_001 millionths
    assert price.cost(0, 0, 0) == 0


def test_cost_with_the_default_prices():
    # 2 units per million tokens is 2 micro-units per token; a search is 0.05 units.
    assert DEFAULT.cost(1000, 500, 0) == 3_000
    assert DEFAULT.cost(1000, 500, 2) == 3_000 + 100_000
    assert DEFAULT.cost(0, 0, 3) == 150_000


def test_cost_is_integer_arithmetic_even_where_floats_drift():
    price = Price(prompt_per_million=100_000, completion_per_million=200_000, web_search=0)
    # 0.1 + 0.2 per token in floats is 0.30000000000000004; in micro-units it is exact.
    assert price.cost(1_000_000, 1_000_000, 0) == 300_000
    huge = Price(MAX_AMOUNT_MICRO, MAX_AMOUNT_MICRO, MAX_AMOUNT_MICRO)
    assert huge.cost(10**9, 10**9, 10**3) == 2 * 10**18 + 10**18
    assert isinstance(huge.cost(3, 7, 1), int)


def test_cost_refuses_negative_counts():
    with pytest.raises(ValueError, match="negative"):
        DEFAULT.cost(-1, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        DEFAULT.cost(0, 0, -1)


COUNTS = st.integers(min_value=0, max_value=10**9)
AMOUNTS = st.integers(min_value=0, max_value=MAX_AMOUNT_MICRO)


@given(
    prompt_price=AMOUNTS,
    completion_price=AMOUNTS,
    search_fee=AMOUNTS,
    prompt=COUNTS,
    completion=COUNTS,
    searches=st.integers(min_value=0, max_value=100),
)
def test_cost_is_the_exact_ceiling(
    *,
    prompt_price: int,
    completion_price: int,
    search_fee: int,
    prompt: int,
    completion: int,
    searches: int,
):
    price = Price(prompt_price, completion_price, search_fee)
    exact = Fraction(prompt * prompt_price + completion * completion_price, 1_000_000)
    expected = -(-exact.numerator // exact.denominator) + searches * search_fee
    cost = price.cost(prompt, completion, searches)
    assert cost == expected
    assert 0 <= cost - (exact + searches * search_fee) < 1


# --- model ids ------------------------------------------------------------------------------


def test_priced_model_ids_are_stripped_plain_text():
    assert priced_model_id("  org/model-7b ") == "org/model-7b"
    for bad in ("", "   ", "a" * 201, "bad\x00id", "line\nbreak", "a\u2028b"):
        with pytest.raises(ValueError, match="1 to 200 characters"):
            priced_model_id(bad)
    assert priced_model_id("a" * 200) == "a" * 200


# --- the price book -------------------------------------------------------------------------


class MemoryPrices:
    """A ``PriceRepo`` in a dict; ``down`` makes every call fail as an unreachable database."""

    def __init__(self) -> None:
        self.rows: dict[str, StoredPrice] = {}
        self.down = False
        self.reads = 0
        self.gate: asyncio.Event | None = None
        """When set, ``list_prices`` reads the rows and then waits for it."""

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")

    async def list_prices(self) -> list[StoredPrice]:
        self._check()
        self.reads += 1
        rows = sorted(self.rows.values(), key=lambda row: row.model)
        if self.gate is not None:
            await self.gate.wait()
        return rows

    async def set_price(self, price: StoredPrice) -> None:
        self._check()
        self.rows[price.model] = price

    async def delete_price(self, model: str) -> bool:
        self._check()
        return self.rows.pop(model, None) is not None


def _row(model: str, prompt: int) -> StoredPrice:
    return StoredPrice(model, prompt, prompt, 0)


async def test_price_book_serves_own_prices_and_the_default():
    repo = MemoryPrices()
    repo.rows["m1"] = _row("m1", 7)
    book = PriceBook(repo, DEFAULT)
    assert book.price("m1") == DEFAULT  # nothing read yet
    await book.refresh()
    assert book.price("m1") == Price(7, 7, 0)
    assert book.price("other") == DEFAULT
    assert book.default == DEFAULT
    assert book.has_own_price("m1")
    assert not book.has_own_price("other")
    assert await book.all() == {"m1": Price(7, 7, 0)}


async def test_set_and_delete_apply_at_once_and_reach_the_repo():
    repo = MemoryPrices()
    book = PriceBook(repo, DEFAULT)
    await book.set("m", Price(1, 2, 3))
    assert book.price("m") == Price(1, 2, 3)
    assert repo.rows["m"] == StoredPrice("m", 1, 2, 3)
    assert await book.delete("m")
    assert book.price("m") == DEFAULT
    assert "m" not in repo.rows
    assert not await book.delete("m")


async def test_a_refresh_read_before_a_change_does_not_undo_it():
    repo = MemoryPrices()
    book = PriceBook(repo, DEFAULT)
    repo.gate = asyncio.Event()
    refresh = asyncio.create_task(book.refresh())
    await wait_until_async(_reads(repo, 1), what="the refresh to read the old rows")
    await book.set("m", Price(9, 9, 9))
    repo.gate.set()
    await refresh
    assert book.price("m") == Price(9, 9, 9)
    repo.gate = None
    await book.refresh()  # a later refresh reads the change from the database
    assert book.own_prices() == {"m": Price(9, 9, 9)}


def _reads(repo: MemoryPrices, count: int):
    async def done() -> bool:
        return repo.reads >= count

    return done


async def test_the_background_refresh_converges_and_survives_an_outage(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="nilai.billing.prices")
    repo = MemoryPrices()
    book = PriceBook(repo, DEFAULT, refresh_s=0.01)
    book.start()
    try:
        repo.rows["m"] = _row("m", 5)  # another replica's change
        await wait_until_async(_price_is(book, "m", Price(5, 5, 0)), what="the new price")

        repo.down = True
        await wait_until_async(lambda: _logged(caplog, "unavailable"), what="the outage line")
        assert book.price("m") == Price(5, 5, 0)  # the last prices stay in use

        repo.down = False
        repo.rows["m"] = _row("m", 6)
        await wait_until_async(_price_is(book, "m", Price(6, 6, 0)), what="recovery")
        await wait_until_async(lambda: _logged(caplog, "available again"), what="the end line")
        outage_lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_lines) == 1  # once per outage, not once per refresh
    finally:
        await book.aclose()
    await book.aclose()  # closing twice is harmless


def _price_is(book: PriceBook, model: str, price: Price):
    async def check() -> bool:
        return book.price(model) == price

    return check


async def _logged(caplog: pytest.LogCaptureFixture, fragment: str) -> bool:
    return any(fragment in record.getMessage() for record in caplog.records)


# --- the default price in the settings --------------------------------------------------------


def test_the_default_price_comes_from_the_settings(tmp_path: Path):
    assert NilaiSettings(data_dir=tmp_path).default_price == DEFAULT
    settings = NilaiSettings(
        data_dir=tmp_path,
        price_prompt_per_million="0.5",
        price_completion_per_million=1.25,  # pyright: ignore[reportArgumentType] - as YAML gives it
        price_web_search="0",
    )
    assert settings.default_price == Price(500_000, 1_250_000, 0)


@pytest.mark.parametrize("value", ["-1", "0.0000001", "two", "1e12", "NaN", True, [1]])
def test_a_bad_default_price_is_a_settings_error_naming_the_variable(tmp_path: Path, value: Any):
    with pytest.raises(ValidationError) as raised:
        NilaiSettings(data_dir=tmp_path, price_web_search=value)
    (problem,) = settings_problems(raised.value)
    assert problem.startswith("price_web_search (NILAI_PRICE_WEB_SEARCH): ")

"""``/v1/pricing`` bodies: prices as JSON numbers of currency units (exact to 0.000001)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from nilai.billing.prices import DECIMALS, MAX_AMOUNT_MICRO, MICRO, Price, amount_json, parse_amount

_AMOUNT_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")
_MAX_UNITS = MAX_AMOUNT_MICRO // MICRO

# Documented as what is accepted, exactly: schema-driven clients (and fuzzers) then agree with
# the validator on which values are valid.
Amount = Annotated[
    Decimal,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": _MAX_UNITS},
                {"type": "string", "pattern": f"^{_AMOUNT_TEXT.pattern}$"},
            ],
            "description": (
                f"Currency units, as a number or a decimal string; at most {DECIMALS} decimal "
                f"places, from 0 to {_MAX_UNITS}."
            ),
        }
    ),
]


class PriceUpdate(BaseModel):
    """``PUT /v1/pricing/{model}`` body: the model's own price."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens_price: Amount
    """Per million prompt tokens."""
    completion_tokens_price: Amount
    """Per million completion tokens."""
    web_search_cost: Amount
    """Per web search."""

    @field_validator(
        "prompt_tokens_price", "completion_tokens_price", "web_search_cost", mode="before"
    )
    @classmethod
    def _plain_decimal(cls, value: object) -> object:
        # Decimal() also reads "1e3", " 1", "1_000" and "NaN"; the API takes plain decimals.
        if isinstance(value, str) and not _AMOUNT_TEXT.fullmatch(value):
            raise PydanticCustomError(
                "amount_text", "A price given as a string must be a plain decimal such as '2.5'."
            )
        if isinstance(value, bool):
            raise PydanticCustomError("amount_type", "A price must be a number.")
        return value

    @field_validator("prompt_tokens_price", "completion_tokens_price", "web_search_cost")
    @classmethod
    def _amount(cls, value: Decimal) -> Decimal:
        try:
            parse_amount(value)
        except ValueError as exc:
            raise PydanticCustomError(
                "amount", "A price {problem}.", {"problem": str(exc)}
            ) from None
        return value

    def price(self) -> Price:
        """The price in micro-units."""
        return Price(
            prompt_per_million=parse_amount(self.prompt_tokens_price),
            completion_per_million=parse_amount(self.completion_tokens_price),
            web_search=parse_amount(self.web_search_cost),
        )


class PriceFields(BaseModel):
    """A price in currency units."""

    prompt_tokens_price: float = Field(description="Per million prompt tokens.")
    completion_tokens_price: float = Field(description="Per million completion tokens.")
    web_search_cost: float = Field(description="Per web search made at the provider.")

    @classmethod
    def of(cls, price: Price) -> PriceFields:
        """``price`` (micro-units) in currency units."""
        return cls(
            prompt_tokens_price=amount_json(price.prompt_per_million),
            completion_tokens_price=amount_json(price.completion_per_million),
            web_search_cost=amount_json(price.web_search),
        )


class ModelPrice(BaseModel):
    """A model's effective price; ``default`` tells whether it is the default one."""

    model: str
    prompt_tokens_price: float = Field(description="Per million prompt tokens.")
    completion_tokens_price: float = Field(description="Per million completion tokens.")
    web_search_cost: float = Field(description="Per web search made at the provider.")
    default: bool = Field(description="Whether this is the default price (no price of its own).")

    @classmethod
    def for_model(cls, model: str, price: Price, *, default: bool) -> ModelPrice:
        """``model``'s entry."""
        return cls(model=model, default=default, **PriceFields.of(price).model_dump())


class PriceList(BaseModel):
    """``GET /v1/pricing`` body: every model served or priced, and the default price."""

    object: Literal["list"] = "list"
    data: list[ModelPrice]
    default: PriceFields

"""The schema. Portable types only, so PostgreSQL and SQLite share one set of migrations.

There is deliberately no column for message content anywhere.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of every table."""


class AccountRow(Base):
    """Who pays: the unit of usage and of rate limits."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    rate_limit_minute: Mapped[int | None] = mapped_column(Integer)
    rate_limit_hour: Mapped[int | None] = mapped_column(Integer)
    rate_limit_day: Mapped[int | None] = mapped_column(Integer)
    rate_limit_lifetime: Mapped[int | None] = mapped_column(Integer)


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is kept; the prefix finds it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class QueryLogRow(Base):
    """One request: who, which model, how many tokens, how long, how it ended. No content."""

    __tablename__ = "query_logs"
    __table_args__ = (Index("ix_query_logs_account_started", "account_id", "started_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[str] = mapped_column(String(64))
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int] = mapped_column(Integer)
    error_kind: Mapped[str | None] = mapped_column(String(64))
    streamed: Mapped[bool] = mapped_column(Boolean)
    tools: Mapped[bool] = mapped_column(Boolean)
    web_search: Mapped[bool] = mapped_column(Boolean)
    nilrag: Mapped[bool] = mapped_column(Boolean)
    multimodal: Mapped[bool] = mapped_column(Boolean)
    prompt_document: Mapped[bool] = mapped_column(Boolean, server_default=false())
    searches: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    tool_calls: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    nilrag_chunks: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cost_micro: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class UsageTotalRow(Base):
    """Running totals per account, kept with the logs so /v1/usage is one key lookup."""

    __tablename__ = "usage_totals"

    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    queries: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micro: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class ModelPriceRow(Base):
    """A model's own price, in micro-units; models without a row are charged the default."""

    __tablename__ = "model_prices"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    prompt_per_million: Mapped[int] = mapped_column(BigInteger)
    completion_per_million: Mapped[int] = mapped_column(BigInteger)
    web_search: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

"""Factory fixtures: fake model servers, gateways on loopback, Redis prefixes. All cleaned up."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from coincurve import PrivateKey

from nilai.crypto.keys import Signer
from nilai.gateway.app import create_app
from nilai.settings import NilaiSettings
from tests.fakes.fake_openai_server import FakeConfig, FakeState, create_fake_app
from tests.support.private_postgres import pg_database, private_postgres  # noqa: F401 - shared
from tests.support.private_redis import private_redis  # noqa: F401 - a shared fixture
from tests.support.servers import ServerThread
from tests.support.stores import db_url  # noqa: F401 - a shared fixture

TEST_API_KEY = "nilai-test-key-0123456789abcdef"  # pragma: allowlist secret
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class FakeHandle:
    thread: ServerThread
    state: FakeState

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def port(self) -> int:
        return self.thread.port

    @property
    def config(self) -> FakeConfig:
        return self.state.config

    def stop(self) -> None:
        self.thread.stop()


@dataclass
class GatewayHandle:
    thread: ServerThread
    settings: NilaiSettings

    @property
    def url(self) -> str:
        return self.thread.url

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=TEST_API_KEY, max_retries=0, **kwargs
        )

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=TEST_API_KEY, max_retries=0, **kwargs
        )

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="module")
def signer() -> Signer:
    """A fresh signing key for each test module: the one definition every test shares."""
    return Signer(PrivateKey())


@pytest.fixture
def start_fake() -> Iterator[Callable[..., FakeHandle]]:
    started: list[FakeHandle] = []

    def start(port: int = 0, **config: Any) -> FakeHandle:
        fake_config = FakeConfig(**config)
        app = create_fake_app(fake_config)
        handle = FakeHandle(ServerThread(app, port).start(), app.state.fake)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayHandle]]:
    started: list[GatewayHandle] = []

    def start(**overrides: Any) -> GatewayHandle:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"gateway-{len(started)}",
            "api_keys": [TEST_API_KEY],
            "discovery_refresh_s": 0.2,
            "discovery_ttl_s": 3.0,
            "endpoint_eject_s": 2.0,
            # Limits are off unless a test is about them (0 switches a limit off).
            "rate_limit_minute": 0,
            "rate_limit_hour": 0,
            "rate_limit_day": 0,
        }
        values.update(overrides)
        settings = NilaiSettings(**values)
        handle = GatewayHandle(ServerThread(create_app(settings)).start(), settings)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.thread.stop()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on this machine's Redis; every key under it is deleted afterwards."""
    prefix = f"nilai-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()

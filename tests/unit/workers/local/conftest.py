"""The worker app over a fake engine, and a client for it: shared by the worker's route tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from nilai.workers.local.server import create_worker_app
from tests.unit.workers.local.test_server import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine) -> Iterator[FastAPI]:
    app = create_worker_app(engine)
    yield app
    app.state.generations.close()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        yield client

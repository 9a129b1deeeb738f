"""Shared e2e fixtures: the tiny model, its engine, and the fake model server plus gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import FakeHandle, GatewayHandle
from tests.fakes.nildb import FakeNildbCluster, start_cluster
from tests.support.replicas import start_replica  # noqa: F401 - a fixture for e2e tests
from tests.support.websearch import SearchWorld, start_search_world


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stack(fake={...}, gateway={...}): settings of the `stack` fixture's fake model server "
        "(FakeConfig fields) and gateway (NilaiSettings fields)",
    )


@pytest.fixture
def stack(
    request: pytest.FixtureRequest,
    start_fake: Callable[..., FakeHandle],
    start_gateway: Callable[..., GatewayHandle],
) -> tuple[FakeHandle, GatewayHandle]:
    """A fake model server and a gateway in front of it.

    A module or test changes either with ``pytest.mark.stack(fake={...}, gateway={...})``.
    """
    marker = request.node.get_closest_marker("stack")
    options: dict[str, Any] = marker.kwargs if marker else {}
    unknown = set(options) - {"fake", "gateway"}
    if unknown:
        raise TypeError(f"pytest.mark.stack takes fake= and gateway=, not {sorted(unknown)}")
    fake = start_fake(**options.get("fake", {}))
    gateway = start_gateway(upstream_urls=[fake.url], **options.get("gateway", {}))
    return fake, gateway


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nilai.workers.local.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-model", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from nilai.workers.local.engine import TransformersEngine

    return TransformersEngine(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeNildbCluster]:
    """A stand-in nilauth and three nilDB nodes for the module (tests undo the faults they set)."""
    running = start_cluster(3)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def search_world() -> Iterator[SearchWorld]:
    """Brave, result pages and a forbidden address on loopback (tests/support/websearch.py)."""
    world = start_search_world()
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture
def web(search_world: SearchWorld) -> SearchWorld:
    """``search_world``, with what the last test set up or recorded forgotten."""
    search_world.reset()
    return search_world

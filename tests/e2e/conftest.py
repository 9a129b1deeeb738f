"""Shared, expensive e2e fixtures: the tiny model and the engine loaded from it."""

from __future__ import annotations

import pytest

from tests.support.replicas import start_replica  # noqa: F401 - a fixture for e2e tests


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nilai.workers.local.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-model", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from nilai.workers.local.engine import TransformersEngine

    return TransformersEngine(str(tiny_model_dir), device="cpu")

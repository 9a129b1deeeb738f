"""Health, liveness, readiness and the public key, without credentials."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_health_endpoints(start_fake, start_gateway):
    fake = start_fake()
    gateway = start_gateway(upstream_urls=[fake.url])
    health = httpx.get(f"{gateway.url}/v1/health").json()
    assert health["status"] == "ok"
    assert health["uptime"].endswith("s")
    for path in ("/healthz", "/v1/healthz"):
        body = httpx.get(gateway.url + path).json()
        assert body["status"] == "healthy"
        assert float(body["uptime"].removesuffix("s")) >= 0
    for path in ("/readyz", "/v1/readyz"):
        response = httpx.get(gateway.url + path)
        assert response.status_code == 200
        assert response.json()["status"] == "ready"


def test_not_ready_without_models(start_gateway):
    gateway = start_gateway()
    response = httpx.get(f"{gateway.url}/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["models"] == "no reachable model server"


def test_readyz_reports_unreachable_redis(start_gateway, redis_prefix):
    gateway = start_gateway(redis_url="redis://127.0.0.1:1/0", redis_prefix=redis_prefix)
    response = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("unreachable")


def test_request_id_is_echoed_or_created(start_gateway):
    gateway = start_gateway()
    given = httpx.get(f"{gateway.url}/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    created = httpx.get(f"{gateway.url}/healthz", headers={"X-Request-ID": "bad id; drop table"})
    assert len(created.headers["x-request-id"]) == 32


def test_key_survives_restart(start_gateway, tmp_path):
    first = start_gateway(data_dir=tmp_path / "shared")
    key = httpx.get(f"{first.url}/v1/public_key").json()
    first.thread.stop()
    second = start_gateway(data_dir=tmp_path / "shared")
    assert httpx.get(f"{second.url}/v1/public_key").json() == key
    assert (tmp_path / "shared" / "signing_key.pem").stat().st_mode & 0o777 == 0o600

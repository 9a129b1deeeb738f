"""``/v1/pricing`` on a real gateway: reading with an API key, changing with the admin token,
replicas converging on a change, and costs in ``/v1/usage``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nilai.billing.prices import Price, amount_json
from nilai.store.sql import SqlStore
from tests.conftest import TEST_API_KEY, FakeHandle, GatewayHandle
from tests.support.records import query_log
from tests.support.servers import wait_until
from tests.support.stores import PG_HOST, PG_PORT, create_tenant, sqlite_url, with_store
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

StartFake = Callable[..., FakeHandle]
StartGateway = Callable[..., GatewayHandle]
Stack = tuple[FakeHandle, GatewayHandle]

ADMIN_TOKEN = "nilai-admin-token-for-tests-0123"  # pragma: allowlist secret
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
API_KEY = {"Authorization": f"Bearer {TEST_API_KEY}"}
DEFAULT_FIELDS = {
    "prompt_tokens_price": 2.0,
    "completion_tokens_price": 2.0,
    "web_search_cost": 0.05,
}
NEW_PRICE = {"prompt_tokens_price": "0.5", "completion_tokens_price": 1.25, "web_search_cost": 0}
NEW_FIELDS = {"prompt_tokens_price": 0.5, "completion_tokens_price": 1.25, "web_search_cost": 0.0}


def _get(
    gateway: GatewayHandle, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", headers=API_KEY if headers is None else headers)


def _put(
    gateway: GatewayHandle, model: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    url = f"{gateway.url}/v1/pricing/{model}"
    return httpx.put(url, json=body, headers=ADMIN if headers is None else headers)


def _delete(
    gateway: GatewayHandle, model: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    url = f"{gateway.url}/v1/pricing/{model}"
    return httpx.delete(url, headers=ADMIN if headers is None else headers)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture
def admin_gateway(start_fake: StartFake, start_gateway: StartGateway) -> GatewayHandle:
    return start_gateway(upstream_urls=[start_fake().url], admin_token=ADMIN_TOKEN)


# reading


@pytest.mark.stack(gateway={"price_web_search": "0.1"})
def test_every_served_model_is_listed_with_the_default_price(stack: Stack):
    _, gateway = stack
    default = {**DEFAULT_FIELDS, "web_search_cost": 0.1}
    response = _get(gateway, "/v1/pricing")
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [{"model": "fake-model", "default": True, **default}],
        "default": default,
    }
    one = _get(gateway, "/v1/pricing/fake-model")
    assert one.json() == {"model": "fake-model", "default": True, **default}


def test_reading_prices_needs_an_api_key(stack: Stack):
    _, gateway = stack
    for path in ("/v1/pricing", "/v1/pricing/fake-model"):
        assert _error(_get(gateway, path, headers={}), 401)["code"] == "missing_api_key"
        bad = {"Authorization": "Bearer not-a-key"}
        assert _error(_get(gateway, path, headers=bad), 401)["type"] == "authentication_error"


def test_an_unknown_model_is_404(stack: Stack):
    _, gateway = stack
    for model in ("no-such-model", "org/no-such-model", ""):
        error = _error(_get(gateway, f"/v1/pricing/{model}"), 404)
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"


# changing


def test_changing_prices_without_an_admin_token_configured_is_403(stack: Stack):
    _, gateway = stack
    for headers in (ADMIN, API_KEY, {}):
        for response in (
            _put(gateway, "fake-model", NEW_PRICE, headers),
            _delete(gateway, "fake-model", headers),
        ):
            error = _error(response, 403)
            assert error["code"] == "admin_disabled"
            assert "NILAI_ADMIN_TOKEN" in error["message"]
    assert _get(gateway, "/v1/pricing/fake-model").json()["default"] is True


def test_changing_prices_needs_the_admin_token_not_an_api_key(admin_gateway: GatewayHandle):
    gateway = admin_gateway
    missing = _error(_put(gateway, "fake-model", NEW_PRICE, {}), 401)
    assert missing["code"] == "missing_admin_token"
    assert missing["type"] == "authentication_error"
    for headers in (
        API_KEY,
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
    ):
        put = _put(gateway, "fake-model", NEW_PRICE, headers)
        assert _error(put, 401)["code"] == "invalid_admin_token"
        assert put.headers["www-authenticate"] == "Bearer"
        assert _error(_delete(gateway, "fake-model", headers), 401)["code"] == "invalid_admin_token"
    # A header that is not ASCII is compared as bytes too (latin-1, as HTTP carries it).
    latin = httpx.put(
        f"{gateway.url}/v1/pricing/fake-model",
        json=NEW_PRICE,
        headers=[(b"Authorization", "Bearer \u00e9t\u00e9".encode("latin-1"))],
    )
    assert _error(latin, 401)["code"] == "invalid_admin_token"
    # Nor is the admin token an API key.
    assert _error(_get(gateway, "/v1/pricing", headers=ADMIN), 401)["code"] == "invalid_api_key"
    assert _get(gateway, "/v1/pricing/fake-model").json()["default"] is True


def test_put_get_and_delete_a_price(admin_gateway: GatewayHandle):
    gateway = admin_gateway
    put = _put(gateway, "fake-model", NEW_PRICE)
    assert put.status_code == 200, put.text
    assert put.json() == {"model": "fake-model", "default": False, **NEW_FIELDS}
    assert _get(gateway, "/v1/pricing/fake-model").json() == put.json()

    # Model ids hold slashes; a model priced before it is served is listed too.
    upcoming = _put(gateway, "org/upcoming-model", {**NEW_PRICE, "web_search_cost": "0.000001"})
    assert upcoming.status_code == 200, upcoming.text
    listing = _get(gateway, "/v1/pricing").json()
    assert [entry["model"] for entry in listing["data"]] == ["fake-model", "org/upcoming-model"]
    assert listing["data"][1]["web_search_cost"] == 0.000001
    assert listing["default"] == DEFAULT_FIELDS

    deleted = _delete(gateway, "fake-model")
    assert deleted.status_code == 200
    assert deleted.json() == {"model": "fake-model", "default": True, **DEFAULT_FIELDS}
    assert _get(gateway, "/v1/pricing/fake-model").json()["default"] is True
    error = _error(_delete(gateway, "fake-model"), 404)
    assert error["code"] == "model_not_found"
    assert _delete(gateway, "org/upcoming-model").status_code == 200
    assert _get(gateway, "/v1/pricing/org/upcoming-model").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**NEW_PRICE, "prompt_tokens_price": -1}, "prompt_tokens_price"),
        ({**NEW_PRICE, "prompt_tokens_price": "-1"}, "prompt_tokens_price"),
        ({**NEW_PRICE, "completion_tokens_price": "0.0000001"}, "completion_tokens_price"),
        ({**NEW_PRICE, "completion_tokens_price": 1e-7}, "completion_tokens_price"),
        ({**NEW_PRICE, "web_search_cost": "1e3"}, "web_search_cost"),
        ({**NEW_PRICE, "web_search_cost": "NaN"}, "web_search_cost"),
        ({**NEW_PRICE, "web_search_cost": 1e10}, "web_search_cost"),
        ({**NEW_PRICE, "web_search_cost": True}, "web_search_cost"),
        ({**NEW_PRICE, "web_search_cost": None}, "web_search_cost"),
        ({"prompt_tokens_price": 1, "completion_tokens_price": 1}, "web_search_cost"),
        ({**NEW_PRICE, "prompt_price": 1}, "prompt_price"),
    ],
)
def test_bad_prices_are_422_naming_the_field(
    admin_gateway: GatewayHandle, body: dict[str, Any], param: str
):
    error = _error(_put(admin_gateway, "fake-model", body), 422)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert _get(admin_gateway, "/v1/pricing/fake-model").json()["default"] is True


@pytest.mark.parametrize("model", ["m" * 201, "bad%00id", "%20%20"])
def test_bad_model_ids_are_422(admin_gateway: GatewayHandle, model: str):
    assert _error(_put(admin_gateway, model, NEW_PRICE), 422)["param"] == "model"
    assert _error(_delete(admin_gateway, model), 422)["param"] == "model"


def test_not_json_is_a_client_error(admin_gateway: GatewayHandle):
    url = f"{admin_gateway.url}/v1/pricing/fake-model"
    response = httpx.put(
        url, content=b"{not json", headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500


# replicas


def test_a_replica_applies_another_replicas_change_after_its_refresh(
    start_fake: StartFake, start_gateway: StartGateway, tmp_path: Path
):
    fake = start_fake()
    shared = {
        "upstream_urls": [fake.url],
        "database_url": sqlite_url(tmp_path),
        "admin_token": ADMIN_TOKEN,
        "price_refresh_s": 0.1,
    }
    first, second = start_gateway(**shared), start_gateway(**shared)
    assert _put(first, "fake-model", NEW_PRICE).status_code == 200

    def second_sees(default: bool) -> bool:
        return _get(second, "/v1/pricing/fake-model").json()["default"] is default

    wait_until(lambda: second_sees(False), what="the second replica to read the new price")
    assert _get(second, "/v1/pricing/fake-model").json() == {
        "model": "fake-model",
        "default": False,
        **NEW_FIELDS,
    }
    assert _delete(second, "fake-model").status_code == 200
    wait_until(lambda: _get(first, "/v1/pricing/fake-model").json()["default"], what="the delete")


# the database away


@pytest.mark.integration
def test_a_database_outage_keeps_the_prices_and_refuses_changes_with_503(
    pg_database: str, start_fake: StartFake, start_gateway: StartGateway
):
    with TcpProxy(PG_HOST, PG_PORT) as proxy:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{pg_database}"
        gateway = start_gateway(
            upstream_urls=[start_fake().url],
            database_url=url,
            admin_token=ADMIN_TOKEN,
            price_refresh_s=0.1,
        )
        assert _put(gateway, "fake-model", NEW_PRICE).status_code == 200
        proxy.cut()

        error = _error(_put(gateway, "org/other", NEW_PRICE), 503)
        assert error["code"] == "prices_unavailable"
        assert _error(_delete(gateway, "fake-model"), 503)["code"] == "prices_unavailable"
        # Reading needs no database: the prices last read stay in use.
        entry = _get(gateway, "/v1/pricing/fake-model").json()
        assert entry == {"model": "fake-model", "default": False, **NEW_FIELDS}
        assert _get(gateway, "/v1/pricing").status_code == 200

        proxy.restore()
        wait_until(
            lambda: _delete(gateway, "fake-model").status_code == 200,
            what="changes to be taken again",
        )
        assert _get(gateway, "/v1/pricing/fake-model").json()["default"] is True


# costs


def test_usage_shows_what_the_requests_cost(admin_gateway: GatewayHandle):
    gateway = admin_gateway
    before = _get(gateway, "/v1/usage").json()
    assert before["cost"] == 0
    _put(
        gateway,
        "fake-model",
        {"prompt_tokens_price": "3", "completion_tokens_price": "7", "web_search_cost": "0"},
    )
    price = Price(3_000_000, 7_000_000, 0)
    client = gateway.client()
    expected = 0
    for _ in range(3):
        answer = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.usage is not None
        expected += price.cost(answer.usage.prompt_tokens, answer.usage.completion_tokens, 0)
    assert expected > 0
    usage = _get(gateway, "/v1/usage").json()
    assert usage["queries"] == 3
    assert usage["cost"] == amount_json(expected)


def test_usage_cost_is_read_from_the_database(
    start_fake: StartFake, start_gateway: StartGateway, tmp_path: Path
):
    url = sqlite_url(tmp_path)
    account, _, key = with_store(url, lambda store: create_tenant(store, "tenant"))

    async def write(store: SqlStore) -> None:
        logs = [query_log(account.id, 1, 1, cost_micro=c) for c in (1, 100_000, 2_000_000)]
        await store.write_logs(logs)

    with_store(url, write)
    gateway = start_gateway(upstream_urls=[start_fake().url], database_url=url)
    usage = _get(gateway, "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["queries"] == 3
    assert usage["cost"] == 2.100001

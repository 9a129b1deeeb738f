"""Collateral from a PCCS (PCS v4 wire format), cached until due, attached by the gateway."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from nilai.attestation.factory import make_attestation_provider
from nilai.attestation.pccs import (
    CollateralCache,
    CollateralFetchError,
    ReportCollateral,
    collateral_next_update,
    fetch_collateral,
    public_url,
    quote_identity,
    service_base,
)
from nilai.attestation.tdx import verify_tdx_quote
from nilai.attestation.tsm import TsmProvider
from nilai.attestation.verify import TdxPolicy, check_quote
from tests.fakes.pccs import FakePccs
from tests.support.fake_tsm import FakeConfigfs
from tests.support.servers import ServerThread
from tests.unit.attestation.tdx_sample import COLLATERAL, INSIDE_VALIDITY, QUOTE

NEXT_UPDATE = datetime(2025, 7, 19, 10, 0, 35, tzinfo=UTC)  # the PCK CRL's, the earliest


@pytest.fixture
def pccs() -> Iterator[tuple[FakePccs, str]]:
    fake = FakePccs(COLLATERAL)
    server = ServerThread(fake.app).start()
    yield fake, server.url
    server.stop()


def test_the_quote_names_its_fmspc_ca_and_tee():
    identity = quote_identity(QUOTE)
    assert (identity.fmspc, identity.ca, identity.tee) == ("B0C06F000000", "platform", "tdx")


async def test_fetched_collateral_is_the_samples_and_verifies(pccs):
    fake, url = pccs
    async with httpx.AsyncClient() as http:
        text = await fetch_collateral(http, f"{url}/tdx/certification/v4/", quote_identity(QUOTE))
    assert json.loads(text) == json.loads(COLLATERAL)
    assert fake.requests == [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/tdx/certification/v4/tcb?fmspc=B0C06F000000",
        "/tdx/certification/v4/qe/identity?update=standard",
        "/sgx/certification/v4/rootcacrl",
    ]
    assert verify_tdx_quote(QUOTE, text, now=INSIDE_VALIDITY).tcb_status == "UpToDate"


def test_service_base_accepts_the_api_path():
    for url in ("https://pccs.local/", "https://pccs.local/sgx/certification/v4"):
        assert service_base(url) == "https://pccs.local"


def test_urls_are_shown_without_credentials():
    assert public_url("https://user:secret@pccs.local:8081/base/?token=t") == (
        "https://pccs.local:8081/base"
    )


def test_next_update_is_the_earliest_of_the_four_pieces():
    assert collateral_next_update(COLLATERAL) == NEXT_UPDATE


async def test_collateral_is_cached_until_its_next_update_then_fetched_again(pccs):
    fake, url = pccs
    now = [INSIDE_VALIDITY]
    async with httpx.AsyncClient() as http:
        cache = CollateralCache(url, http, clock=lambda: now[0])
        identity = quote_identity(QUOTE)
        first = await cache.collateral(identity)
        assert await cache.collateral(identity) == first
        assert cache.fetches == 1
        now[0] = NEXT_UPDATE
        await cache.collateral(identity)
        assert cache.fetches == 2
    assert len(fake.requests) == 8


async def test_after_a_failure_the_service_is_not_asked_again_until_the_retry_time(pccs):
    fake, url = pccs
    fake.fail_status = 503
    now = [INSIDE_VALIDITY]
    async with httpx.AsyncClient() as http:
        cache = CollateralCache(url, http, retry_s=60, clock=lambda: now[0])
        identity = quote_identity(QUOTE)
        with pytest.raises(CollateralFetchError, match="answered 503"):
            await cache.collateral(identity)
        asked = len(fake.requests)
        fake.fail_status = None
        with pytest.raises(CollateralFetchError, match="not asked again before"):
            await cache.collateral(identity)
        assert len(fake.requests) == asked
        now[0] += timedelta(seconds=60)
        assert json.loads(await cache.collateral(identity)) == json.loads(COLLATERAL)
    assert cache.fetches == 2


async def test_a_service_slower_than_the_limit_is_a_fetch_error(pccs):
    fake, url = pccs
    fake.delay_s = 5.0
    async with httpx.AsyncClient() as http:
        cache = CollateralCache(url, http, timeout_s=0.2, clock=lambda: INSIDE_VALIDITY)
        with pytest.raises(CollateralFetchError, match=r"did not answer within 0\.2s"):
            await cache.collateral(quote_identity(QUOTE))


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_a_failing_service_is_a_fetch_error_naming_the_url(pccs, status):
    fake, url = pccs
    fake.fail_status = status
    async with httpx.AsyncClient() as http:
        with pytest.raises(CollateralFetchError, match=f"pckcrl answered {status}"):
            await fetch_collateral(http, url, quote_identity(QUOTE))


async def test_an_unknown_fmspc_is_a_fetch_error(pccs):
    fake, url = pccs
    fake.collateral["tcb_info"] = fake.collateral["tcb_info"].replace(
        "B0C06F000000", "00906ED50000"
    )
    async with httpx.AsyncClient() as http:
        with pytest.raises(CollateralFetchError, match="tcb answered 404"):
            await fetch_collateral(http, url, quote_identity(QUOTE))


def test_served_collateral_with_a_changed_bit_fails_verification(pccs):
    # The PCCS is not trusted: a changed signature fails the check, it cannot pass.
    fake, url = pccs
    signature = fake.collateral["qe_identity_signature"]
    fake.collateral["qe_identity_signature"] = f"{int(signature[0], 16) ^ 1:x}{signature[1:]}"
    result = check_quote(QUOTE, TdxPolicy(at=INSIDE_VALIDITY, pccs_url=url))
    assert result.failed is not None
    assert result.failed.name == "qe_identity_signature"


def test_check_quote_fetches_from_the_pccs_and_names_a_failure(pccs):
    fake, url = pccs
    result = check_quote(QUOTE, TdxPolicy(at=INSIDE_VALIDITY, pccs_url=url))
    assert result.ok
    assert [check.name for check in result.checks] == ["collateral", "tdx_quote", "tcb_status"]
    fake.fail_status = 503
    down = check_quote(QUOTE, TdxPolicy(at=INSIDE_VALIDITY, pccs_url=url))
    assert down.failed is not None
    assert down.failed.name == "collateral_missing"
    assert "503" in down.failed.detail


# --- the gateway's side: the tsm provider attaches collateral ------------------------------


class TdxConfigfs(FakeConfigfs):
    """configfs-tsm of a TDX guest that always returns the sample quote (not bound to any key)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(root, monkeypatch, provider="tdx_guest", auxblob=None)

    def _serve_quote(self, entry: Path) -> None:
        with (entry / "outblob").open("wb") as out:
            out.write(QUOTE)


async def test_tsm_attaches_the_configured_collateral_file(tmp_path, monkeypatch):
    fake = TdxConfigfs(tmp_path / "report", monkeypatch)
    path = tmp_path / "collateral.json"
    path.write_text(COLLATERAL)
    async with httpx.AsyncClient() as http:
        provider = make_attestation_provider(
            "tsm",
            signer=None,  # type: ignore[arg-type]  # tsm does not sign
            http=http,
            url=None,
            tsm_path=fake.root,
            timeout_s=5.0,
            collateral_path=path,
        )
        assert isinstance(provider, TsmProvider)
        evidence = await provider.report(b"\x01" * 32)
        await provider.aclose()
    assert base64.b64decode(evidence.cpu_attestation) == QUOTE
    assert evidence.details["tdx_collateral"] == COLLATERAL


async def test_tsm_attaches_pccs_collateral_and_only_the_hint_when_the_pccs_is_down(
    tmp_path, monkeypatch, pccs
):
    fake_pccs, url = pccs
    fake = TdxConfigfs(tmp_path / "report", monkeypatch)
    async with httpx.AsyncClient() as http:
        cache = CollateralCache(url, http, clock=lambda: INSIDE_VALIDITY)
        provider = TsmProvider(fake.root, timeout_s=5.0, collateral=ReportCollateral(cache=cache))
        evidence = await provider.report(b"\x01" * 32)
        assert json.loads(evidence.details["tdx_collateral"]) == json.loads(COLLATERAL)
        assert evidence.details["tdx_pccs_url"] == url
        late = CollateralCache(url, http, clock=lambda: NEXT_UPDATE)
        fake_pccs.fail_status = 503
        down = TsmProvider(fake.root, timeout_s=5.0, collateral=ReportCollateral(cache=late))
        hinted = await down.report(b"\x01" * 32)
        await provider.aclose()
        await down.aclose()
    assert "tdx_collateral" not in hinted.details
    assert hinted.details["tdx_pccs_url"] == url


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read"),
        (json.dumps({"tcb_info": "{}"}), "missing pck_crl_issuer_chain"),
    ],
)
async def test_an_unusable_collateral_file_stops_the_start(tmp_path, content, message):
    path = tmp_path / "collateral.json"
    path.write_text(content)
    async with httpx.AsyncClient() as http:
        make = functools.partial(
            make_attestation_provider,
            "tsm",
            signer=None,
            http=http,
            url=None,
            tsm_path=tmp_path,
            timeout_s=5.0,
            collateral_path=path,
        )
        with pytest.raises(ValueError, match=message):
            make()
        with pytest.raises(ValueError, match="not both"):
            make(pccs_url="http://127.0.0.1:1")

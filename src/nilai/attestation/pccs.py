"""Fetch a TDX quote's DCAP collateral from Intel's PCS or a PCCS (API v4), cached until due.

The collateral is what ``tdx.verify_tdx_quote`` checks a quote against: the PCK CRL and its
issuer chain, the root CA CRL, the TCB info and QE identity with their signatures and issuer
chains. Everything fetched here is *evidence*, not trust: each piece is signed by a key whose
chain ends at Intel's SGX Root CA (checked by dcap-qvl against its own copy), so a PCCS that
lies makes verification fail; it cannot make a bad quote pass.

Requests (``BASE`` is the service URL, ``TEE`` is ``tdx`` for TDX quotes, ``sgx`` for SGX):

- ``GET BASE/sgx/certification/v4/pckcrl?ca=<platform|processor>&encoding=der``: the PCK CRL
  (DER body), its issuer chain in the ``SGX-PCK-CRL-Issuer-Chain`` header;
- ``GET BASE/TEE/certification/v4/tcb?fmspc=<FMSPC>``: ``{"tcbInfo": {...}, "signature": hex}``,
  issuer chain in ``TCB-Info-Issuer-Chain`` (``SGX-TCB-Info-Issuer-Chain`` from SGX endpoints);
- ``GET BASE/TEE/certification/v4/qe/identity?update=standard``:
  ``{"enclaveIdentity": {...}, "signature": hex}``, issuer chain in
  ``SGX-Enclave-Identity-Issuer-Chain``;
- the root CA CRL: ``GET BASE/sgx/certification/v4/rootcacrl`` from a PCCS (hex or DER body);
  Intel's PCS has no such endpoint, so its CRL distribution point is used
  (``INTEL_ROOT_CA_CRL_URL``).

Issuer chains are URL-encoded PEM. The signed JSON objects are kept byte for byte as the service
sent them: their signatures cover those exact bytes.

The result is cached (per service, FMSPC, CA and TEE) until the earliest ``nextUpdate`` of its
TCB info, QE identity and two CRLs, then fetched again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import httpx

from nilai.attestation.tdx import QuoteVerificationError
from nilai.upstream.http import read_capped

logger = logging.getLogger(__name__)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
"""Intel's Provisioning Certification Service, the default collateral source."""
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
"""The CRL distribution point of Intel's SGX Root CA (used with Intel's PCS)."""
ATTACHED_COLLATERAL_KEY = "tdx_collateral"
"""Report ``details`` key of the TDX collateral the gateway attaches (JSON text; evidence)."""
PCCS_HINT_KEY = "tdx_pccs_url"
"""Report ``details`` key naming the PCCS the gateway fetches collateral from (a hint)."""
MAX_RESPONSE_BYTES = 1 << 20
"""Largest collateral piece accepted (real ones are a few KiB; the PCK CRL can reach ~100 KiB)."""

COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
"""The fields of the collateral JSON (dcap-qvl's ``QuoteCollateralV3``)."""

_API = "certification/v4"
_PCK_CRL_CHAIN = "SGX-PCK-CRL-Issuer-Chain"
_TCB_CHAINS = ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
_QE_CHAIN = "SGX-Enclave-Identity-Issuer-Chain"


class CollateralFetchError(Exception):
    """The collateral service could not be asked, or answered something unusable; says which."""


@dataclass(frozen=True, slots=True)
class QuoteIdentity:
    """What selects a quote's collateral: its platform family and the PCK certificate's CA."""

    fmspc: str
    """FMSPC, 12 uppercase hex digits, from the PCK certificate's Intel extension."""
    ca: str
    """``platform`` or ``processor``: which PCK CA issued the quote's PCK certificate."""
    tee: str
    """``tdx`` or ``sgx``: which TCB info and QE identity apply."""


def quote_identity(quote: bytes) -> QuoteIdentity:
    """Read the FMSPC, PCK CA and TEE of ``quote`` (not verified: only to pick collateral).

    Raises:
        QuoteVerificationError: ``check="quote_format"`` when the quote cannot be read.
        ImportError: dcap-qvl is not installed (the ``attest`` extra).
    """
    import dcap_qvl  # noqa: PLC0415  # pyright: ignore[reportMissingTypeStubs]

    try:
        parsed: Any = dcap_qvl.parse_quote(quote)  # Any: untyped binding
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca()).lower()
        tee = "tdx" if parsed.is_tdx() else "sgx"
    except ValueError as exc:
        raise QuoteVerificationError("quote_format", f"cannot read the quote: {exc}") from None
    return QuoteIdentity(fmspc=fmspc, ca=ca, tee=tee)


def public_url(url: str) -> str:
    """``url`` without user, password or query, which may hold credentials (SECURITY.md)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "the collateral service"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}".rstrip("/")


def service_base(url: str) -> str:
    """The service's base URL, accepting one that already ends in ``/sgx|tdx/certification/v4``."""
    base = url.strip().rstrip("/")
    for suffix in (f"/sgx/{_API}", f"/tdx/{_API}"):
        base = base.removesuffix(suffix)
    return base


async def fetch_collateral(
    http: httpx.AsyncClient, base_url: str, identity: QuoteIdentity, *, timeout_s: float = 30.0
) -> str:
    """Fetch the collateral for ``identity`` from the service at ``base_url``.

    Args:
        http: The client to use (the gateway's shared one, or the CLI's own).
        base_url: The PCS or PCCS URL, e.g. ``INTEL_PCS_URL``.
        identity: The quote's FMSPC, CA and TEE (``quote_identity``).
        timeout_s: The time limit for each request.

    Returns:
        The collateral as JSON, in the form ``tdx.verify_tdx_quote`` reads.

    Raises:
        CollateralFetchError: A request failed or its answer is not in the PCS v4 form.
    """
    base = service_base(base_url)
    sgx, tee = f"{base}/sgx/{_API}", f"{base}/{identity.tee}/{_API}"
    pck = await _get(http, f"{sgx}/pckcrl", {"ca": identity.ca, "encoding": "der"}, timeout_s)
    tcb = await _get(http, f"{tee}/tcb", {"fmspc": identity.fmspc}, timeout_s)
    qe = await _get(http, f"{tee}/qe/identity", {"update": "standard"}, timeout_s)
    if base == INTEL_PCS_URL:
        root = await _get(http, INTEL_ROOT_CA_CRL_URL, {}, timeout_s)
    else:
        root = await _get(http, f"{sgx}/rootcacrl", {}, timeout_s)
    return assemble_collateral(pck, tcb, qe, root)


@dataclass(frozen=True, slots=True)
class PcsResponse:
    """One collateral answer: its body and the headers that matter (names lowercased)."""

    url: str
    body: bytes
    headers: dict[str, str]

    def header(self, *names: str) -> str:
        """The first of ``names`` present, URL-decoded (issuer chains are URL-encoded PEM)."""
        for name in names:
            value = self.headers.get(name.lower())
            if value is not None:
                return urllib.parse.unquote(value)
        raise CollateralFetchError(f"{self.url} answered without the {names[0]} header")


async def _get(
    http: httpx.AsyncClient, url: str, params: dict[str, str], timeout_s: float
) -> PcsResponse:
    shown = public_url(url)
    try:
        async with http.stream(
            "GET", url, params=params, timeout=httpx.Timeout(timeout_s)
        ) as response:
            if response.status_code != HTTPStatus.OK:
                raise CollateralFetchError(f"{shown} answered {response.status_code}")
            body = await read_capped(response, MAX_RESPONSE_BYTES)
            if body is None:
                raise CollateralFetchError(f"{shown} sent more than {MAX_RESPONSE_BYTES} bytes")
            headers = {name.lower(): value for name, value in response.headers.items()}
    except httpx.HTTPError as exc:
        raise CollateralFetchError(f"cannot fetch {shown}: {type(exc).__name__}") from None
    return PcsResponse(shown, bytes(body), headers)


def assemble_collateral(
    pck_crl: PcsResponse, tcb: PcsResponse, qe_identity: PcsResponse, root_ca_crl: PcsResponse
) -> str:
    """The collateral JSON (dcap-qvl's ``QuoteCollateralV3`` form) from the four answers.

    Raises:
        CollateralFetchError: An answer is not in the PCS v4 form.
    """
    tcb_info, tcb_signature = _signed_object(tcb, "tcbInfo")
    qe, qe_signature = _signed_object(qe_identity, "enclaveIdentity")
    return json.dumps(
        {
            "pck_crl_issuer_chain": pck_crl.header(_PCK_CRL_CHAIN),
            "root_ca_crl": _crl_der(root_ca_crl).hex(),
            "pck_crl": _crl_der(pck_crl).hex(),
            "tcb_info_issuer_chain": tcb.header(*_TCB_CHAINS),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": qe_identity.header(_QE_CHAIN),
            "qe_identity": qe,
            "qe_identity_signature": qe_signature,
        }
    )


def _crl_der(response: PcsResponse) -> bytes:
    """A CRL body as DER: PCCS sends the root CA CRL as hex text, Intel sends DER."""
    body = response.body.strip()
    if body[:1] == b"\x30":  # a DER SEQUENCE; hex text starts with a digit or letter
        return response.body
    try:
        return bytes.fromhex(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise CollateralFetchError(f"{response.url} answered neither a DER nor a hex CRL") from None


def _signed_object(response: PcsResponse, key: str) -> tuple[str, str]:
    """The exact text of ``key``'s object in the answer, and the hex signature over it."""
    try:
        raw = response.body.decode()
        members = _top_level_members(raw)
    except (UnicodeDecodeError, ValueError):
        raise CollateralFetchError(f"{response.url} answered something that is not JSON") from None
    text, signature = members.get(key), members.get("signature")
    if text is None or not text.startswith("{") or signature is None:
        raise CollateralFetchError(f"{response.url} answered without {key} and signature")
    value: object = json.loads(signature)
    if not isinstance(value, str):
        raise CollateralFetchError(f"{response.url} answered a signature that is not a string")
    return text, value


def _top_level_members(text: str) -> dict[str, str]:
    """Each member of a JSON object mapped to its value's exact source text."""
    decoder = json.JSONDecoder()

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    at = skip(0)
    if text[at : at + 1] != "{":
        raise ValueError("not an object")
    members: dict[str, str] = {}
    at = skip(at + 1)
    while text[at : at + 1] != "}":
        name, at = decoder.raw_decode(text, at)
        at = skip(at)
        if text[at : at + 1] != ":":
            raise ValueError("expected ':'")
        start = skip(at + 1)
        _, end = decoder.raw_decode(text, start)
        members[str(name)] = text[start:end]
        at = skip(end)
        if text[at : at + 1] == ",":
            at = skip(at + 1)
        elif text[at : at + 1] != "}":
            raise ValueError("expected ',' or '}'")
    return members


def collateral_next_update(collateral: str) -> datetime:
    """The earliest ``nextUpdate`` of the collateral's TCB info, QE identity and CRLs.

    After that time the collateral is expired and verification fails, so it must be fetched
    again.

    Raises:
        ValueError: The collateral does not have these pieces in readable form.
    """
    document = cast(dict[str, Any], json.loads(collateral))  # Any: checked piece by piece
    times: list[datetime] = []
    for name in ("tcb_info", "qe_identity"):
        signed = cast(dict[str, Any], json.loads(str(document[name])))
        times.append(_iso_time(str(signed["nextUpdate"])))
    times.extend(
        crl_next_update(bytes.fromhex(str(document[name]))) for name in ("pck_crl", "root_ca_crl")
    )
    return min(times)


def _iso_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def crl_next_update(der: bytes) -> datetime:
    """The ``nextUpdate`` of a DER X.509 CRL (RFC 5280 §5.1).

    Raises:
        ValueError: Not a CRL with a ``nextUpdate``.
    """
    _, start, _ = _tlv(der, 0)  # CertificateList
    tag, at, end = _tlv(der, start)  # TBSCertList
    if tag != 0x30:  # noqa: PLR2004 - SEQUENCE
        raise ValueError("not a CRL")
    tag, _, after = _tlv(der, at)
    if tag == 0x02:  # noqa: PLR2004 - the optional version INTEGER
        at = after
    for _skipped in ("signature", "issuer", "thisUpdate"):
        _, _, at = _tlv(der, at)
    tag, value_start, value_end = _tlv(der, at)
    if at >= end or tag not in (0x17, 0x18):  # UTCTime, GeneralizedTime
        raise ValueError("the CRL has no nextUpdate")
    return _asn1_time(tag, der[value_start:value_end].decode("ascii"))


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """Tag, start and end of the content of the DER element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _asn1_time(tag: int, text: str) -> datetime:
    if tag == 0x17:  # noqa: PLR2004 - UTCTime: two-digit years, 1950-2049
        year = int(text[:2])
        text = f"{19 if year >= 50 else 20}{text}"  # noqa: PLR2004
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


class CollateralCache:
    """Collateral from one PCS/PCCS, kept until its earliest ``nextUpdate``, then fetched again.

    Concurrent callers for the same quote identity share one fetch. After a failed fetch the
    service is not asked again for ``retry_s`` (the failure is repeated meanwhile), so that
    reports do not each wait for a service that is down; collateral that is already due when
    fetched is likewise kept ``retry_s`` before it is asked for again.
    """

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = 30.0,
        retry_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.base_url = service_base(base_url)
        self.public_url = public_url(self.base_url)
        """``base_url`` without credentials: what errors, logs and report hints show."""
        self._http = http
        self._timeout_s = timeout_s
        self._retry = timedelta(seconds=retry_s)
        self._clock = clock
        self._entries: dict[QuoteIdentity, tuple[str, datetime]] = {}
        self._failures: dict[QuoteIdentity, tuple[str, datetime]] = {}
        self._locks: dict[QuoteIdentity, asyncio.Lock] = {}
        self.fetches = 0
        """How many times the service was asked (for tests and metrics)."""

    async def collateral(self, identity: QuoteIdentity) -> str:
        """The collateral for ``identity``: cached while before its ``nextUpdate``, else fetched.

        Raises:
            CollateralFetchError: It had to be fetched and the fetch failed (now, or less than
                ``retry_s`` ago).
        """
        cached = self._fresh(identity)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(identity, asyncio.Lock())
        async with lock:
            cached = self._fresh(identity)  # another caller may have fetched it meanwhile
            if cached is not None:
                return cached
            failure = self._failures.get(identity)
            if failure is not None and self._clock() < failure[1]:
                raise CollateralFetchError(f"{failure[0]} (not asked again before {failure[1]})")
            try:
                text, due = await self._fetch(identity)
            except CollateralFetchError as exc:
                self._failures[identity] = (str(exc), self._clock() + self._retry)
                raise
            self._failures.pop(identity, None)
            self._entries[identity] = (text, max(due, self._clock() + self._retry))
            return text

    async def _fetch(self, identity: QuoteIdentity) -> tuple[str, datetime]:
        self.fetches += 1
        try:
            # One limit for the four requests together, so a slow service counts as a failure.
            async with asyncio.timeout(self._timeout_s):
                text = await fetch_collateral(
                    self._http, self.base_url, identity, timeout_s=self._timeout_s
                )
        except TimeoutError:
            raise CollateralFetchError(
                f"{self.public_url} did not answer within {self._timeout_s:.1f}s"
            ) from None
        try:
            return text, collateral_next_update(text)
        except (ValueError, KeyError, TypeError):
            raise CollateralFetchError(
                f"{self.public_url} sent collateral without readable nextUpdate times"
            ) from None

    def _fresh(self, identity: QuoteIdentity) -> str | None:
        entry = self._entries.get(identity)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        return None


class ReportCollateral:
    """What the gateway attaches to a TDX quote's report so clients can verify it offline.

    ``fixed``: collateral read from ``NILAI_ATTESTATION_COLLATERAL`` at start, attached as is.
    ``cache``: collateral fetched from ``NILAI_ATTESTATION_PCCS_URL`` (cached until due); its
    URL is attached as a hint too, and alone when the fetch fails (the report is still served:
    a client can fetch the collateral itself). Attaching collateral adds no trust in the
    operator: clients check every piece of it to Intel's root.
    """

    def __init__(self, *, fixed: str | None = None, cache: CollateralCache | None = None) -> None:
        self._fixed = fixed
        self._cache = cache

    async def details(self, quote: bytes) -> dict[str, str]:
        """The ``details`` entries for a report carrying ``quote`` (a TDX quote)."""
        if self._fixed is not None:
            return {ATTACHED_COLLATERAL_KEY: self._fixed}
        if self._cache is None:
            return {}
        hint = {PCCS_HINT_KEY: self._cache.public_url}
        try:
            text = await self._cache.collateral(quote_identity(quote))
        except (CollateralFetchError, QuoteVerificationError) as exc:
            logger.warning("no TDX collateral attached to the report: %s", exc)
            return hint
        return {ATTACHED_COLLATERAL_KEY: text, **hint}


def read_collateral_file(path: Path) -> str:
    """Read and sanity-check ``NILAI_ATTESTATION_COLLATERAL`` (verified by clients, not here).

    Raises:
        ValueError: Unreadable, not JSON, or without the collateral's fields.
    """
    try:
        text = path.read_text()
        value: object = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"NILAI_ATTESTATION_COLLATERAL: cannot read {path}: {reason}") from None
    missing = [
        name for name in COLLATERAL_FIELDS if not isinstance(value, dict) or name not in value
    ]
    if missing:
        raise ValueError(
            f"NILAI_ATTESTATION_COLLATERAL: {path} is not DCAP collateral JSON "
            f"(missing {', '.join(missing)})"
        )
    return text

"""A nilCC-style attester reached over HTTP (a sidecar in the confidential VM).

Assumed contract (the attester is operator-configured, ``NILAI_ATTESTATION_URL``):

- Request: ``GET <url>?nonce=<hex>`` where ``<hex>`` is the 64-character hex of the 32-byte
  ``report_data``; the attester places those bytes in the hardware report's user-data field
  (zero-padded to the field's size).
- Response: ``200`` with a JSON object. CPU evidence is read from ``cpu_attestation``, or
  from ``report`` when that is absent; GPU evidence from ``gpu_attestation``, or from
  ``gpu_token`` when that is absent (null or missing means no GPU evidence). Each value is a
  string (kept as is) or a JSON object (kept as its canonical JSON text). If the attester
  echoes ``nonce`` or ``report_data`` (hex), it must equal what was sent. Other keys are
  ignored. Bodies over 1 MiB are refused.
- The CPU evidence must carry the ``report_data`` it was asked for, where a client can find
  it (``quotes.attester_user_data``): a JSON report with a top-level ``report_data`` (hex, or
  an array of byte values, zero-padded to 64 bytes or not), or base64 of an SEV-SNP report or
  TDX quote. Evidence that does not is refused here, as every client would refuse it.

Failures never reach the client in detail: unreachable attester, error status or unusable
body → 502; no answer within the time limit → 504. The log says which, without bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

import httpx

from nilai.attestation.base import Evidence
from nilai.attestation.quotes import QuoteFormatError, attester_user_data
from nilai.crypto.canonical import canonical_json
from nilai.errors import UpstreamProtocolError, UpstreamTimeout
from nilai.upstream.http import read_capped

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
_CPU_KEYS = ("cpu_attestation", "report")
_GPU_KEYS = ("gpu_attestation", "gpu_token")


class HttpAttester:
    """Asks the attester at ``url`` for evidence, through the process's shared client."""

    name = "http"
    simulated = False

    def __init__(self, url: str, http: httpx.AsyncClient, *, timeout_s: float) -> None:
        self._url = httpx.URL(url)
        self._host = self._url.host  # logged instead of the URL, which may hold a token
        self._http = http
        self._timeout_s = timeout_s

    async def report(self, report_data: bytes) -> Evidence:
        """Fetch evidence over ``report_data``; 502 when unusable, 504 when too slow."""
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._fetch(report_data.hex())
        except (TimeoutError, httpx.TimeoutException):
            logger.warning("attester %s did not answer within %.1fs", self._host, self._timeout_s)
            raise UpstreamTimeout(
                "The attestation service did not answer in time.", code="attestation_timeout"
            ) from None
        except (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol) as exc:
            logger.warning("attester %s unreachable: %s", self._host, type(exc).__name__)
            raise UpstreamProtocolError(
                "The attestation service is unreachable.", code="attester_unreachable"
            ) from None
        except httpx.HTTPError as exc:
            logger.warning("attester %s broke off: %s", self._host, type(exc).__name__)
            raise _invalid() from None
        return parse_evidence(raw, report_data)

    async def _fetch(self, nonce_hex: str) -> bytes:
        timeout = httpx.Timeout(self._timeout_s)
        # Merged by hand: httpx's ``params`` would replace a query the operator configured.
        url = self._url.copy_merge_params({"nonce": nonce_hex})
        async with self._http.stream("GET", url, timeout=timeout) as response:
            if response.status_code != HTTPStatus.OK:
                logger.warning("attester %s answered %d", self._host, response.status_code)
                raise _invalid("The attestation service returned an error.")
            body = await read_capped(response, MAX_BODY_BYTES)
            if body is None:
                logger.warning("attester %s sent more than %d bytes", self._host, MAX_BODY_BYTES)
                raise _invalid()
            return body


def parse_evidence(raw: bytes, report_data: bytes) -> Evidence:
    """Read the attester's JSON answer (shape in the module docstring) into ``Evidence``.

    Raises:
        UpstreamProtocolError: The answer is not that shape, or echoes other report data.
    """
    try:
        obj: Any = json.loads(raw)  # Any: untrusted JSON, checked below
    except ValueError:
        logger.warning("attester answer is not JSON")
        raise _invalid() from None
    if not isinstance(obj, dict):
        logger.warning("attester answer is not a JSON object")
        raise _invalid()
    answer: dict[str, Any] = obj  # pyright: ignore[reportUnknownVariableType]
    for echo in ("nonce", "report_data"):
        value = answer.get(echo)
        if value is not None and (not isinstance(value, str) or value.lower() != report_data.hex()):
            logger.warning("attester echoed a different %s", echo)
            raise _invalid()
    cpu = _evidence_text(_first(answer, _CPU_KEYS))
    if cpu is None:
        logger.warning("attester answer has no CPU evidence")
        raise _invalid()
    _require_report_data(cpu, report_data)
    return Evidence(cpu_attestation=cpu, gpu_attestation=_evidence_text(_first(answer, _GPU_KEYS)))


def _require_report_data(cpu: str, report_data: bytes) -> None:
    """Refuse CPU evidence that does not carry ``report_data`` where a client would look."""
    try:
        found = attester_user_data(cpu)
    except QuoteFormatError as exc:
        logger.warning("attester evidence carries no report_data: %s", exc)
        raise _invalid() from None
    if not found.holds(report_data):
        logger.warning("attester evidence's %s is not the report_data sent", found.field)
        raise _invalid()


def _first(answer: dict[str, Any], keys: tuple[str, ...]) -> object:
    for key in keys:
        if answer.get(key) is not None:
            return answer[key]
    return None


def _evidence_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        return canonical_json(value).decode()
    logger.warning("attester evidence is neither a string nor a JSON object")
    raise _invalid()


def _invalid(
    message: str = "The attestation service returned an invalid report.",
) -> UpstreamProtocolError:
    return UpstreamProtocolError(message, code="attester_invalid_response")

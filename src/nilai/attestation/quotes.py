"""Where each kind of evidence carries ``report_data``, read without trusting the evidence.

A hardware quote holds 64 bytes of user data chosen by the guest; nilai puts its 32-byte
``report_data`` there, zero-padded. This module finds that field in:

- an AMD SEV-SNP attestation report (``REPORT_DATA`` at offset 0x50 of the 0x4A0-byte report);
- an Intel TDX quote, version 4 or 5 (``REPORTDATA``, 520 bytes into the TD report body, which
  follows the 48-byte header; version 5 puts a 6-byte body descriptor before the body);
- an attester's JSON report with a top-level ``report_data`` (hex, or an array of byte values
  as nilCC's attester writes the SEV-SNP report).

Finding the field proves only that the evidence *claims* this binding: whether the quote is
genuine (its signature chain, TCB and measurements) is a separate check this module does not do.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from nilai.protocol.base import json_object

USER_DATA_SIZE = 64
"""Bytes of the quote's user-data field (SEV-SNP ``REPORT_DATA``, TDX ``REPORTDATA``)."""
SEV_SNP_REPORT_SIZE = 0x4A0
SEV_SNP_REPORT_DATA_OFFSET = 0x50
TDX_TEE_TYPE = 0x81
TDX_HEADER_SIZE = 48
TDX_BODY_DESCRIPTOR_SIZE = 6
TDX_REPORT_DATA_IN_BODY = 520
TDX_REPORT_DATA_OFFSETS = {
    4: TDX_HEADER_SIZE + TDX_REPORT_DATA_IN_BODY,
    5: TDX_HEADER_SIZE + TDX_BODY_DESCRIPTOR_SIZE + TDX_REPORT_DATA_IN_BODY,
}
TSM_BACKENDS = ("sev_guest", "tdx_guest")
"""The configfs-tsm ``provider`` values whose quotes this module can read."""
_JSON_REPORT_DATA_SIZES = (32, USER_DATA_SIZE)


class QuoteFormatError(Exception):
    """The evidence is not in a form whose ``report_data`` can be found; says why."""


@dataclass(frozen=True, slots=True)
class UserData:
    """The user-data field found in a piece of evidence, and where it was found."""

    source: str
    """What held it, in words: ``SEV-SNP report``, ``TDX quote`` or ``attester JSON report``."""
    field: str
    """The field's name in that format (``REPORT_DATA``, ``REPORTDATA``, ``report_data``)."""
    value: bytes

    def holds(self, report_data: bytes) -> bool:
        """Whether the field is ``report_data``, zero-padded to the field's size."""
        return self.value.ljust(USER_DATA_SIZE, b"\0") == report_data.ljust(USER_DATA_SIZE, b"\0")


def tsm_user_data(quote: bytes, backend: str) -> UserData:
    """The user-data field of a configfs-tsm quote produced by ``backend``.

    Raises:
        QuoteFormatError: An unknown backend, or a quote that is not that backend's format.
    """
    if backend == "sev_guest":
        return sev_snp_user_data(quote)
    if backend == "tdx_guest":
        return tdx_user_data(quote)
    shown = backend or "none"
    raise QuoteFormatError(
        f"unknown TSM backend {shown!r}: only {' and '.join(TSM_BACKENDS)} quotes can be read"
    )


def sev_snp_user_data(report: bytes) -> UserData:
    """``REPORT_DATA`` of an SEV-SNP attestation report.

    Raises:
        QuoteFormatError: The report is shorter than an SEV-SNP report.
    """
    if len(report) < SEV_SNP_REPORT_SIZE:
        raise QuoteFormatError(
            f"the SEV-SNP report is too short ({len(report)} bytes, not {SEV_SNP_REPORT_SIZE})"
        )
    start = SEV_SNP_REPORT_DATA_OFFSET
    return UserData("SEV-SNP report", "REPORT_DATA", report[start : start + USER_DATA_SIZE])


def tdx_user_data(quote: bytes) -> UserData:
    """``REPORTDATA`` of a TDX quote (version 4 or 5).

    Raises:
        QuoteFormatError: Not a TDX quote of a known version, or too short.
    """
    if len(quote) < TDX_HEADER_SIZE:
        raise QuoteFormatError(f"the TDX quote is too short ({len(quote)} bytes)")
    version = int.from_bytes(quote[0:2], "little")
    tee_type = int.from_bytes(quote[4:8], "little")
    if tee_type != TDX_TEE_TYPE:
        raise QuoteFormatError(f"not a TDX quote (TEE type {tee_type:#x}, not {TDX_TEE_TYPE:#x})")
    start = TDX_REPORT_DATA_OFFSETS.get(version)
    if start is None:
        raise QuoteFormatError(f"TDX quote version {version} is unknown (4 and 5 are read)")
    if len(quote) < start + USER_DATA_SIZE:
        raise QuoteFormatError(f"the TDX quote is too short ({len(quote)} bytes)")
    return UserData("TDX quote", "REPORTDATA", quote[start : start + USER_DATA_SIZE])


def attester_user_data(text: str) -> UserData:
    """The user-data field of evidence from an ``http`` attester.

    The evidence is either a JSON object with a top-level ``report_data`` (64 or 128 hex
    digits, or an array of 32 or 64 byte values), or base64 of a TDX quote or an SEV-SNP
    report.

    Raises:
        QuoteFormatError: The evidence is neither, or carries no readable ``report_data``.
    """
    obj = _json_object(text)
    if obj is not None:
        if "report_data" not in obj:
            raise QuoteFormatError("the attester's JSON report has no report_data")
        value = _json_bytes(obj["report_data"])
        if value is None:
            raise QuoteFormatError(
                "the attester's report_data is neither 32 or 64 bytes of hex nor of byte values"
            )
        return UserData("attester JSON report", "report_data", value)
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise QuoteFormatError(
            "the attester's evidence is neither a JSON report nor a base64 quote"
        ) from None
    if len(raw) >= 8 and int.from_bytes(raw[4:8], "little") == TDX_TEE_TYPE:  # noqa: PLR2004
        return tdx_user_data(raw)
    if len(raw) == SEV_SNP_REPORT_SIZE:
        return sev_snp_user_data(raw)
    raise QuoteFormatError(
        f"the attester's evidence is {len(raw)} bytes, neither a TDX quote nor an SEV-SNP report"
    )


def _json_object(text: str) -> dict[str, object] | None:
    try:
        return json_object(json.loads(text))
    except ValueError:
        return None


def _json_bytes(value: object) -> bytes | None:
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return None
        # fromhex skips spaces; a field must be the digits alone.
        return raw if len(value) == 2 * len(raw) and len(raw) in _JSON_REPORT_DATA_SIZES else None
    if isinstance(value, list):
        items: list[object] = value  # pyright: ignore[reportUnknownVariableType]
        if len(items) not in _JSON_REPORT_DATA_SIZES:
            return None
        raw = bytearray()
        for item in items:
            # bool is an int subclass: true and false are not byte values.
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 0xFF:  # noqa: PLR2004
                return None
            raw.append(item)
        return bytes(raw)
    return None

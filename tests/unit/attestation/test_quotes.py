"""Reading report_data out of each evidence format, without trusting the evidence."""

import json
from pathlib import Path

import pytest

from nilai.attestation.quotes import (
    QuoteFormatError,
    UserData,
    attester_user_data,
    tdx_user_data,
    tsm_user_data,
)
from tests.support.fake_tsm import fake_sev_snp_report

TDX_SAMPLE = Path(__file__).parent / "samples" / "tdx_quote"
# As other parsers of this dcap-qvl sample read it (quote v4, offset 568).
TDX_SAMPLE_REPORT_DATA = bytes.fromhex(
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)
DATA = bytes(range(32))


def test_a_real_tdx_quote_has_its_reportdata_read_at_the_v4_offset():
    quote = TDX_SAMPLE.read_bytes()
    assert tdx_user_data(quote).value == TDX_SAMPLE_REPORT_DATA
    assert tsm_user_data(quote, "tdx_guest").value == TDX_SAMPLE_REPORT_DATA
    # Its version 4 header and TEE type 0x81 are what make it a TDX quote.
    with pytest.raises(QuoteFormatError, match="version 3 is unknown"):
        tdx_user_data(b"\x03\x00" + quote[2:])
    with pytest.raises(QuoteFormatError, match="not a TDX quote"):
        tdx_user_data(quote[:4] + b"\x00\x00\x00\x00" + quote[8:])


def test_sev_snp_report_data_is_read_at_0x50():
    found = tsm_user_data(fake_sev_snp_report(DATA), "sev_guest")
    assert found == UserData("SEV-SNP report", "REPORT_DATA", DATA.ljust(64, b"\0"))
    assert found.holds(DATA)
    assert not found.holds(bytes(32))


@pytest.mark.parametrize("text", [json.dumps({"report_data": DATA.hex()[:-1] + " "}), "[1, 2]"])
def test_attester_json_without_a_clean_report_data_is_refused(text):
    with pytest.raises(QuoteFormatError):
        attester_user_data(text)

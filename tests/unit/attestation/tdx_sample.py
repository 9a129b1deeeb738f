"""The public Intel TDX sample quote and its collateral (``samples/``), and what it holds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"
QUOTE_PATH = SAMPLES / "tdx_quote"
QUOTE = QUOTE_PATH.read_bytes()
COLLATERAL = (SAMPLES / "tdx_quote_collateral.json").read_text()
INSIDE_VALIDITY = datetime(2025, 7, 1, tzinfo=UTC)
"""A time inside the collateral's validity (2025-06-19 to 2025-07-19)."""

# The sample's verified TD report, as other parsers of this public sample also read it.
MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
RTMR0 = (
    "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
    "48aca29b220b80b6a540cf994b9bc9c0"
)
RTMR1 = (
    "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7"
    "aea8c323c173019b3093d54e579e9378"
)
RTMR2 = (
    "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3"
    "ba80b70870d7330733642e01d48c3132"
)
RTMR3 = "00" * 48
REPORT_DATA = (
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)

"""A loopback stand-in for an Intel PCCS (PCS API v4) serving one quote's collateral.

What it speaks (Intel's "Provisioning Certification Service for ECDSA Attestation", API v4, and
the PCCS that caches it):

- ``GET /sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der``: the PCK CRL as DER,
  its issuer chain URL-encoded in ``SGX-PCK-CRL-Issuer-Chain``.
- ``GET /tdx/certification/v4/tcb?fmspc=<12 hex>`` (and ``/sgx/...``): ``{"tcbInfo": {...},
  "signature": "<hex>"}``, issuer chain in ``TCB-Info-Issuer-Chain`` (``SGX-TCB-Info-Issuer-Chain``
  on the SGX path), as Intel sends them; an unknown FMSPC is ``404``.
- ``GET /tdx/certification/v4/qe/identity?update=standard``: ``{"enclaveIdentity": {...},
  "signature": "<hex>"}``, issuer chain in ``SGX-Enclave-Identity-Issuer-Chain``.
- ``GET /sgx/certification/v4/rootcacrl``: the root CA CRL as hex text (as a PCCS answers it).

The signed objects are sent byte for byte as they are in the collateral (their signatures cover
those bytes). Each answer also carries ``Request-ID``, as Intel's do.

Test controls (Python attributes, not HTTP): ``requests`` lists each request path and query in
order; ``fail_status`` (an int) makes every request answer that status; ``delay_s`` holds every
answer that long; ``collateral`` can be replaced to serve other collateral.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def encoded(pem: str) -> str:
    """A PEM chain as Intel puts it in a header: URL-encoded, nothing left unescaped."""
    return quote(pem, safe="")


class FakePccs:
    """Serves the pieces of ``collateral`` (dcap-qvl's JSON form) in the PCS v4 wire format."""

    def __init__(self, collateral: str) -> None:
        self.collateral: dict[str, Any] = json.loads(collateral)
        self.requests: list[str] = []
        self.fail_status: int | None = None
        self.delay_s = 0.0
        routes = [
            Route("/sgx/certification/v4/pckcrl", self.pck_crl),
            Route("/sgx/certification/v4/rootcacrl", self.root_ca_crl),
            Route("/{tee:str}/certification/v4/tcb", self.tcb_info),
            Route("/{tee:str}/certification/v4/qe/identity", self.qe_identity),
        ]
        self.app = Starlette(routes=routes)

    @property
    def fmspc(self) -> str:
        """The FMSPC of the served TCB info."""
        return str(json.loads(self.collateral["tcb_info"])["fmspc"]).upper()

    async def _record(self, request: Request) -> Response | None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        query = f"?{request.url.query}" if request.url.query else ""
        self.requests.append(f"{request.url.path}{query}")
        if self.fail_status is not None:
            return Response(b"", status_code=self.fail_status)
        return None

    def _headers(self, **chains: str) -> dict[str, str]:
        headers = {"Request-ID": uuid.uuid4().hex}
        headers.update({name.replace("_", "-"): encoded(pem) for name, pem in chains.items()})
        return headers

    async def pck_crl(self, request: Request) -> Response:
        """The PCK CRL (DER) for ``ca``; its issuer chain in the header."""
        if (failed := await self._record(request)) is not None:
            return failed
        if request.query_params.get("ca") not in ("platform", "processor"):
            return Response(b"", status_code=400)
        return Response(
            bytes.fromhex(self.collateral["pck_crl"]),
            media_type="application/pkix-crl",
            headers=self._headers(SGX_PCK_CRL_Issuer_Chain=self.collateral["pck_crl_issuer_chain"]),
        )

    async def root_ca_crl(self, request: Request) -> Response:
        """The root CA CRL as hex text, as a PCCS serves it."""
        if (failed := await self._record(request)) is not None:
            return failed
        return Response(self.collateral["root_ca_crl"], headers=self._headers())

    async def tcb_info(self, request: Request) -> Response:
        """``{"tcbInfo": ..., "signature": ...}`` for a known FMSPC; 404 for another."""
        if (failed := await self._record(request)) is not None:
            return failed
        if request.query_params.get("fmspc", "").upper() != self.fmspc:
            return Response(b"", status_code=404)
        body = '{"tcbInfo":%s,"signature":"%s"}' % (  # noqa: UP031 - exact bytes of tcbInfo
            self.collateral["tcb_info"],
            self.collateral["tcb_info_signature"],
        )
        chain = self.collateral["tcb_info_issuer_chain"]
        name = (
            "TCB_Info_Issuer_Chain"
            if request.path_params["tee"] == "tdx"
            else ("SGX_TCB_Info_Issuer_Chain")
        )
        return Response(body, media_type="application/json", headers=self._headers(**{name: chain}))

    async def qe_identity(self, request: Request) -> Response:
        """``{"enclaveIdentity": ..., "signature": ...}`` with its issuer chain."""
        if (failed := await self._record(request)) is not None:
            return failed
        body = '{"enclaveIdentity":%s,"signature":"%s"}' % (  # noqa: UP031 - exact bytes
            self.collateral["qe_identity"],
            self.collateral["qe_identity_signature"],
        )
        chain = self.collateral["qe_identity_issuer_chain"]
        return Response(
            body,
            media_type="application/json",
            headers=self._headers(SGX_Enclave_Identity_Issuer_Chain=chain),
        )

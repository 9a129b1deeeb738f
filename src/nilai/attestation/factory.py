"""Choose the attestation provider from the operator's settings, refusing unusable ones."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from nilai.attestation.base import AttestationProvider
from nilai.attestation.http import HttpAttester
from nilai.attestation.pccs import CollateralCache, ReportCollateral, read_collateral_file
from nilai.attestation.simulated import SimulatedProvider
from nilai.attestation.tsm import TsmProvider
from nilai.crypto.keys import Signer

logger = logging.getLogger(__name__)

PROVIDERS = ("simulated", "http", "tsm")


def make_attestation_provider(
    provider: str,
    *,
    signer: Signer,
    http: httpx.AsyncClient,
    url: str | None,
    tsm_path: Path | str,
    timeout_s: float,
    collateral_path: Path | str | None = None,
    pccs_url: str | None = None,
) -> AttestationProvider:
    """Build the provider named ``provider`` (``simulated``, ``http`` or ``tsm``).

    Args:
        provider: ``NILAI_ATTESTATION_PROVIDER``.
        signer: The gateway's signer (signs simulated evidence).
        http: The process's shared HTTP client (used by ``http``).
        url: ``NILAI_ATTESTATION_URL``, the attester for ``http``.
        tsm_path: ``NILAI_ATTESTATION_TSM_PATH``, the configfs-tsm report directory.
        timeout_s: ``NILAI_ATTESTATION_TIMEOUT_S``, the time limit for one report.
        collateral_path: ``NILAI_ATTESTATION_COLLATERAL``: TDX collateral (JSON) that ``tsm``
            attaches to its reports; read here, once.
        pccs_url: ``NILAI_ATTESTATION_PCCS_URL``: the PCS/PCCS that ``tsm`` fetches TDX
            collateral from (on ``http``, cached until due) to attach to its reports.

    Returns:
        The provider.

    Raises:
        ValueError: The name is unknown, or the provider lacks what it needs.
    """
    if timeout_s <= 0:
        raise ValueError(f"NILAI_ATTESTATION_TIMEOUT_S must be positive, not {timeout_s}")
    if provider != "tsm" and (collateral_path or pccs_url):
        logger.warning(
            "NILAI_ATTESTATION_COLLATERAL and NILAI_ATTESTATION_PCCS_URL apply to the tsm "
            "provider only; ignored for %s",
            provider,
        )
    if provider == "simulated":
        logger.warning("attestation is SIMULATED: reports carry no hardware guarantee")
        return SimulatedProvider(signer)
    if provider == "http":
        if not url:
            raise ValueError(
                "NILAI_ATTESTATION_PROVIDER=http needs NILAI_ATTESTATION_URL "
                "(the attester's report URL)"
            )
        if not url.startswith(("http://", "https://")):
            # Not quoted: the URL may carry user:password@ (SECURITY.md, secrets hygiene).
            raise ValueError("NILAI_ATTESTATION_URL must start with http:// or https://")
        return HttpAttester(url, http, timeout_s=timeout_s)
    if provider == "tsm":
        root = Path(tsm_path)
        if not root.is_dir():
            raise ValueError(
                f"NILAI_ATTESTATION_PROVIDER=tsm: {root} is not a directory; this needs a "
                "SEV-SNP or TDX guest with configfs mounted and TSM reports in the kernel "
                "(or set NILAI_ATTESTATION_TSM_PATH)"
            )
        collateral = _report_collateral(collateral_path, pccs_url, http, timeout_s)
        return TsmProvider(root, timeout_s=timeout_s, collateral=collateral)
    raise ValueError(
        f"NILAI_ATTESTATION_PROVIDER={provider!r} is unknown; use one of {', '.join(PROVIDERS)}"
    )


def _report_collateral(
    path: Path | str | None, pccs_url: str | None, http: httpx.AsyncClient, timeout_s: float
) -> ReportCollateral | None:
    if path and pccs_url:
        raise ValueError("set NILAI_ATTESTATION_COLLATERAL or NILAI_ATTESTATION_PCCS_URL, not both")
    if path:
        return ReportCollateral(fixed=read_collateral_file(Path(path)))
    if pccs_url:
        if not pccs_url.startswith(("http://", "https://")):
            raise ValueError("NILAI_ATTESTATION_PCCS_URL must start with http:// or https://")
        try:
            import dcap_qvl  # noqa: F401, PLC0415  # pyright: ignore[reportMissingTypeStubs, reportUnusedImport]
        except ImportError:
            raise ValueError(
                "NILAI_ATTESTATION_PCCS_URL needs dcap-qvl to read quotes: install nilai[attest]"
            ) from None
        # Most of the report's time limit: a slow PCCS then fails (and is not asked again for
        # a minute) before the report's own limit, and the report goes out without collateral.
        cache = CollateralCache(pccs_url, http, timeout_s=timeout_s * 0.8)
        return ReportCollateral(cache=cache)
    return None


async def close_attestation_provider(provider: AttestationProvider) -> None:
    """Release what ``provider`` holds: the tsm provider's quote threads; others hold nothing."""
    if isinstance(provider, TsmProvider):
        await provider.aclose()

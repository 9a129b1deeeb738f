"""Hardware evidence from the Linux configfs-tsm interface (SEV-SNP and TDX guests).

The kernel exposes report generation as a configfs directory (``Documentation/ABI/testing/
configfs-tsm``): making a directory under ``.../tsm/report`` creates an entry with the files
``inblob`` (write: up to 64 bytes of user data), ``outblob`` (read: the quote over it),
``auxblob`` (read: certificates, when the platform offers them), ``provider`` (read: the
backend, such as ``sev_guest`` or ``tdx_guest``) and ``generation`` (read: a counter bumped on
every write). Removing the directory removes the entry.

Each report uses its own entry, so concurrent requests never share an ``inblob``; reading
``generation`` before and after the quote still catches anyone writing to it meanwhile. The
file I/O blocks (the kernel talks to the firmware), so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from nilai.attestation.base import Evidence
from nilai.errors import UpstreamProtocolError, UpstreamTimeout

logger = logging.getLogger(__name__)

DEFAULT_TSM_PATH = Path("/sys/kernel/config/tsm/report")
INBLOB_SIZE = 64
MAX_CONCURRENT_REPORTS = 4


class TsmError(Exception):
    """The kernel interface failed; the message is for the log, not the client."""


@dataclass(frozen=True, slots=True)
class TsmQuote:
    """What one configfs-tsm entry returned."""

    outblob: bytes
    auxblob: bytes | None
    provider: str | None
    generation: str | None


class TsmProvider:
    """Evidence from configfs-tsm under ``root``; CPU evidence only (no GPU)."""

    name = "tsm"
    simulated = False

    def __init__(self, root: Path, *, timeout_s: float) -> None:
        self._root = root
        self._timeout_s = timeout_s
        # The firmware serialises reports anyway; this bounds the worker threads they hold.
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REPORTS)

    async def report(self, report_data: bytes) -> Evidence:
        """Return the quote over ``report_data``; 502 when it fails, 504 when it is too slow."""
        try:
            async with asyncio.timeout(self._timeout_s), self._slots:
                quote = await asyncio.to_thread(collect_quote, self._root, report_data)
        except TimeoutError:
            logger.warning("configfs-tsm report took longer than %.1fs", self._timeout_s)
            raise UpstreamTimeout(
                "The hardware attestation report took too long.", code="attestation_timeout"
            ) from None
        except TsmError as exc:
            logger.warning("configfs-tsm report failed: %s", exc)
            raise UpstreamProtocolError(
                "Hardware attestation is unavailable on this server.",
                code="attestation_unavailable",
            ) from None
        return Evidence(
            cpu_attestation=base64.b64encode(quote.outblob).decode(),
            gpu_attestation=None,
            details=_details(quote),
        )


def collect_quote(root: Path, report_data: bytes) -> TsmQuote:
    """Create an entry under ``root``, write ``report_data`` (zero-padded), read the quote.

    Blocking; the entry is removed afterwards whatever happens.

    Raises:
        TsmError: The interface is missing or refused, or the entry changed while in use.
        ValueError: ``report_data`` is longer than 64 bytes.
    """
    if len(report_data) > INBLOB_SIZE:
        raise ValueError(f"report data is {len(report_data)} bytes; at most {INBLOB_SIZE} fit")
    entry = root / f"nilai-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        entry.mkdir()
    except FileNotFoundError:
        raise TsmError(
            f"{root} does not exist (configfs not mounted, or a kernel without TSM reports)"
        ) from None
    except OSError as exc:
        raise TsmError(f"cannot create {entry}: {exc.strerror or exc}") from None
    try:
        return _read_entry(entry, report_data.ljust(INBLOB_SIZE, b"\0"))
    finally:
        _remove(entry)


def _read_entry(entry: Path, inblob: bytes) -> TsmQuote:
    try:
        _write_all(entry / "inblob", inblob)
        generation = _read_optional(entry / "generation")
        outblob = (entry / "outblob").read_bytes()
        auxblob = _read_auxblob(entry / "auxblob")
        provider = _read_optional(entry / "provider")
        generation_after = _read_optional(entry / "generation")
    except OSError as exc:
        raise TsmError(f"{exc.filename or entry}: {exc.strerror or exc}") from None
    if not outblob:
        raise TsmError(f"{entry}/outblob is empty")
    if generation != generation_after:
        raise TsmError(f"{entry} was written by someone else while the quote was read")
    return TsmQuote(outblob, auxblob or None, provider, generation)


def _write_all(path: Path, data: bytes) -> None:
    # No O_CREAT: the kernel creates the attribute files; a missing one means a wrong root.
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.write(fd, data) != len(data):
            raise TsmError(f"{path}: short write")
    finally:
        os.close(fd)


def _read_optional_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_auxblob(path: Path) -> bytes | None:
    # Certificates are a convenience for verifiers; a platform that cannot give them still
    # gives a valid quote.
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.info("no auxblob from configfs-tsm: %s", exc.strerror or exc)
        return None


def _read_optional(path: Path) -> str | None:
    data = _read_optional_bytes(path)
    return None if data is None else data.decode(errors="replace").strip()


def _remove(entry: Path) -> None:
    try:
        entry.rmdir()
    except OSError as exc:
        logger.warning("could not remove configfs-tsm entry %s: %s", entry, exc.strerror or exc)


def _details(quote: TsmQuote) -> dict[str, str]:
    details: dict[str, str] = {}
    if quote.provider:
        details["tsm_provider"] = quote.provider
    if quote.generation:
        details["generation"] = quote.generation
    if quote.auxblob:
        details["auxblob"] = base64.b64encode(quote.auxblob).decode()
    return details

"""Hardware evidence from the Linux configfs-tsm interface (SEV-SNP and TDX guests).

The kernel exposes report generation as a configfs directory (``Documentation/ABI/testing/
configfs-tsm``): making a directory under ``.../tsm/report`` creates an entry with the files
``inblob`` (write: up to 64 bytes of user data), ``outblob`` (read: the quote over it),
``auxblob`` (read: certificates, when the platform offers them), ``provider`` (read: the
backend, such as ``sev_guest`` or ``tdx_guest``) and ``generation`` (read: a counter bumped on
every write). Removing the directory removes the entry.

Each report uses its own entry, so concurrent requests never share an ``inblob``; reading
``generation`` before and after the quote still catches anyone writing to it meanwhile. The
file I/O blocks (the kernel talks to the firmware), so it runs in a worker thread of the
provider's own small pool, never the loop's default one (which DNS lookups share). A thread
cannot be interrupted in the kernel: when a report times out its thread keeps running, so the
bound on quote threads counts threads running, not requests waiting, and a slot comes back
only when its thread returns.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from nilai.attestation.base import Evidence
from nilai.attestation.pccs import ReportCollateral
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

    def __init__(
        self,
        root: Path,
        *,
        timeout_s: float,
        max_threads: int = MAX_CONCURRENT_REPORTS,
        collateral: ReportCollateral | None = None,
    ) -> None:
        self._root = root
        # Attached to TDX quotes' reports (the collateral, or the PCCS to fetch it from).
        self._collateral = collateral
        self._timeout_s = timeout_s
        self._max_threads = max_threads
        # Threads start on first use, not here: building the provider starts nothing.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="nilai-tsm"
        )
        # Taken before a quote thread starts and given back when it returns (not when its
        # request gives up), so at most ``max_threads`` threads are ever in the kernel.
        self._slots = asyncio.Semaphore(max_threads)
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """Quote threads running now, including those whose requests timed out."""
        with self._lock:
            return self._running

    async def report(self, report_data: bytes) -> Evidence:
        """Return the quote over ``report_data``; 502 when it fails, 504 when it is too slow."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
                quote = await self._collect(report_data)
        except TimeoutError:
            logger.warning(
                "configfs-tsm report took longer than %.1fs (%d of %d quote threads running)",
                self._timeout_s,
                self.running,
                self._max_threads,
            )
            raise UpstreamTimeout(
                "The hardware attestation report took too long.", code="attestation_timeout"
            ) from None
        except TsmError as exc:
            logger.warning("configfs-tsm report failed: %s", exc)
            raise UpstreamProtocolError(
                "Hardware attestation is unavailable on this server.",
                code="attestation_unavailable",
            ) from None
        details = _details(quote)
        if self._collateral is not None and quote.provider == "tdx_guest":
            # Bounded like the quote: a slow PCCS costs the report its collateral, not a 504.
            try:
                async with asyncio.timeout(self._timeout_s):
                    details.update(await self._collateral.details(quote.outblob))
            except TimeoutError:
                logger.warning(
                    "TDX collateral took longer than %.1fs; not attached", self._timeout_s
                )
        return Evidence(
            cpu_attestation=base64.b64encode(quote.outblob).decode(),
            gpu_attestation=None,
            details=details,
        )

    def _collect(self, report_data: bytes) -> asyncio.Future[TsmQuote]:
        """Start a quote thread in a slot already taken; the slot returns with the thread."""
        loop = asyncio.get_running_loop()

        def release(_: object) -> None:
            # Runs in the quote thread (or here if it never started); the loop may be closed
            # by then at shutdown, when nobody waits for the slot any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._slots.release)

        try:
            job = self._pool.submit(self._run, report_data)
        except RuntimeError:  # the pool is shut down: the provider is closed
            self._slots.release()
            raise TsmError("the provider is closed") from None
        job.add_done_callback(release)
        # Cancelling this future (a timeout) cannot stop a running thread; ``release`` waits
        # for the thread, not for this future.
        return asyncio.wrap_future(job, loop=loop)

    def _run(self, report_data: bytes) -> TsmQuote:
        with self._lock:
            self._running += 1
        try:
            return collect_quote(self._root, report_data)
        finally:
            with self._lock:
                self._running -= 1

    async def aclose(self) -> None:
        """Stop taking reports; a quote thread still in the kernel ends when the kernel returns."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if running := self.running:
            logger.info("%d configfs-tsm quote threads still running at shutdown", running)


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

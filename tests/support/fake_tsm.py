"""A stand-in for the kernel's configfs-tsm report directory, made of plain files.

configfs creates an entry's attribute files when the entry directory is made and removes them
with it; plain directories do neither, so ``Path.mkdir``/``Path.rmdir`` are patched to do it for
directories made under the fake root. ``outblob`` is a FIFO served by a thread, so, as with the
kernel, the quote is produced when it is read, from whatever ``inblob`` holds at that moment: a
provider that read before writing would get a quote over zeros.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

SEV_SNP_REPORT_SIZE = 0x4A0
SEV_SNP_REPORT_DATA_OFFSET = 0x50


def fake_sev_snp_report(user_data: bytes) -> bytes:
    """An SEV-SNP-shaped report (version 2) holding ``user_data`` at REPORT_DATA; not signed."""
    report = bytearray(SEV_SNP_REPORT_SIZE)
    report[0:4] = (2).to_bytes(4, "little")
    report[SEV_SNP_REPORT_DATA_OFFSET : SEV_SNP_REPORT_DATA_OFFSET + 64] = user_data.ljust(
        64, b"\0"
    )
    return bytes(report)


class FakeConfigfs:
    """A fake ``.../tsm/report`` directory; records every ``inblob`` written to it."""

    def __init__(
        self,
        root: Path,
        monkeypatch: pytest.MonkeyPatch,
        *,
        provider: str = "sev_guest",
        auxblob: bytes | None = b"fake-certificates",
        empty_quote: bool = False,
    ) -> None:
        self.root = root
        self.provider = provider
        self.auxblob = auxblob
        self.empty_quote = empty_quote
        self.inblobs: list[bytes] = []
        self.made: list[Path] = []
        self._servers: dict[Path, threading.Thread] = {}
        root.mkdir(parents=True, exist_ok=True)
        real_mkdir, real_rmdir = Path.mkdir, Path.rmdir

        def mkdir(path: Path, *args: object, **kwargs: object) -> None:
            real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]
            if path.parent == self.root:
                self._populate(path)

        def rmdir(path: Path) -> None:
            if path.parent == self.root and path in self._servers:
                self._depopulate(path)
            real_rmdir(path)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(Path, "rmdir", rmdir)

    def entries(self) -> list[Path]:
        """Entries still present under the root."""
        return sorted(self.root.iterdir())

    def _populate(self, entry: Path) -> None:
        self.made.append(entry)
        (entry / "inblob").write_bytes(b"")
        (entry / "provider").write_text(f"{self.provider}\n")
        (entry / "generation").write_text("0\n")
        if self.auxblob is not None:
            (entry / "auxblob").write_bytes(self.auxblob)
        os.mkfifo(entry / "outblob")
        server = threading.Thread(target=self._serve_quote, args=(entry,), daemon=True)
        self._servers[entry] = server
        server.start()

    def _serve_quote(self, entry: Path) -> None:
        with (entry / "outblob").open("wb") as out:  # blocks until someone reads
            inblob = (entry / "inblob").read_bytes()
            if not self.empty_quote:
                out.write(fake_sev_snp_report(inblob))

    def _depopulate(self, entry: Path) -> None:
        server = self._servers.pop(entry)
        if server.is_alive():
            # Nobody read the quote: open the FIFO so the server thread can finish.
            fd = os.open(entry / "outblob", os.O_RDONLY | os.O_NONBLOCK)
            server.join(timeout=5)
            os.close(fd)
        server.join(timeout=5)
        self.inblobs.append((entry / "inblob").read_bytes())
        for child in entry.iterdir():
            child.unlink()

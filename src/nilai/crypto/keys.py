"""The gateway's secp256k1 key: created once, kept with mode 0600, shared by local replicas."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from coincurve import PrivateKey

from nilai.crypto.domains import SignatureDomain


class Signer:
    """Signs byte strings with ECDSA over SHA-256 (DER signatures, base64 text)."""

    def __init__(self, key: PrivateKey) -> None:
        self._key = key
        self.public_key_bytes: bytes = key.public_key.format(compressed=True)
        self.public_key_b64: str = base64.b64encode(self.public_key_bytes).decode()

    def sign(self, domain: SignatureDomain, body: bytes) -> str:
        """Return the base64 DER signature of ``SHA-256(domain + body)``.

        The domain is not optional: every signed message starts with the tag of its kind, so a
        signature made for one kind never verifies as another (DESIGN §3).
        """
        return self.sign_digest(hashlib.sha256(domain + body).digest())

    def sign_digest(self, digest: bytes) -> str:
        """Return the base64 DER signature of a SHA-256 digest computed by the caller.

        The caller's hash must have started with a ``SignatureDomain`` tag (as the stream
        signer's running hash does). The signature is low-S, as libsecp256k1 always makes
        them, and the verifier accepts no other form.
        """
        der: bytes = self._key.sign(digest, hasher=None)  # pyright: ignore[reportUnknownMemberType]
        return base64.b64encode(der).decode()


def load_or_create_key(path: Path) -> Signer:
    """Load the key at ``path``, creating it (mode 0600) if it does not exist yet.

    Replicas starting together must end up with one key: the new key is written to a private
    temporary file and hard-linked into place, which fails if another process won the race,
    in which case the winner's key is read.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        _create(path)
    return Signer(_read(path))


def _create(path: Path) -> None:
    key = PrivateKey()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-key-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.to_pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another replica created it first; use theirs
    finally:
        os.unlink(tmp)


def _read(path: Path) -> PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"signing key {path} is accessible by other users (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    return PrivateKey.from_pem(path.read_bytes())

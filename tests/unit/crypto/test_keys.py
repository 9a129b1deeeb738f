import base64
import hashlib
import stat
import threading
from pathlib import Path

import pytest
from coincurve import PrivateKey, PublicKey

from nilai.crypto import keys
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer, load_or_create_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verifies(signer: Signer, signature_b64: str, message: bytes) -> bool:
    public = PublicKey(base64.b64decode(signer.public_key_b64))
    return public.verify(
        base64.b64decode(signature_b64), message, hasher=lambda m: hashlib.sha256(m).digest()
    )


def test_creates_key_with_mode_0600_and_missing_parents(tmp_path: Path):
    path = tmp_path / "a" / "b" / "c" / "signing_key.pem"
    signer = load_or_create_key(path)
    assert path.is_file()
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN")
    # The key on disk is the key the signer uses.
    on_disk = PrivateKey.from_pem(path.read_bytes())
    assert on_disk.public_key.format(compressed=True) == signer.public_key_bytes
    # No temporary files are left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing_key.pem"]


def test_second_call_reuses_the_same_key(tmp_path: Path):
    path = tmp_path / "key.pem"
    first = load_or_create_key(path)
    content = path.read_bytes()
    second = load_or_create_key(path)
    assert second.public_key_b64 == first.public_key_b64
    assert path.read_bytes() == content


def test_public_key_is_compressed_secp256k1(tmp_path: Path):
    signer = load_or_create_key(tmp_path / "key.pem")
    assert len(signer.public_key_bytes) == 33
    assert signer.public_key_bytes[0] in (2, 3)
    assert base64.b64decode(signer.public_key_b64) == signer.public_key_bytes


def test_refuses_key_readable_by_others(tmp_path: Path):
    path = tmp_path / "key.pem"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_key(path)


def test_refuses_group_readable_key(tmp_path: Path):
    path = tmp_path / "key.pem"
    path.write_bytes(PrivateKey().to_pem())
    path.chmod(0o640)
    with pytest.raises(PermissionError, match="0640"):
        load_or_create_key(path)


def test_concurrent_creation_ends_with_one_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Several creators that all saw no file still agree on one key (the link race)."""
    workers = 4
    path = tmp_path / "shared" / "key.pem"
    barrier = threading.Barrier(workers, timeout=5)
    original_create = keys._create

    def racing_create(p: Path) -> None:
        # Every thread has passed the exists() check before any of them creates a key.
        barrier.wait()
        original_create(p)

    monkeypatch.setattr(keys, "_create", racing_create)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            signer = load_or_create_key(path)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(signer.public_key_b64)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert len(results) == workers
    assert len(set(results)) == 1
    assert _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.pem"]
    assert load_or_create_key(path).public_key_b64 == results[0]


def test_sign_produces_verifiable_der_signature():
    signer = Signer(PrivateKey())
    message = b"hello nilai"
    signature = signer.sign(SignatureDomain.CHAT_COMPLETION, message)
    der = base64.b64decode(signature, validate=True)
    assert der[0] == 0x30  # DER SEQUENCE
    assert _verifies(signer, signature, SignatureDomain.CHAT_COMPLETION + message)
    assert not _verifies(signer, signature, SignatureDomain.CHAT_COMPLETION + message + b"!")


def test_sign_puts_the_domain_tag_in_front_of_the_body():
    signer = Signer(PrivateKey())
    signature = signer.sign(SignatureDomain.ATTESTATION, b"m")
    assert _verifies(signer, signature, b"nilai-sig/v1 attestation\nm")
    assert not _verifies(signer, signature, b"m")
    for other in SignatureDomain:
        if other is not SignatureDomain.ATTESTATION:
            assert not _verifies(signer, signature, other + b"m")


def test_domain_tags_are_the_design_tags_and_none_is_a_prefix_of_another():
    assert [domain.value for domain in SignatureDomain] == [
        b"nilai-sig/v1 chat.completion\n",
        b"nilai-sig/v1 chat.completion.chunk\n",
        b"nilai-sig/v1 response\n",
        b"nilai-sig/v1 response.stream\n",
        b"nilai-sig/v1 attestation\n",
    ]
    for one in SignatureDomain:
        for other in SignatureDomain:
            assert one is other or not other.value.startswith(one.value)


def test_sign_digest_matches_sign_of_the_message():
    signer = Signer(PrivateKey())
    message = b'{"a":1}'
    digest = hashlib.sha256(SignatureDomain.CHAT_COMPLETION + message).digest()
    by_digest = signer.sign_digest(digest)
    assert _verifies(signer, by_digest, SignatureDomain.CHAT_COMPLETION + message)
    # libsecp256k1 uses deterministic (RFC 6979) nonces.
    assert by_digest == signer.sign(SignatureDomain.CHAT_COMPLETION, message)


def test_signatures_are_low_s():
    # The verifier refuses high-S signatures, so the signer must never make one.
    half_order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
    signer = Signer(PrivateKey())
    for index in range(200):
        der = base64.b64decode(signer.sign(SignatureDomain.CHAT_COMPLETION, b"%d" % index))
        r_length = der[3]
        assert int.from_bytes(der[4 + r_length + 2 :]) <= half_order


def test_signature_does_not_verify_under_another_key():
    signer, other = Signer(PrivateKey()), Signer(PrivateKey())
    signature = signer.sign(SignatureDomain.CHAT_COMPLETION, b"m")
    assert not _verifies(other, signature, SignatureDomain.CHAT_COMPLETION + b"m")

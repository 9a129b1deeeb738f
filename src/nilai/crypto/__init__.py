"""Signing keys, canonical JSON, and the public verifier of signed answers."""

from nilai.crypto.canonical import canonical_json
from nilai.crypto.keys import Signer, load_or_create_key
from nilai.crypto.verify import VerificationError, verify_response, verify_stream

__all__ = [
    "Signer",
    "VerificationError",
    "canonical_json",
    "load_or_create_key",
    "verify_response",
    "verify_stream",
]

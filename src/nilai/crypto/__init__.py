"""Signing keys, canonical JSON, and the public verifier of signed answers."""

from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import SignatureDomain
from nilai.crypto.keys import Signer, load_or_create_key
from nilai.crypto.verify import (
    VerificationError,
    check_signature,
    verify_response,
    verify_stream,
)

__all__ = [
    "SignatureDomain",
    "Signer",
    "VerificationError",
    "canonical_json",
    "check_signature",
    "load_or_create_key",
    "verify_response",
    "verify_stream",
]

"""Signatures are separated by purpose and have one spelling (DESIGN §3, issue 14 items 5, 8).

Every signed message starts with the tag of its kind, every payload must be the JSON object its
mode expects with a 64-hex ``request_sha256``, so nothing signed for one purpose (an answer, a
stream, an attestation document) verifies as another. A signature is accepted only as canonical
base64 of canonical, low-S DER, so an answer's signature string is unique.

The tags are spelled out here as DESIGN gives them: they are the wire contract.
"""

import base64
import hashlib
import json
import re
from typing import Any

import orjson
import pytest
from coincurve import PrivateKey

from nilai.attestation.base import EvidenceError
from nilai.attestation.simulated import FORMAT, SimulatedProvider, verify_document
from nilai.crypto.canonical import canonical_json
from nilai.crypto.keys import Signer
from nilai.crypto.verify import VerificationError, verify_any, verify_response, verify_stream
from nilai.errors import UpstreamProtocolError
from nilai.gateway.chat.signing import StreamSigner, sign_completion

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
REQUEST_SHA = hashlib.sha256(REQUEST).hexdigest()
CHAT_TAG = b"nilai-sig/v1 chat.completion\n"
CHUNK_TAG = b"nilai-sig/v1 chat.completion.chunk\n"
ATTESTATION_TAG = b"nilai-sig/v1 attestation\n"
CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
REPORT_DATA = bytes(range(32))
NOT_AN_ANSWER = re.escape("the payload is not a chat.completion (")
NOT_A_CHUNK = re.escape("the payload is not a chat.completion.chunk (")


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey()


@pytest.fixture(scope="module")
def key_signer(key: PrivateKey) -> Signer:
    """The signer over ``key``, for tests that also sign by hand with the key itself."""
    return Signer(key)


def _sign(key: PrivateKey, message: bytes) -> str:
    """A genuine signature of any message, as a key holder (or a bug) could make one."""
    der = key.sign(message, hasher=lambda m: hashlib.sha256(m).digest())
    return base64.b64encode(der).decode()


def _completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    return {**body, **fields}


def _chunk(content: str | None, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {} if content is None else {"content": content},
                "finish_reason": finish,
            }
        ],
    }
    return {**chunk, **fields}


def _sse(payloads: list[bytes]) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"


def _answer(signer: Signer, **fields: Any) -> bytes:
    return sign_completion(_completion(**fields), signer, REQUEST_SHA)


def _stream(signer: Signer) -> bytes:
    stream_signer = StreamSigner(signer, REQUEST_SHA)
    sent = [stream_signer.sent(orjson.dumps(_chunk(text))) for text in ("Hel", "lo")]
    return _sse([*sent, stream_signer.last(_chunk(None, "stop"))])


def _hand_signed_answer(key: PrivateKey, body: dict[str, Any]) -> bytes:
    """``body`` signed as a non-stream answer, whatever it holds."""
    return json.dumps({**body, "signature": _sign(key, CHAT_TAG + canonical_json(body))}).encode()


def _hand_signed_stream(key: PrivateKey, earlier: list[bytes], last: dict[str, Any]) -> bytes:
    """A stream signed in the chat stream domain, whatever its payloads hold."""
    message = CHUNK_TAG + b"".join(p + b"\n" for p in earlier) + canonical_json(last)
    return _sse([*earlier, orjson.dumps({**last, "signature": _sign(key, message)})])


# --- one purpose cannot pass as another -----------------------------------------------------


def test_answer_reframed_as_a_one_event_stream_fails(signer: Signer):
    answer = _answer(signer)
    assert verify_response(answer, signer.public_key_b64).kind == "response"
    reframed = _sse([answer])
    with pytest.raises(VerificationError, match=NOT_A_CHUNK):
        verify_stream(reframed, signer.public_key_b64)
    with pytest.raises(VerificationError):
        verify_any(reframed, signer.public_key_b64, request=REQUEST)


def test_signed_chunk_of_a_one_event_stream_fails_as_an_answer(signer: Signer):
    # Without tags, a one-event stream signs canonical(last), exactly what an answer signs.
    payload = StreamSigner(signer, REQUEST_SHA).last(_chunk("all at once", "stop"))
    assert verify_stream(_sse([payload]), signer.public_key_b64).kind == "stream"
    with pytest.raises(VerificationError, match=NOT_AN_ANSWER):
        verify_response(payload, signer.public_key_b64)


def test_attestation_document_framed_as_a_two_line_stream_fails(signer: Signer):
    document = SimulatedProvider(signer).document("cpu", REPORT_DATA)
    verify_document(
        document, kind="cpu", public_key=signer.public_key_bytes, report_data=REPORT_DATA
    )
    two_lines = _sse([FORMAT.encode(), document.encode()])
    one_line = _sse([document.encode()])
    for raw in (two_lines, one_line):
        with pytest.raises(VerificationError):
            verify_stream(raw, signer.public_key_b64)
        with pytest.raises(VerificationError):
            verify_any(raw, signer.public_key_b64)
    with pytest.raises(VerificationError, match=NOT_AN_ANSWER):
        verify_response(document.encode(), signer.public_key_b64)


def test_attestation_documents_are_signed_in_their_own_domain(signer: Signer):
    document = json.loads(SimulatedProvider(signer).document("gpu", REPORT_DATA))
    signature = document.pop("signature")
    expected = hashlib.sha256(ATTESTATION_TAG + canonical_json(document)).digest()
    assert signature == signer.sign_digest(expected)


def test_answer_signature_does_not_make_an_attestation_document(
    key: PrivateKey, key_signer: Signer
):
    document = json.loads(SimulatedProvider(key_signer).document("cpu", REPORT_DATA))
    del document["signature"]
    document["signature"] = _sign(key, CHAT_TAG + canonical_json(document))
    with pytest.raises(EvidenceError, match="not signed"):
        verify_document(
            json.dumps(document),
            kind="cpu",
            public_key=key_signer.public_key_bytes,
            report_data=REPORT_DATA,
        )


# --- every payload is the object its mode expects -------------------------------------------


@pytest.mark.parametrize("kind", ["chat.completion", None, 5, "chat.completion.chunk "])
def test_stream_with_an_earlier_payload_that_is_not_a_chunk_fails(signer: Signer, kind: Any):
    stream_signer = StreamSigner(signer, REQUEST_SHA)
    odd = {key: value for key, value in _chunk("x").items() if key != "object"}
    if kind is not None:
        odd["object"] = kind
    sent = [stream_signer.sent(orjson.dumps(_chunk("a"))), stream_signer.sent(orjson.dumps(odd))]
    raw = _sse([*sent, stream_signer.last(_chunk(None, "stop"))])
    with pytest.raises(VerificationError, match="event 2: " + NOT_A_CHUNK):
        verify_stream(raw, signer.public_key_b64)


@pytest.mark.parametrize("kind", ["chat.completion", None, "response"])
def test_stream_whose_signed_payload_is_not_a_chunk_fails(
    key: PrivateKey, key_signer: Signer, kind: Any
):
    last = _chunk(None, "stop", request_sha256=REQUEST_SHA, object=kind)
    raw = _hand_signed_stream(key, [orjson.dumps(_chunk("a"))], last)
    with pytest.raises(VerificationError, match="event 2: " + NOT_A_CHUNK):
        verify_stream(raw, key_signer.public_key_b64)


@pytest.mark.parametrize("kind", ["chat.completion.chunk", None, "response", ["chat.completion"]])
def test_answer_that_is_not_a_chat_completion_fails(key: PrivateKey, key_signer: Signer, kind: Any):
    raw = _hand_signed_answer(key, _completion(request_sha256=REQUEST_SHA, object=kind))
    with pytest.raises(VerificationError, match=NOT_AN_ANSWER):
        verify_response(raw, key_signer.public_key_b64)


def test_hand_signed_answer_and_stream_of_the_right_kind_verify(
    key: PrivateKey, key_signer: Signer
):
    # The negative tests above fail for the reason they name, not for a wrong signature.
    answer = _hand_signed_answer(key, _completion(request_sha256=REQUEST_SHA))
    assert verify_response(answer, key_signer.public_key_b64, request=REQUEST).kind == "response"
    last = _chunk(None, "stop", request_sha256=REQUEST_SHA)
    stream = _hand_signed_stream(key, [orjson.dumps(_chunk("a"))], last)
    assert verify_stream(stream, key_signer.public_key_b64, request=REQUEST).kind == "stream"


BAD_REQUEST_HASHES = {
    "missing": ...,
    "null": None,
    "empty": "",
    "upper-case": REQUEST_SHA.upper(),
    "short": REQUEST_SHA[:-1],
    "long": REQUEST_SHA + "0",
    "not-hex": "g" * 64,
    "number": 1234,
    "trailing-newline": REQUEST_SHA + "\n",
}


def _with_request_hash(obj: dict[str, Any], value: Any) -> dict[str, Any]:
    return obj if value is ... else {**obj, "request_sha256": value}


@pytest.mark.parametrize("value", BAD_REQUEST_HASHES.values(), ids=BAD_REQUEST_HASHES.keys())
def test_answer_without_a_64_hex_request_sha256_fails(
    key: PrivateKey, key_signer: Signer, value: Any
):
    raw = _hand_signed_answer(key, _with_request_hash(_completion(), value))
    with pytest.raises(VerificationError, match="request_sha256 of 64 lowercase hex"):
        verify_response(raw, key_signer.public_key_b64)


@pytest.mark.parametrize("value", BAD_REQUEST_HASHES.values(), ids=BAD_REQUEST_HASHES.keys())
def test_stream_without_a_64_hex_request_sha256_fails(
    key: PrivateKey, key_signer: Signer, value: Any
):
    last = _with_request_hash(_chunk(None, "stop"), value)
    raw = _hand_signed_stream(key, [orjson.dumps(_chunk("a"))], last)
    with pytest.raises(VerificationError, match="request_sha256 of 64 lowercase hex"):
        verify_stream(raw, key_signer.public_key_b64)


# --- the gateway signs only objects of the kind it claims ------------------------------------


def test_answer_without_object_is_signed_as_a_chat_completion(signer: Signer):
    body = _completion()
    del body["object"]
    signed = json.loads(sign_completion(body, signer, REQUEST_SHA))
    assert signed["object"] == "chat.completion"
    raw = json.dumps(signed).encode()
    assert verify_response(raw, signer.public_key_b64, request=REQUEST).kind == "response"


@pytest.mark.parametrize("kind", ["chat.completion.chunk", "text_completion", 1])
def test_answer_of_another_kind_is_not_signed(signer: Signer, kind: Any):
    with pytest.raises(UpstreamProtocolError, match=r"not a chat\.completion\."):
        sign_completion(_completion(object=kind), signer, REQUEST_SHA)


# --- one spelling per signature -------------------------------------------------------------


def _signature_of(raw: bytes) -> str:
    last = raw.rstrip(b"\n").split(b"\n\n")[-2] if raw.startswith(b"data:") else raw
    return json.loads(last.removeprefix(b"data: "))["signature"]


def _respell(raw: bytes, old: str, new: str) -> bytes:
    assert raw.count(old.encode()) == 1
    return raw.replace(old.encode(), new.encode())


def _with_padding(signer: Signer, padding: int, *, stream: bool) -> bytes:
    """A genuine answer or stream whose signature ends in ``padding`` '=' characters."""
    for index in range(200):
        if stream:
            stream_signer = StreamSigner(signer, hashlib.sha256(b"%d" % index).hexdigest())
            raw = _sse([stream_signer.last(_chunk(None, "stop"))])
        else:
            raw = sign_completion(_completion(id=f"c-{index}"), signer, REQUEST_SHA)
        signature = _signature_of(raw)
        if len(signature) - len(signature.rstrip("=")) == padding:
            return raw
    raise AssertionError("no signature of that length")


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
@pytest.mark.parametrize("padding", [1, 2])
def test_signature_with_base64_padding_bits_set_fails(signer: Signer, padding: int, stream: bool):
    raw = _with_padding(signer, padding, stream=stream)
    signature = _signature_of(raw)
    assert verify_any(raw, signer.public_key_b64).request_sha256
    last = len(signature) - padding - 1  # the character that holds the unused bits
    value = ALPHABET.index(signature[last])
    respelled = signature[:last] + ALPHABET[value | 1] + signature[last + 1 :]
    assert respelled != signature
    assert base64.b64decode(respelled, validate=True) == base64.b64decode(signature)
    with pytest.raises(VerificationError, match="canonical base64"):
        verify_any(_respell(raw, signature, respelled), signer.public_key_b64)


def _der(r: int, s: int, *, r_bytes: bytes | None = None, tail: bytes = b"") -> bytes:
    def integer(value: int) -> bytes:
        data = value.to_bytes((value.bit_length() + 8) // 8, "big")  # a sign bit to spare
        return b"\x02" + bytes([len(data)]) + data

    r_part = integer(r) if r_bytes is None else b"\x02" + bytes([len(r_bytes)]) + r_bytes
    body = r_part + integer(s)
    return b"\x30" + bytes([len(body)]) + body + tail


def _r_s(signature: str) -> tuple[int, int]:
    der = base64.b64decode(signature)
    r_length = der[3]
    return int.from_bytes(der[4 : 4 + r_length]), int.from_bytes(der[4 + r_length + 2 :])


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_high_s_twin_of_a_signature_fails(signer: Signer, stream: bool):
    raw = _stream(signer) if stream else _answer(signer)
    signature = _signature_of(raw)
    r, s = _r_s(signature)
    assert _der(r, s) == base64.b64decode(signature)
    assert s <= CURVE_ORDER // 2  # the signer makes low-S signatures
    twin = base64.b64encode(_der(r, CURVE_ORDER - s)).decode()
    with pytest.raises(VerificationError, match="low-S"):
        verify_any(_respell(raw, signature, twin), signer.public_key_b64)


def _answer_with_high_bit_r(signer: Signer) -> bytes:
    for index in range(200):
        raw = _answer(signer, id=f"c-{index}")
        if _r_s(_signature_of(raw))[0] >> 255:
            return raw
    raise AssertionError("no signature with a 33-byte r")


NON_CANONICAL_DER = {
    # libsecp256k1 parses an r without its sign byte (a negative number) leniently.
    "negative-r": ({"r_bytes": 32}, "canonical DER"),
    "padded-r": ({"r_bytes": 34}, "malformed"),
    "trailing-byte": ({"tail": b"\x00"}, "malformed"),
}


@pytest.mark.parametrize(
    ("spelling", "reason"), NON_CANONICAL_DER.values(), ids=NON_CANONICAL_DER.keys()
)
def test_non_canonical_der_spelling_of_a_signature_fails(
    signer: Signer, spelling: dict[str, Any], reason: str
):
    raw = _answer_with_high_bit_r(signer)
    signature = _signature_of(raw)
    r, s = _r_s(signature)
    r_length = spelling.get("r_bytes")
    r_bytes = None if r_length is None else r.to_bytes(r_length, "big")
    der = _der(r, s, r_bytes=r_bytes, tail=spelling.get("tail", b""))
    assert der != base64.b64decode(signature)
    spelled = base64.b64encode(der).decode()
    with pytest.raises(VerificationError, match=reason):
        verify_response(_respell(raw, signature, spelled), signer.public_key_b64)

"""Check signed answers against the gateway's public key (DESIGN §3).

Four forms are accepted, for the chat completions API and for the Responses API: a
non-streaming body (one JSON object with ``signature``) and a recorded SSE stream (the raw bytes
the gateway sent) of each.

The verifier reads what a client reads. A stream is parsed exactly as the WHATWG
specification of server-sent events says (lines end at CRLF, LF or CR; comments; the
``data``/``event``/``id``/``retry`` fields; multi-line data joined with LF; dispatch on a blank
line), and the check fails unless the events a client would see are exactly the signed
payloads, in order, then ``[DONE]`` (a Responses API stream: typed events, each an ``event``
line naming its data's ``type`` and one ``data`` line, ending with the signed
``response.completed``, and no ``[DONE]``). Every payload must be a JSON object without
duplicate keys, because JSON parsers disagree on which of two equal keys wins.

Signatures are separated by purpose: every signed message starts with the domain tag of its
kind (``SignatureDomain``), every payload must be the JSON object its mode expects
(``chat.completion``, or ``chat.completion.chunk`` for each event of a stream; ``response``
for the Responses API), and the signed object must carry a 64-hex ``request_sha256``. So
neither an attestation document nor an answer re-framed as a stream verifies as anything but
what it was signed as. A signature string is accepted in one spelling only: canonical base64
of canonical, low-S DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from coincurve import PublicKey, ecdsa

from nilai.crypto.canonical import canonical_json
from nilai.crypto.domains import (
    CHAT_COMPLETION_CHUNK_OBJECT,
    CHAT_COMPLETION_OBJECT,
    RESPONSE_COMPLETED,
    RESPONSE_OBJECT,
    SignatureDomain,
)

DONE = "[DONE]"
_RESPONSE_EVENT_PREFIX = "response."
_ERROR_EVENT = "error"
_BOM = "\ufeff"
_UTF8_BOM = _BOM.encode()
# CRLF first, so that a CR directly followed by LF is one line end, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")
_FIELDS = frozenset({"data", "event", "id", "retry"})
_LONE_CR = re.compile(r"\r(?!\n)")
# Python's str.splitlines (and httpx's line decoder) also ends lines at these.
_OTHER_LINE_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_JSON_WHITESPACE = b" \t\r\n"
_REQUEST_SHA256 = re.compile(r"[0-9a-f]{64}")
# Half the order of the secp256k1 group: a signature's s may not exceed it (low-S form).
_HALF_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2


class VerificationError(Exception):
    """The answer is not what the key signed."""


@dataclass(frozen=True, slots=True)
class Verified:
    """What a successful check established."""

    kind: str
    """``response`` (a non-streaming chat answer), ``stream`` (a chat stream), ``responses``
    (a non-streaming Responses API answer) or ``responses stream``."""
    request_sha256: str
    """The signed hash of the request body the answer is for (64 lowercase hex digits)."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """The field lines of one event, in order, as a client collects them up to a blank line.

    Only the four fields the specification defines are kept (clients ignore any other name).
    Values are as the client sees them: one leading space after the colon removed.
    """

    fields: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The field names, in order, repeats included."""
        return tuple(name for name, _ in self.fields)

    @property
    def data(self) -> str | None:
        """The data a client dispatches: every ``data`` value joined with LF.

        ``None`` when the event has no ``data`` line; the specification then dispatches
        nothing, though some clients (the openai SDK among them) still hand it on.
        """
        values = [value for name, value in self.fields if name == "data"]
        return "\n".join(values) if values else None

    @property
    def event_type(self) -> str | None:
        """The last ``event`` value, or ``None`` for the default type (``message``)."""
        values = [value for name, value in self.fields if name == "event"]
        return (values[-1] or None) if values else None


@dataclass(frozen=True, slots=True)
class SseStream:
    """An SSE text as a client reads it."""

    events: tuple[SseEvent, ...]
    """Every event that a blank line ended and that had at least one known field."""
    unfinished: SseEvent | None
    """Known fields after the last blank line: the specification drops them at the end of the
    stream, but a client that dispatches at end of input would show them."""


def parse_sse(text: str) -> SseStream:
    """Parse decoded SSE text as the specification's event stream interpretation does.

    One leading byte-order mark is ignored; lines end at CRLF, LF or CR; a line starting with
    ``:`` is a comment; ``name:value`` loses one space after the colon, and a line without a
    colon is a field with an empty value; a blank line ends the event.
    """
    return _parse_lines(_without_final_line_end(_LINE_END.split(text.removeprefix(_BOM))))


def _without_final_line_end(lines: list[str]) -> list[str]:
    r"""The lines, without the empty string that follows the input's last line end.

    It is no blank line: ``data: x\n`` at the end of the input leaves its event undispatched,
    as the specification says (and the openai SDK drops it), so it must not count as one.
    """
    return lines[:-1] if lines and lines[-1] == "" else lines


def sse_payloads(raw: bytes) -> list[bytes]:
    """Return the data of every event a client dispatches, in order, without ``[DONE]``."""
    stream = parse_sse(raw.decode("utf-8", errors="replace"))
    return [
        data.encode()
        for event in stream.events
        if (data := event.data) is not None and data != DONE
    ]


def verify_response(body: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    """Verify a saved non-streaming response body: a signed ``chat.completion``.

    The signed message is ``SignatureDomain.CHAT_COMPLETION`` + the canonical JSON of the
    object without ``signature``.
    """
    return _verify_object(
        body, public_key_b64, request, CHAT_COMPLETION_OBJECT, SignatureDomain.CHAT_COMPLETION
    )


def verify_stream(raw: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    r"""Verify a recorded SSE stream: every event a client would see must be signed.

    Every payload must be a ``chat.completion.chunk``. The signed message is
    ``SignatureDomain.CHAT_COMPLETION_CHUNK`` +
    ``b"".join(p + b"\n" for p in earlier) + canonical(last)`` over the data of the events as
    dispatched; ``[DONE]`` is not part of it.
    """
    *earlier, last = signed_payloads(raw)
    for index, payload in enumerate(earlier, start=1):
        where = f"event {index}: "
        _check_object_kind(_load_object(payload, where=where), CHAT_COMPLETION_CHUNK_OBJECT, where)
    where = f"event {len(earlier) + 1}: "
    obj = _load_object(last, where=where)
    _check_object_kind(obj, CHAT_COMPLETION_CHUNK_OBJECT, where)
    message, signature = _split_signature(obj)
    request_sha256 = _signed_request_sha256(message)
    signed = b"".join(payload + b"\n" for payload in earlier) + _canonical(message)
    check_signature(
        SignatureDomain.CHAT_COMPLETION_CHUNK, signed, signature, _public_key(public_key_b64)
    )
    return _check_request(Verified("stream", request_sha256), request)


def check_signature(
    domain: SignatureDomain, body: bytes, signature_b64: str, public_key: bytes
) -> None:
    """Check that ``signature_b64`` signs ``domain + body`` under ``public_key``.

    Args:
        domain: The kind of message the signature must have been made for.
        body: The signed bytes after the domain tag.
        signature_b64: Base64 of a DER ECDSA signature, in its one canonical spelling.
        public_key: The signer's secp256k1 public key (33 or 65 bytes).

    Raises:
        VerificationError: The signature is malformed, not canonical, or does not sign this
            message under this key.
    """
    signature = _canonical_signature(signature_b64)
    try:
        key = PublicKey(public_key)
    except ValueError as exc:
        raise VerificationError(f"malformed public key: {exc}") from exc
    try:
        valid = key.verify(
            signature, domain + body, hasher=lambda data: hashlib.sha256(data).digest()
        )
    except ValueError:
        valid = False
    if not valid:
        raise VerificationError("signature does not match the content and public key")


def verify_responses_object(
    body: bytes, public_key_b64: str, request: bytes | None = None
) -> Verified:
    """Verify a saved non-streaming Responses API body: a signed ``response`` object.

    The signed message is ``SignatureDomain.RESPONSE`` + the canonical JSON of the object
    without ``signature``.
    """
    return _verify_object(body, public_key_b64, request, RESPONSE_OBJECT, SignatureDomain.RESPONSE)


_OBJECT_FORMS = {CHAT_COMPLETION_OBJECT: "response", RESPONSE_OBJECT: "responses"}
"""The ``Verified.kind`` of each kind of signed whole object."""


def _verify_object(
    body: bytes,
    public_key_b64: str,
    request: bytes | None,
    kind: str,
    domain: SignatureDomain,
) -> Verified:
    """Verify a whole object of ``kind``, signed in ``domain``: tag + canonical JSON."""
    obj = _load_object(body.removeprefix(_UTF8_BOM))
    _check_object_kind(obj, kind)
    message, signature = _split_signature(obj)
    request_sha256 = _signed_request_sha256(message)
    check_signature(domain, _canonical(message), signature, _public_key(public_key_b64))
    return _check_request(Verified(_OBJECT_FORMS[kind], request_sha256), request)


def verify_responses_stream(
    raw: bytes, public_key_b64: str, request: bytes | None = None
) -> Verified:
    r"""Verify a recorded Responses API stream: every event a client would see must be signed.

    Each event is one ``event`` line and one ``data`` line, and the event's name equals its
    data's ``type``, so that no event can be shown to a client under another name. The last
    event is ``response.completed`` with ``request_sha256`` and ``signature`` at its top level.
    The signed message is ``SignatureDomain.RESPONSE_STREAM`` +
    ``b"".join(p + b"\n" for p in earlier) + canonical(last)`` over the events' data.
    """
    *earlier, last = responses_signed_payloads(raw)
    for index, payload in enumerate(earlier, start=1):
        obj = _load_object(payload, where=f"event {index}: ")
        if obj.get("type") == RESPONSE_COMPLETED:
            _fail(f"event {index} is {RESPONSE_COMPLETED} but not the last event")
    where = f"event {len(earlier) + 1}: "
    obj = _load_object(last, where=where)
    if obj.get("type") != RESPONSE_COMPLETED:
        _fail(f"{where}the last event is not {RESPONSE_COMPLETED}")
    response: Any = obj.get("response")  # Any: checked just below
    if not isinstance(response, dict):
        _fail(f"{where}{RESPONSE_COMPLETED} holds no response object")
    inner: dict[str, Any] = response  # pyright: ignore[reportUnknownVariableType]
    if "object" in inner:
        _check_object_kind(inner, RESPONSE_OBJECT, where)
    message, signature = _split_signature(obj)
    request_sha256 = _signed_request_sha256(message)
    signed = b"".join(payload + b"\n" for payload in earlier) + _canonical(message)
    check_signature(SignatureDomain.RESPONSE_STREAM, signed, signature, _public_key(public_key_b64))
    return _check_request(Verified("responses stream", request_sha256), request)


def verify_any(raw: bytes, public_key_b64: str, request: bytes | None = None) -> Verified:
    """Verify any of the four forms, telling them apart by what a client would read.

    A JSON object is a non-streaming answer: a Responses API one when its ``object`` is
    ``response``, else a chat completion. Anything else is a stream: a Responses API stream
    when its first event names a ``response.*`` type in an ``event`` field, else a chat
    stream. A stream can start with a byte-order mark, a comment, a blank line or any field,
    so only the one thing a body must start with (``{`` after optional whitespace) decides
    the form; each verifier then checks every rule of its own kind, so the choice lets
    nothing through.
    """
    if raw.removeprefix(_UTF8_BOM).lstrip(_JSON_WHITESPACE).startswith(b"{"):
        if _load_object(raw.removeprefix(_UTF8_BOM)).get("object") == RESPONSE_OBJECT:
            return verify_responses_object(raw, public_key_b64, request)
        return verify_response(raw, public_key_b64, request)
    if _is_responses_stream(raw):
        return verify_responses_stream(raw, public_key_b64, request)
    return verify_stream(raw, public_key_b64, request)


def responses_signed_payloads(raw: bytes) -> list[bytes]:
    """The data payloads of a Responses API stream, after checking that a client sees no other.

    Lines are checked as for chat streams, except that ``event`` lines belong to the form.
    Every event is one ``event`` line then one ``data`` line, the name equal to the data's
    ``type`` and starting with ``response.``; an ``error`` event or a ``[DONE]`` fails; the
    stream must end with a blank line, since a client drops an event it does not end.
    """
    text = _decode(raw)
    lines = _LINE_END.split(text.removeprefix(_BOM))
    _check_line_ends(text)
    _check_lines(lines, after_bom=text.startswith(_BOM), allowed=_RESPONSES_STREAM_FIELDS)
    stream = _parse_lines(_without_final_line_end(lines))
    if stream.unfinished is not None:
        _fail(
            "the stream ends inside an event with no blank line after it, which some "
            "clients drop and others show"
        )
    if not stream.events:
        _fail("the stream holds no events")
    payloads: list[bytes] = []
    for index, event in enumerate(stream.events, start=1):
        if event.names != ("event", "data"):
            _fail(
                f"event {index} has the fields {', '.join(event.names)}; "
                "a signed event has one event line, then one data line"
            )
        name, payload = event.fields[0][1], event.fields[1][1]
        if name == _ERROR_EVENT or payload == DONE:
            # The gateway signs no error event and sends no [DONE]: either one means the
            # stream a client saw is not the signed answer.
            _fail(f"event {index} is {payload if payload == DONE else 'an error event'}")
        if not name.startswith(_RESPONSE_EVENT_PREFIX):
            _fail(f"event {index} is named {name!r}, which is no Responses API event")
        found = _load_object(payload.encode(), where=f"event {index}: ").get("type")
        if found != name:
            # Clients route an event by its name: a signed payload shown under another name
            # would be read as something it was not signed as.
            _fail(f"event {index} is named {name!r} but its data's type is {json.dumps(found)}")
        payloads.append(payload.encode())
    return payloads


def _is_responses_stream(raw: bytes) -> bool:
    stream = parse_sse(raw.decode("utf-8", errors="replace"))
    first = stream.events[0] if stream.events else stream.unfinished
    if first is None:
        return False
    name = first.event_type
    return name is not None and name.startswith(_RESPONSE_EVENT_PREFIX)


def signed_payloads(raw: bytes) -> list[bytes]:
    """The payloads of a stream that a client sees, after checking that it sees nothing else.

    Every line must be blank, a comment or a ``data`` line; every event one data line; the
    events the signed payloads and then ``[DONE]``, with nothing after it. A recording that
    stops before ``[DONE]`` is accepted, since every payload is still covered.
    """
    text = _decode(raw)
    lines = _LINE_END.split(text.removeprefix(_BOM))
    _check_line_ends(text)
    _check_lines(lines, after_bom=text.startswith(_BOM), allowed=_CHAT_STREAM_FIELDS)
    stream = _parse_lines(_without_final_line_end(lines))
    events = list(stream.events)
    if stream.unfinished is not None:
        if stream.unfinished.fields != (("data", DONE),):
            _fail(
                "the stream ends inside an event with no blank line after it, which some "
                "clients drop and others show"
            )
        events.append(stream.unfinished)  # only the blank line after [DONE] is missing
    payloads: list[bytes] = []
    for index, event in enumerate(events, start=1):
        if len(event.fields) != 1:
            _fail(f"event {index} has {len(event.fields)} data lines; a signed payload has one")
        payload = event.fields[0][1]
        if payload != DONE:
            payloads.append(payload.encode())
            continue
        if not payloads:
            _fail("the stream holds no data events before [DONE]")
        if index != len(events):
            _fail(f"event {index + 1} comes after [DONE]")
        return payloads
    if not payloads:
        _fail("the stream holds no data events")
    return payloads


def _parse_lines(lines: list[str]) -> SseStream:
    events: list[SseEvent] = []
    fields: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            if fields:
                events.append(SseEvent(tuple(fields)))
                fields = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name in _FIELDS:
            fields.append((name, value.removeprefix(" ")))
    return SseStream(tuple(events), SseEvent(tuple(fields)) if fields else None)


def _check_line_ends(text: str) -> None:
    r"""Refuse a lone CR in a stream whose lines end with LF.

    Clients that split lines at LF only (many hand-written ones) would read such a stream
    differently: ``: comment\rdata: ...`` is a comment to them and an event to the rest. A
    stream with CR line ends only reads as one unfinished line to them, so they show nothing.
    """
    if "\n" not in text:
        return
    lone_cr = _LONE_CR.search(text)
    if lone_cr is not None:
        line = len(_LINE_END.findall(text, 0, lone_cr.start())) + 1
        _fail(
            f"line {line} ends with a lone CR in a stream whose lines end with LF, "
            "so clients disagree on where its lines end"
        )


_CHAT_STREAM_FIELDS = frozenset({"data"})
_RESPONSES_STREAM_FIELDS = frozenset({"event", "data"})


def _check_lines(lines: list[str], *, after_bom: bool, allowed: frozenset[str]) -> None:
    """Allow only what the gateway sends (``allowed`` fields, blank lines) and comments."""
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if line.startswith(":"):
            if _OTHER_LINE_BREAKS.search(line):
                # httpx's iter_lines (and so httpx-sse) splits at these too: a comment to
                # the specification could hide a data line from those clients.
                _fail(f"line {number} is a comment holding a character some clients end lines at")
            continue
        name = line.partition(":")[0]
        if name not in allowed:
            # event/id/retry change how clients route an event; unknown names are read as
            # data by lenient parsers. The gateway sends none but the form's own.
            kinds = " and ".join(sorted(allowed))
            _fail(f"line {number} has a field {name!r}; signed streams carry only {kinds} lines")
        if number == 1 and after_bom:
            _fail(f"a byte-order mark precedes a {name} line; clients that keep the mark skip it")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Clients disagree on invalid UTF-8 (replace, or fail), so it is never accepted.
        raise VerificationError(f"not valid UTF-8: {exc}") from exc


def _load_object(raw: bytes, *, where: str = "") -> dict[str, Any]:
    # Any: a signed object is arbitrary JSON; the fields read from it are checked where used.
    try:
        obj: Any = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_object_without_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{where}not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise VerificationError(f"{where}the signed object is not a JSON object")
    return obj  # pyright: ignore[reportUnknownVariableType]


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # One parser keeps the first value, another the last: the signature would cover
            # one reading while a client shows the other.
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> NoReturn:
    # Python alone accepts NaN and Infinity; they are not JSON.
    raise ValueError(f"{name} is not JSON")


def _canonical(message: dict[str, Any]) -> bytes:
    try:
        return canonical_json(message)
    except UnicodeEncodeError as exc:
        # A lone surrogate escape ("\ud800") decodes but has no UTF-8 form to sign.
        raise VerificationError(f"the signed object has no canonical form: {exc}") from exc


def _split_signature(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    signature = obj.get("signature")
    if not isinstance(signature, str):
        raise VerificationError("no signature field in the signed object")
    return {key: value for key, value in obj.items() if key != "signature"}, signature


def _check_object_kind(obj: dict[str, Any], kind: str, where: str = "") -> None:
    found = obj.get("object")
    if found != kind:
        # A document signed for another purpose (an attestation document, an answer of the
        # other form) must not pass as this one, whatever its signature.
        raise VerificationError(
            f"{where}the payload is not a {kind} (its object is {json.dumps(found)})"
        )


def _signed_request_sha256(message: dict[str, Any]) -> str:
    value = message.get("request_sha256")
    if not isinstance(value, str) or _REQUEST_SHA256.fullmatch(value) is None:
        # Without it the answer is bound to no question and could be shown as any answer.
        raise VerificationError(
            "the signed object has no request_sha256 of 64 lowercase hex digits"
        )
    return value


def _public_key(public_key_b64: str) -> bytes:
    try:
        return base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"malformed public key: {exc}") from exc


def _canonical_signature(signature_b64: str) -> bytes:
    """The DER bytes of a signature that has one spelling only, or a ``VerificationError``.

    Base64 with non-zero padding bits decodes to the same bytes as the canonical text; DER
    that libsecp256k1 parses leniently (a negative integer) re-encodes differently; and
    ``(r, n - s)`` is as valid as ``(r, s)`` to lax libraries. Refusing all three makes the
    signature string of an answer unique, so that it can serve as the answer's identifier.
    """
    try:
        der = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"malformed signature: {exc}") from exc
    if base64.b64encode(der).decode() != signature_b64:
        raise VerificationError("the signature is not in canonical base64 (padding bits set)")
    try:
        # libsecp256k1's own parser and serialiser; the parsed form is an untyped cffi pointer.
        parsed = ecdsa.der_to_cdata(der)  # pyright: ignore[reportUnknownVariableType]
        reencoded = ecdsa.cdata_to_der(parsed)  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    except ValueError as exc:
        raise VerificationError(f"malformed signature: {exc}") from exc
    if reencoded != der:
        raise VerificationError("the signature is not in canonical DER form")
    # Canonical DER is SEQUENCE { INTEGER r, INTEGER s }: 0x30 len 0x02 len(r) r 0x02 len(s) s.
    r_length = der[3]
    s = int.from_bytes(der[4 + r_length + 2 :])
    if s > _HALF_CURVE_ORDER:
        raise VerificationError("the signature is not in low-S form")
    return der


def _check_request(verified: Verified, request: bytes | None) -> Verified:
    if request is None:
        return verified
    expected = hashlib.sha256(request).hexdigest()
    if verified.request_sha256 != expected:
        raise VerificationError("request_sha256 does not match the given request body")
    return verified


def _fail(reason: str) -> NoReturn:
    raise VerificationError(reason)

"""Domain tags: the first bytes of every message the gateway's key signs (DESIGN §3).

One key signs several kinds of object. Without a tag a signature made for one kind could be
presented as another: a non-streaming answer re-framed as a one-event stream signs the same
bytes, and so would any document whose canonical JSON an attacker can arrange. Each kind signs
``TAG + bytes``, with a tag no other kind uses and that ends in a newline, so no kind's message
is a prefix-shifted copy of another's.
"""

from __future__ import annotations

from enum import Enum


class SignatureDomain(bytes, Enum):
    """The tag each kind of signed message starts with; every signature names one."""

    CHAT_COMPLETION = b"nilai-sig/v1 chat.completion\n"
    """A non-streaming chat completion: tag + canonical JSON of the object."""
    CHAT_COMPLETION_CHUNK = b"nilai-sig/v1 chat.completion.chunk\n"
    """A chat stream: tag + each earlier payload and LF + canonical JSON of the last chunk."""
    RESPONSE = b"nilai-sig/v1 response\n"
    """A non-streaming Responses API object: tag + canonical JSON of the object."""
    RESPONSE_STREAM = b"nilai-sig/v1 response.stream\n"
    """A Responses API stream: tag + each earlier event's data and LF + canonical JSON of the
    final ``response.completed`` payload."""
    ATTESTATION = b"nilai-sig/v1 attestation\n"
    """A document the gateway signs for attestation (the simulated evidence)."""


CHAT_COMPLETION_OBJECT = "chat.completion"
"""The ``object`` of a non-streaming chat answer, the only kind signed in that domain."""
CHAT_COMPLETION_CHUNK_OBJECT = "chat.completion.chunk"
"""The ``object`` of every payload of a chat stream."""
RESPONSE_OBJECT = "response"
"""The ``object`` of a Responses API answer, the only kind signed in its domain."""
RESPONSE_COMPLETED = "response.completed"
"""The type of the last event of a Responses API stream, the one that carries the signature."""

"""Chat through a nilai gateway with the public nilai-py client; print what it saw as JSON.

Runs in .venv-interop (see requirements.txt), started by tests/e2e/test_nuc.py and
tests/e2e/test_web_search_nilai_py.py:

    python nilai_py_client.py --base-url URL --model M --mode api_key --key HEX
    python nilai_py_client.py --base-url URL --model M --mode delegation --key HEX --uses 2
    python nilai_py_client.py --base-url URL --model M --mode api_key --key HEX --web-search
    python nilai_py_client.py --base-url URL --model M --mode delegation --key HEX --api responses

In ``delegation`` mode the subscription holder (``--key``) runs nilai-py's
DelegationTokenServer in this process and the client gets its delegation from it, as an app's
backend and frontend would. Each request is a non-streaming and then a streaming completion;
``--requests N`` repeats the pair. The output has one entry per completion: the status (or the
error the SDK raised), the content, and the signature fields the SDK saw.

``--web-search`` makes every request the call a nilai-py user makes for web search (nilai-py
0.3.1 has no web-search method or README example of its own; it is the OpenAI SDK's extra body),
``client.chat.completions.create(..., extra_body={"web_search": True})``, and adds the
``sources`` the SDK saw (the answer's, or the last chunk's). Every entry also carries what went
over the wire, ``request`` and ``body`` (the raw request and response bodies, recorded by the
client's transport without changing the call), so that the test can verify the signatures.

``--api responses`` makes every request the Responses API call of the OpenAI SDK nilai-py's
client is, ``client.responses.create(model=M, input=...)`` (and with ``stream=True``), and
reports the text, usage and signature fields the SDK saw (from the response object, or from
the stream's ``response.completed`` event).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
from nilai_py import (
    AuthType,
    Client,
    DelegationServerConfig,
    DelegationTokenServer,
)
from openai.types.chat import ChatCompletionMessageParam


class _Tee(httpx.SyncByteStream):
    """A response body passed through unchanged while its bytes are kept."""

    def __init__(self, inner: httpx.SyncByteStream, kept: bytearray) -> None:
        self._inner = inner
        self._kept = kept

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._kept.extend(chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class RecordingTransport(httpx.BaseTransport):
    """The client's HTTP transport: keeps the last request's body and its response's bytes.

    The SDK still reads (and streams) the response as it arrives; only a copy is kept.
    """

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.request = b""
        self.response = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; its response, with the body recorded as the SDK reads it."""
        self.request = request.read()
        self.response = bytearray()
        answer = self._inner.handle_request(request)
        assert isinstance(answer.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=answer.status_code,
            headers=answer.headers,
            stream=_Tee(answer.stream, self.response),
            extensions=answer.extensions,
            request=request,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._inner.close()


def make_client(args: argparse.Namespace, transport: RecordingTransport) -> Client:
    """A nilai-py client in the requested mode (its chatter goes to stderr, not our JSON)."""
    http_client = httpx.Client(transport=transport)
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        if args.mode == "api_key":
            client = Client(
                base_url=args.base_url, api_key=args.key, max_retries=0, http_client=http_client
            )
        else:
            server = DelegationTokenServer(
                private_key=args.key,
                config=DelegationServerConfig(expiration_time=300, token_max_uses=args.uses),
            )
            client = Client(
                base_url=args.base_url,
                auth_type=AuthType.DELEGATION_TOKEN,
                max_retries=0,
                http_client=http_client,
            )
            request = client.get_delegation_request()
            client.update_delegation(server.create_delegation_token(request))
    sys.stderr.write(chatter.getvalue())
    return client


def complete(
    client: Client,
    transport: RecordingTransport,
    model: str,
    *,
    stream: bool,
    web_search: bool,
    api: str = "chat",
) -> dict[str, Any]:
    """One completion; the SDK's own view of the answer, or of the error."""
    if api == "responses":
        result = _respond(client, model, stream=stream, web_search=web_search)
    else:
        result = _complete(client, model, stream=stream, web_search=web_search)
    result["request"] = transport.request.decode()
    result["body"] = transport.response.decode(errors="replace")
    return result


def _complete(client: Client, model: str, *, stream: bool, web_search: bool) -> dict[str, Any]:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
    # Exactly what the web-search example passes; nothing at all without --web-search.
    extra_body = {"web_search": True} if web_search else None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if not stream:
                answer = client.chat.completions.create(
                    model=model, messages=messages, extra_body=extra_body
                )
                extra = answer.model_extra or {}
                return {
                    "stream": False,
                    "status": 200,
                    "content": answer.choices[0].message.content,
                    "signature": extra.get("signature"),
                    "request_sha256": extra.get("request_sha256"),
                    "sources": extra.get("sources"),
                    "raw": answer.model_dump(mode="json"),
                }
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=extra_body,
                )
            )
    except openai.APIStatusError as exc:
        return {"stream": stream, "status": exc.status_code, "error": exc.body}
    last = chunks[-1].model_extra or {}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return {
        "stream": True,
        "status": 200,
        "content": text,
        "signature": last.get("signature"),
        "request_sha256": last.get("request_sha256"),
        "sources": last.get("sources"),
        "chunks": len(chunks),
    }


def _respond(client: Client, model: str, *, stream: bool, web_search: bool) -> dict[str, Any]:
    extra_body = {"web_search": True} if web_search else None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if not stream:
                answer = client.responses.create(
                    model=model, input="Say hello", extra_body=extra_body
                )
                events = 0
            else:
                seen = list(
                    client.responses.create(
                        model=model, input="Say hello", stream=True, extra_body=extra_body
                    )
                )
                events = len(seen)
                last = seen[-1]
                if last.type != "response.completed":
                    return {"stream": True, "status": 200, "last_event": last.type}
                answer = last.response
    except openai.APIStatusError as exc:
        return {"stream": stream, "status": exc.status_code, "error": exc.body}
    # The signed fields: on the object itself, or at the top of the completed event.
    signed = (answer.model_extra or {}) if not stream else (seen[-1].model_extra or {})
    usage = answer.usage
    return {
        "stream": stream,
        "status": 200,
        "content": answer.output_text,
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "signature": signed.get("signature"),
        "request_sha256": signed.get("request_sha256"),
        "sources": (answer.model_extra or {}).get("sources"),
        "events": events,
    }


def main() -> None:
    """Parse the arguments, run the completions, print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["api_key", "delegation"], required=True)
    parser.add_argument("--key", required=True, help="hex secp256k1 private key")
    parser.add_argument("--uses", type=int, default=None, help="delegation usage limit")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument(
        "--web-search", action="store_true", help='send extra_body={"web_search": True}'
    )
    parser.add_argument("--api", choices=["chat", "responses"], default="chat")
    args = parser.parse_args()
    transport = RecordingTransport()
    client = make_client(args, transport)
    holder = client.nilauth_private_key.pubkey
    assert holder is not None  # both modes hold a key pair
    report = {
        "openai": openai.__version__,
        "public_key": holder.serialize().hex(),
        "gateway_key": client.nilai_public_key.serialize().hex(),
        "results": [
            complete(
                client,
                transport,
                args.model,
                stream=stream,
                web_search=args.web_search,
                api=args.api,
            )
            for _ in range(args.requests)
            for stream in (False, True)
        ],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

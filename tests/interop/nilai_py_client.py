"""Chat through a nilai gateway with the public nilai-py client; print what it saw as JSON.

Runs in .venv-interop (see requirements.txt), started by tests/e2e/test_nuc.py:

    python nilai_py_client.py --base-url URL --model M --mode api_key --key HEX
    python nilai_py_client.py --base-url URL --model M --mode delegation --key HEX --uses 2

In ``delegation`` mode the subscription holder (``--key``) runs nilai-py's
DelegationTokenServer in this process and the client gets its delegation from it, as an app's
backend and frontend would. Each request is a non-streaming and then a streaming completion;
``--requests N`` repeats the pair. The output has one entry per completion: the status (or the
error the SDK raised), the content, and the signature fields the SDK saw.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Any

import openai
from nilai_py import (
    AuthType,
    Client,
    DelegationServerConfig,
    DelegationTokenServer,
)


def make_client(args: argparse.Namespace) -> Client:
    """A nilai-py client in the requested mode (its chatter goes to stderr, not our JSON)."""
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        if args.mode == "api_key":
            client = Client(base_url=args.base_url, api_key=args.key, max_retries=0)
        else:
            server = DelegationTokenServer(
                private_key=args.key,
                config=DelegationServerConfig(expiration_time=300, token_max_uses=args.uses),
            )
            client = Client(
                base_url=args.base_url, auth_type=AuthType.DELEGATION_TOKEN, max_retries=0
            )
            request = client.get_delegation_request()
            client.update_delegation(server.create_delegation_token(request))
    sys.stderr.write(chatter.getvalue())
    return client


def complete(client: Client, model: str, *, stream: bool) -> dict[str, Any]:
    """One completion; the SDK's own view of the answer, or of the error."""
    messages = [{"role": "user", "content": "Say hello"}]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if not stream:
                answer = client.chat.completions.create(model=model, messages=messages)
                extra = answer.model_extra or {}
                return {
                    "stream": False,
                    "status": 200,
                    "content": answer.choices[0].message.content,
                    "signature": extra.get("signature"),
                    "request_sha256": extra.get("request_sha256"),
                    "raw": answer.model_dump(mode="json"),
                }
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
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
        "chunks": len(chunks),
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
    args = parser.parse_args()
    client = make_client(args)
    report = {
        "openai": openai.__version__,
        "public_key": client.nilauth_private_key.pubkey.serialize().hex(),
        "gateway_key": client.nilai_public_key.serialize().hex(),
        "results": [
            complete(client, args.model, stream=stream)
            for _ in range(args.requests)
            for stream in (False, True)
        ],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

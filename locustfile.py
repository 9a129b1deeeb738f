"""Load test a running nilai deployment with Locust.

Locust is not a dependency of nilai; install it where you run the test::

    pip install locust
    NILAI_API_KEY=... locust -f locustfile.py --host https://nilai.example.com
    # headless: add --headless -u 50 -r 5 -t 10m --csv nilai-load

Settings, all from the environment:

- ``NILAI_URL``: the gateway's base URL (``--host`` or the web UI's host field win over it).
- ``NILAI_API_KEY``: sent as ``Authorization: Bearer ...`` (an API key or a NUC token).
- ``NILAI_MODEL``: the model to ask; default: the first id that ``GET /v1/models`` lists.
- ``NILAI_STREAM_RATIO``: share of chat requests that stream, 0 to 1 (default 0.5).
- ``NILAI_MAX_TOKENS``: ``max_tokens`` of each chat request (default 64).
- ``NILAI_PROMPT``: the user message (default: a short fixed question).
- ``NILAI_WAIT_MIN_S`` / ``NILAI_WAIT_MAX_S``: think time between a user's tasks (default 0.5-2).

What it reports: ``chat`` (non-streaming), ``chat stream`` (until the last byte of the stream),
``chat stream TTFT`` (until the first streamed chunk) and ``/v1/models``. A chat answer without
a ``signature`` (on the body, or on the last chunk of a stream) counts as a failure. Nothing of
the prompts or answers is logged.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import HttpUser, between, task
from locust.exception import StopUser
from requests import RequestException, Response

API_KEY = os.environ.get("NILAI_API_KEY", "")
MODEL = os.environ.get("NILAI_MODEL", "")
STREAM_RATIO = min(max(float(os.environ.get("NILAI_STREAM_RATIO", "0.5")), 0.0), 1.0)
MAX_TOKENS = int(os.environ.get("NILAI_MAX_TOKENS", "64"))
PROMPT = os.environ.get("NILAI_PROMPT", "In two sentences, what does a load balancer do?")
WAIT_MIN_S = float(os.environ.get("NILAI_WAIT_MIN_S", "0.5"))
WAIT_MAX_S = float(os.environ.get("NILAI_WAIT_MAX_S", "2"))

# Task weights: chat requests split by the stream ratio; the model list stays light.
STREAM_WEIGHT = round(100 * STREAM_RATIO)
PLAIN_WEIGHT = 100 - STREAM_WEIGHT
MODELS_WEIGHT = 2

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
TIMEOUT_S = (10, 300)  # connect, read (a long generation may take minutes)

_resolved_model: str | None = MODEL or None


class NilaiUser(HttpUser):
    """One client: chat completions (plain and streamed) and now and then the model list."""

    host = os.environ.get("NILAI_URL") or None
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)

    def on_start(self) -> None:
        """Authenticate every request and settle which model to ask."""
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.model = self._model()

    def _model(self) -> str:
        global _resolved_model  # noqa: PLW0603 - one lookup shared by all users of the process
        if _resolved_model is None:
            with self.client.get(
                MODELS_PATH, name=MODELS_PATH, catch_response=True, timeout=TIMEOUT_S
            ) as response:
                ids = _model_ids(response) if response.ok else []
                if not ids:
                    response.failure("no model to test: set NILAI_MODEL or serve a model")
                    raise StopUser
            _resolved_model = ids[0]
        return _resolved_model

    def _body(self, *, stream: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        }

    @task(PLAIN_WEIGHT)
    def chat(self) -> None:
        """Non-streaming chat completion; the answer must carry a signature."""
        with self.client.post(
            CHAT_PATH,
            json=self._body(stream=False),
            name="chat",
            catch_response=True,
            timeout=TIMEOUT_S,
        ) as response:
            if not response.ok:
                response.failure(f"HTTP {response.status_code}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure("the answer is not JSON")
                return
            if not isinstance(body, dict) or not body.get("signature"):
                response.failure("the answer carries no signature")

    @task(STREAM_WEIGHT)
    def chat_stream(self) -> None:
        """Streaming chat completion, read to the end; reports TTFT as its own entry."""
        started = time.perf_counter()
        first_chunk_ms: float | None = None
        received = 0
        last: dict[str, Any] | None = None
        with self.client.post(
            CHAT_PATH,
            json=self._body(stream=True),
            name="chat stream",
            catch_response=True,
            stream=True,
            timeout=TIMEOUT_S,
        ) as response:
            if not response.ok:
                response.failure(f"HTTP {response.status_code}")
                return
            problem: str | None = None
            try:
                for line in response.iter_lines():
                    received += len(line) + 1
                    if not line.startswith(b"data:"):
                        continue
                    data = line[len(b"data:") :].strip()
                    if data == b"[DONE]":
                        break
                    if first_chunk_ms is None:
                        first_chunk_ms = (time.perf_counter() - started) * 1000
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        problem = "a stream event is not JSON"
                        break
                    if isinstance(chunk, dict):
                        last = chunk
            except RequestException as exc:
                problem = f"the stream broke off: {type(exc).__name__}"
            # The whole stream, not only its headers, is what this entry measures.
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = received
            if problem is None and last is None:
                problem = "the stream carried no chunk"
            if problem is None and last is not None and not last.get("signature"):
                problem = "the last chunk carries no signature"
            if problem is not None:
                response.failure(problem)
        if first_chunk_ms is not None:
            self.environment.events.request.fire(
                request_type="TTFT",
                name="chat stream TTFT",
                response_time=first_chunk_ms,
                response_length=0,
                exception=None,
                context=self.context(),
            )

    @task(MODELS_WEIGHT)
    def list_models(self) -> None:
        """The model list (cheap; keeps an eye on the plain request path)."""
        self.client.get(MODELS_PATH, name=MODELS_PATH, timeout=TIMEOUT_S)


def _model_ids(response: Response) -> list[str]:
    try:
        data = response.json().get("data", [])
    except (ValueError, AttributeError):
        return []
    return [card["id"] for card in data if isinstance(card, dict) and card.get("id")]

"""Calls to model servers: pick a server, fail over on refused connections, map failures.

The answer goes back with the server that gave it; the caller records it (only the chat
service writes the request context).

Failures before any byte reached the client become real statuses: unreachable → 503,
nonsense → 502, too slow → 504. A refused or timed-out connection means the request was never
received, so it is safe to try the next server of the same model.

What a request found out goes back to the snapshot, which decides about ejection (see
``nilai.discovery.snapshot``): could not connect → unreachable; a 5xx other than 503 or a
broken connection → an error; any other answer → a success. Slowness and a full local
connection pool are neither: they say nothing about whether the server works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from nilai.context.search.service import PlannerAnswer
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.errors import (
    InvalidRequest,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from nilai.outages import OutageLog
from nilai.protocol.base import json_count, json_object
from nilai.upstream.client import (
    ConnectFailed,
    ConnectionBroken,
    PoolFull,
    ReadTimedOut,
    UpstreamCallError,
    UpstreamClient,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)

MAX_UPSTREAM_MESSAGE = 500
CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"


@dataclass(frozen=True, slots=True)
class Dispatched:
    """A model server's answer, and the id of the server that gave it."""

    response: UpstreamResponse
    endpoint: str

    async def ok(self) -> UpstreamResponse:
        """The response, if its status is 200; otherwise close it and raise what it means.

        Raises:
            UpstreamUnavailable: The server is overloaded (429, 503).
            InvalidRequest: The server rejected the request (its message, shortened).
            UpstreamProtocolError: The server failed.
        """
        if self.response.status != HTTPStatus.OK:
            await _raise_for_status(self.response)
        return self.response


class Dispatcher:
    """Sends chat payloads to the servers of a model."""

    def __init__(self, upstream: UpstreamClient, snapshot: DiscoverySnapshot) -> None:
        self._upstream = upstream
        self._snapshot = snapshot
        self._pool = OutageLog(
            logger,
            "the upstream connection pool (NILAI_UPSTREAM_MAX_CONNECTIONS)",
            "every connection is busy; answering 503 with Retry-After, ejecting no model server",
        )

    async def send(
        self,
        model: str,
        payload: bytes,
        *,
        stream: bool,
        path: str = CHAT_PATH,
        feature: str | None = None,
    ) -> Dispatched:
        """Return the first answer (its body unread) and its server, POSTing to ``path``.

        With ``feature``, only servers that announce it for ``model`` are tried.

        Any status is returned: ``Dispatched.ok`` turns a failed one into an error, after the
        caller has noted which server answered.

        Raises:
            UpstreamUnavailable: No server could be reached, or the connection pool is full.
            UpstreamTimeout: The server did not answer in time.
            UpstreamProtocolError: The connection broke.
        """
        candidates = self._snapshot.candidates(model, feature=feature)
        for endpoint in candidates:
            url = f"{endpoint.url}{path}"
            accept = "text/event-stream" if stream else "application/json"
            started = time.monotonic()
            try:
                response = await self._upstream.post(url, payload, accept=accept)
            except PoolFull as exc:
                # Every connection this process may open is busy: the gateway's own limit, not
                # the server's fault, and the next server would wait for the same pool.
                self._pool.failed(exc, started=started)
                raise UpstreamUnavailable(
                    "The gateway has no free connection to the model servers right now; "
                    "try again shortly.",
                    code="upstream_busy",
                ) from exc
            except ConnectFailed:
                logger.warning("model server %s unreachable; trying the next", endpoint.id)
                self._snapshot.report_failure(endpoint.id)
                continue
            except ReadTimedOut as exc:
                raise UpstreamTimeout("The model server did not answer in time.") from exc
            except ConnectionBroken as exc:
                self._snapshot.report_error(endpoint.id)
                raise UpstreamProtocolError("The model server broke the connection.") from exc
            self._pool.answered(started=started)
            if _server_failed(response.status):
                self._snapshot.report_error(endpoint.id)
            else:
                self._snapshot.report_success(endpoint.id)
            return Dispatched(response, endpoint.id)
        raise UpstreamUnavailable(
            f"No model server for '{model}' is reachable right now; try again shortly."
        )


def _server_failed(status: int) -> bool:
    """A 5xx that says the server is broken; 503 is a working server shedding load."""
    return status >= HTTPStatus.INTERNAL_SERVER_ERROR and status != HTTPStatus.SERVICE_UNAVAILABLE


async def _raise_for_status(response: UpstreamResponse) -> None:
    try:
        body = await response.read()
    except UpstreamCallError:
        body = b""
    finally:
        await response.aclose()
    status = response.status
    logger.warning("model server answered %d", status)
    if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
        raise UpstreamUnavailable("The model server is overloaded; try again shortly.")
    if HTTPStatus(status).is_client_error and status != HTTPStatus.REQUEST_TIMEOUT:
        raise InvalidRequest(_upstream_message(body), code="upstream_rejected")
    raise UpstreamProtocolError(f"The model server failed (HTTP {status}).")


def _upstream_message(body: bytes) -> str:
    """The model server's own explanation of a rejected request, shortened."""
    fallback = "The model server rejected the request."
    try:
        data = json_object(orjson.loads(body)) or {}
    except orjson.JSONDecodeError:
        return fallback
    error = json_object(data.get("error")) or data
    message = error.get("message")
    if not isinstance(message, str) or not message:
        return fallback
    return message[:MAX_UPSTREAM_MESSAGE]


async def read_body(response: UpstreamResponse) -> bytes:
    """The whole body of a non-streaming answer; a failure to read it is the server's.

    Raises:
        UpstreamTimeout: The body did not arrive in time.
        UpstreamProtocolError: The connection broke.
    """
    try:
        return await response.read()
    except ReadTimedOut as exc:
        raise UpstreamTimeout("The model server did not send its answer in time.") from exc
    except ConnectionBroken as exc:
        raise UpstreamProtocolError("The model server broke the connection.") from exc


def parse_completion(body: bytes) -> dict[str, Any]:
    """Parse a non-streaming completion, insisting on the OpenAI shape."""
    try:
        data = json_object(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError("The model server sent malformed JSON.") from exc
    if data is None or not isinstance(data.get("choices"), list):
        raise UpstreamProtocolError("The model server sent an unexpected response.")
    return data


class PlannerCall:
    """The web search planner's model call: one bounded, non-streaming request to ``model``.

    It goes to the request's own model through the same dispatcher (server choice, failover,
    ejection) while the request holds its model slot. Its failures are ``NilaiError``s, which
    make the search fall back to the user's message rather than fail the request.
    """

    def __init__(self, dispatcher: Dispatcher, model: str) -> None:
        self._dispatcher = dispatcher
        self._model = model
        self.prompt_tokens = 0
        self.completion_tokens = 0
        """What the calls made so far used: the client's to pay, even if the search fails."""

    async def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int, timeout_s: float
    ) -> PlannerAnswer:
        """The model's answer to ``messages`` and the tokens it used.

        Raises:
            UpstreamTimeout: No answer within ``timeout_s``.
            NilaiError: The model server could not be reached or failed.
        """
        payload = orjson.dumps(
            {
                "model": self._model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": False,
            }
        )
        try:
            async with asyncio.timeout(timeout_s):
                answer = await self._dispatcher.send(self._model, payload, stream=False)
                response = await answer.ok()
                try:
                    body = parse_completion(await read_body(response))
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise UpstreamTimeout("The web search planner did not answer in time.") from exc
        usage = json_object(body.get("usage")) or {}
        answer = PlannerAnswer(
            _first_message_text(body),
            prompt_tokens=json_count(usage.get("prompt_tokens")),
            completion_tokens=json_count(usage.get("completion_tokens")),
        )
        self.prompt_tokens += answer.prompt_tokens
        self.completion_tokens += answer.completion_tokens
        return answer


def _first_message_text(body: dict[str, Any]) -> str:
    choices: list[object] = body["choices"]  # parse_completion checked it is a list
    first = json_object(choices[0]) if choices else None
    message = json_object(first.get("message")) if first else None
    content = message.get("content") if message else None
    return content if isinstance(content, str) else ""

"""Prometheus metrics: one explicit registry per app, built in the app factory.

Labels hold only bounded, operator-chosen values: route templates, methods, statuses, served
model ids, limit kinds and error kinds. Never request content, account ids, keys or tokens:
a model id that is not served (a client's free text) is recorded as ``other``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilai.billing.meter import CreditMeter
from nilai.limits.base import Limit
from nilai.usage.sink import UsageSink

# Seconds: from a sub-millisecond gateway hop to a long generation.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip
_UPSTREAM_ERRORS = {
    "UpstreamUnavailable": "unavailable",
    "UpstreamProtocolError": "protocol",
    "UpstreamTimeout": "timeout",
}
UNMATCHED_ROUTE = "unmatched"
OTHER_MODEL = "other"


class Metrics:
    """The gateway's instruments, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_duration = Histogram(
            "nilai_http_request_duration_seconds",
            "HTTP requests by route template, method and status (streams: until the last byte).",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "nilai_http_requests_in_flight", "HTTP requests being served.", registry=r
        )
        self.streams_in_flight = Gauge(
            "nilai_chat_streams_in_flight",
            "Answer streams open (chat completions and the Responses API).",
            registry=r,
        )
        self.chat_duration = Histogram(
            "nilai_chat_duration_seconds",
            "Chat completions, whole request, by model, stream and status.",
            ["model", "stream", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chat_ttft = Histogram(
            "nilai_chat_time_to_first_token_seconds",
            "Time to the first streamed chunk, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.responses_duration = Histogram(
            "nilai_responses_duration_seconds",
            "Responses API requests, whole request, by model, stream and status.",
            ["model", "stream", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.responses_ttft = Histogram(
            "nilai_responses_time_to_first_token_seconds",
            "Responses API streams: time to the first output delta, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "nilai_upstream_duration_seconds",
            "Model server response time (streams: until its headers), by model and stream.",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "nilai_tokens", "Tokens by model and kind (prompt, completion).",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.web_searches = Counter(
            "nilai_web_searches",
            "Searches the web search provider answered (what its plan bills), by model.",
            ["model"],
            registry=r,
        )
        self.tool_calls = Counter(
            "nilai_tool_calls",
            "Server-side tool calls the gateway ran (execute_python), by model.",
            ["model"],
            registry=r,
        )
        self.rate_limited = Counter(
            "nilai_rate_limit_rejections",
            "Requests refused by a limit, by limit kind.",
            ["limit"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "nilai_upstream_errors",
            "Model requests (chat and Responses) failed by the model server, by kind.",
            ["kind"],
            registry=r,
        )
        self.usage_queue_depth = Gauge(
            "nilai_usage_queue_depth", "Query-log rows waiting to be written.", registry=r
        )
        self.usage_dropped = Gauge(
            "nilai_usage_dropped_rows",
            "Query-log rows dropped since start, by reason: queue_full (the database was too slow"
            " or down for too long) or rejected (the database refused a value in the row).",
            ["reason"],
            registry=r,
        )
        self.usage_stalled = Gauge(
            "nilai_usage_writer_stalled_seconds",
            "Seconds query-log rows have waited with none written (0 while the writer keeps up).",
            registry=r,
        )

    def watch_credit_meter(self, meter: CreditMeter) -> None:
        """Read the credit meter's unlock counts at scrape time."""
        unlocks = Gauge(
            "nilai_credit_unlocks",
            "Credit-service unlocks since start, by state: made, refused (an unknown lock), "
            "pending (queued or waiting to be retried while the service is down).",
            ["state"],
            registry=self.registry,
        )
        unlocks.labels("made").set_function(lambda: meter.unlocked)
        unlocks.labels("refused").set_function(lambda: meter.refused)
        unlocks.labels("pending").set_function(lambda: meter.pending)
        Gauge(
            "nilai_credit_unmetered_requests",
            "Requests served without a credit lock while the credit service was down "
            "(NILAI_CREDIT_FAIL_OPEN).",
            registry=self.registry,
        ).set_function(lambda: meter.unmetered)

    def watch_usage_queue(self, sink: UsageSink) -> None:
        """Read the query-log queue's depth, drop counts and stall at scrape time."""
        self.usage_queue_depth.set_function(lambda: sink.depth)
        self.usage_dropped.labels("queue_full").set_function(lambda: sink.overflowed)
        self.usage_dropped.labels("rejected").set_function(lambda: sink.rejected)
        self.usage_stalled.set_function(lambda: sink.stalled_s)

    def observe_chat(
        self,
        *,
        api: str = "chat",
        model: str,
        stream: bool,
        status: int,
        duration_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        error_kind: str | None,
        limit: Limit | None,
        searches: int = 0,
        tool_calls: int = 0,
    ) -> None:
        """Record one finished model request (``model`` already bounded by the caller).

        Durations and time to first token per API (``chat``, ``responses``); tokens, searches,
        tool calls, limits and upstream errors count every API's requests together.
        """
        kind = "stream" if stream else "plain"
        responses = api == "responses"
        duration = self.responses_duration if responses else self.chat_duration
        duration.labels(model, kind, str(status)).observe(duration_s)
        if ttft_s is not None:
            (self.responses_ttft if responses else self.chat_ttft).labels(model).observe(ttft_s)
        if prompt_tokens:
            self.tokens.labels(model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "completion").inc(completion_tokens)
        if searches:
            self.web_searches.labels(model).inc(searches)
        if tool_calls:
            self.tool_calls.labels(model).inc(tool_calls)
        if limit is not None:
            self.rate_limited.labels(limit_kind(limit)).inc()
        if error_kind in _UPSTREAM_ERRORS:
            self.upstream_errors.labels(_UPSTREAM_ERRORS[error_kind]).inc()


def limit_kind(limit: Limit) -> str:
    """A bounded name for a limit: minute, hour, day, lifetime, token, web_search_*, ..."""
    return limit.kind


class MetricsMiddleware:
    """Times every HTTP request by route template (never the raw path) and counts in-flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight = self._metrics.requests_in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            in_flight.dec()
            route = scope.get("route")
            template = route.path if isinstance(route, Route) else UNMATCHED_ROUTE
            self._metrics.http_duration.labels(template, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )

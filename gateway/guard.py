"""What stands between the network and the gateway: body caps, slow senders, metrics.

uvicorn reads a request's headers without a deadline and Starlette its body without a cap;
a client trickling either (slowloris) or sending gigabytes would hold a connection or fill
memory. :class:`Guard` caps and times bodies and counts every request;
:func:`headers_in_time` gives uvicorn's protocol a deadline for the headers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException

from producer.settings import Settings


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "batchery_gateway_requests",
            "HTTP requests answered",
            ["route", "method", "code", "key"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "batchery_gateway_request_seconds",
            "Time to answer",
            ["route"],
            registry=self.registry,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
        )
        self.jobs = Counter(
            "batchery_gateway_jobs",
            "Jobs submitted through the gateway",
            ["key"],
            registry=self.registry,
        )
        self.webhooks = Counter("batchery_webhook_deliveries", "Webhook delivery attempts",
                                ["outcome"], registry=self.registry)  # fmt: skip
        # Read from Redis at scrape time; also exported by workers, but a deployment scaled
        # to zero workers still needs a source to scale up from.
        self.backlog = Gauge("batchery_backlog_jobs", "Jobs pushed and not answered yet: "
                             "waiting, buffered in workers, running", ["queue"],
                             registry=self.registry)  # fmt: skip


def route_label(path: str) -> str:
    """A bounded label for a request path."""
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{job_id}"
    known = {"/", "/v1/jobs", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json",
             "/docs"}  # fmt: skip
    if path in known:
        return path
    return "/static" if path.startswith(("/static/", "/docs/")) else "other"


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware: caps request bodies, times out slow senders, counts every request.

    A body over BATCHERY_HTTP_MAX_BODY is refused (413) from its Content-Length before a
    byte of it is read, or as soon as a chunked body passes the cap; a body not fully sent
    within BATCHERY_HTTP_BODY_TIMEOUT is answered 408.
    """

    def __init__(self, app: Any, settings: Settings, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_body = settings.http_max_body
        self.body_timeout = settings.http_body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def counted_send(message: MutableMapping[str, Any]) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            length = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.max_body:
                await _reply(counted_send, 413, f"request body of {length} bytes is over the "
                             f"cap of {self.max_body} (BATCHERY_HTTP_MAX_BODY)")  # fmt: skip
            else:
                await self.app(scope, self._bounded(receive), counted_send)
        finally:
            route = route_label(scope["path"])
            owner = scope.get("state", {}).get("owner") or "-"
            self.metrics.requests.labels(route, scope["method"], str(code), owner).inc()
            self.metrics.seconds.labels(route).observe(time.perf_counter() - started)

    def _bounded(self, receive: Receive) -> Receive:
        received = 0
        deadline: float | None = None
        done = False

        async def bounded() -> MutableMapping[str, Any]:
            nonlocal received, deadline, done
            if done:
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within "
                                    f"{self.body_timeout:g} s (BATCHERY_HTTP_BODY_TIMEOUT)"
                                    ) from None  # fmt: skip
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body over the cap of {self.max_body} "
                                        "bytes (BATCHERY_HTTP_MAX_BODY)")  # fmt: skip
                done = not message.get("more_body", False)
            return message

        return bounded


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def headers_in_time(seconds: float) -> type:
    """uvicorn's httptools protocol, closing a connection whose request headers have not all
    arrived ``seconds`` after it opened or after the request's first byte."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadersInTime(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self.transport.close)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadersInTime

"""HTTP plumbing shared by the gateway's APIs: OpenAI-shaped errors, request bodies read within
limits, SSE framing, the per-endpoint request counter, and the connection guards uvicorn lacks
(slow and idle clients, a connection cap)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import h11
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from common import metrics
from common.messages import E_INVALID

MAX_BODY_BYTES = 64 << 10


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        408: "invalid_request_error",
        409: "cancelled",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
        504: "timeout",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "api_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.retry_after:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body(), self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    metrics.ERRORS.labels("gateway", E_INVALID).inc()
    return ApiError(400, message, param=param, code=E_INVALID)


def _too_large() -> ApiError:
    metrics.ERRORS.labels("gateway", "request_too_large").inc()
    # The rest of the body is never read: the connection is closed after this answer.
    return ApiError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        code="request_too_large",
        headers={"Connection": "close"},
    )


async def read_json(request: Request, timeout_s: float) -> Any:
    """The request's JSON body, refused without buffering more than ``MAX_BODY_BYTES``: by its
    Content-Length before a byte is read, else while it streams in; a body that does not arrive
    whole within ``timeout_s`` gets 408.  Both close the connection."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise invalid("the Content-Length header is not a number")
        if int(length) > MAX_BODY_BYTES:
            raise _too_large()
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _too_large()
    except TimeoutError:
        metrics.ERRORS.labels("gateway", "request_timeout").inc()
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:  # nobody reads the answer; the counter sees a 400
        raise invalid("the client went away while sending the body") from None
    try:
        return json.loads(body)
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON") from None


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def api_error(_request: Request, exc: ApiError) -> Response:
    return exc.response()


async def http_error(_request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method) in the OpenAI shape, keeping its headers (Allow)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return ApiError(
        exc.status_code, str(exc.detail), code=codes.get(exc.status_code), headers=dict(exc.headers or {})
    ).response()


class CountRequests:
    """ASGI wrapper: requests and latency per endpoint (its function name: no ids, no prompts) and status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = [0], time.perf_counter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = getattr(scope.get("endpoint"), "__name__", "none")
            metrics.GATEWAY_REQUESTS.labels(endpoint, str(status[0] or 499)).inc()
            metrics.GATEWAY_LATENCY.labels(endpoint).observe(time.perf_counter() - started)


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with what it lacks against slow and idle clients: a connection must
    send a whole request head within ``header_timeout_s`` of opening or of its last response (uvicorn
    only times out idle keep-alive connections, and only after a first response), and one more
    than ``max_connections`` is closed at once.  Bodies are timed by ``read_json``.  Made for a
    gateway's settings by :func:`guarded_protocol`."""

    header_timeout_s: float = 10.0
    max_connections: int = 2048
    _head_timer: asyncio.TimerHandle | None = None
    _counted = False
    _got_bytes = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            metrics.GATEWAY_CLOSED.labels("over_cap").inc()
            transport.abort()
            return
        self._counted = True
        metrics.GATEWAY_CONNECTIONS.inc()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            metrics.GATEWAY_CONNECTIONS.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            metrics.GATEWAY_CLOSED.labels("keep_alive").inc()
        super().timeout_keep_alive_handler()

    def _arm(self) -> None:
        self._disarm()
        self._got_bytes = False
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            metrics.GATEWAY_CLOSED.labels("slow_header" if self._got_bytes else "idle").inc()
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """:class:`GuardedProtocol` with these limits (uvicorn takes a protocol class, not an instance)."""

    class Guarded(GuardedProtocol):
        pass

    Guarded.header_timeout_s, Guarded.max_connections = header_timeout_s, max_connections
    return Guarded

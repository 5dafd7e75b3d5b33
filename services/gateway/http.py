"""HTTP plumbing shared by the gateway's APIs: OpenAI-shaped errors, request bodies, SSE framing,
the per-endpoint request counter."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import metrics
from common.messages import E_INVALID

MAX_BODY_BYTES = 64 << 10


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        409: "cancelled",
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
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

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
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else None
        return JSONResponse(self.body(), self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    metrics.ERRORS.labels("gateway", E_INVALID).inc()
    return ApiError(400, message, param=param, code=E_INVALID)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise invalid(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON") from None


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def api_error(_request: Request, exc: ApiError) -> Response:
    return exc.response()


async def http_error(_request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
    return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


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

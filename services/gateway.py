"""Gateway: the HTTP front door.  The OpenAI images API (the light image streamed first), an
async jobs API, API keys with shared limits, health/readiness, metrics and a web playground.

It talks to the stack only through Redis: jobs go in and results come back with
``common.client`` (one reply stream per gateway process); async jobs get a reply stream of
their own (``<ns>:reply:job-<id>``), so any gateway replica can answer for them.

Starlette on uvicorn, not FastAPI: the OpenAI contract wants its own error bodies (400 with
``param``, never FastAPI's 422) and field rules we check by hand anyway, so FastAPI's pydantic
layer would only be bypassed; Starlette is the routing/SSE core FastAPI itself runs on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import MaxConnectionsError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import metrics
from common.blobs import BlobUnavailable
from common.cascades import MODELS, cascade
from common.client import Client
from common.config import ServiceConfig, option
from common.messages import (
    E_CANCELLED,
    E_DEADLINE,
    E_INTERNAL,
    E_INVALID,
    E_OVERLOADED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    ENTRY_FIELD,
    IMAGE_FORMATS,
    FinalResult,
    LightReady,
    MessageError,
    Role,
    Status,
    new_job_id,
    unpack,
)
from common.plan_store import load_plan
from common.service import STOP_GRACE_S, Service, now_ms, run
from common.streams import PIPELINE_GROUPS, TRANSIENT_ERRORS, backlog

PLAYGROUND = Path(__file__).with_name("playground.html")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_BODY_BYTES = 64 << 10

# One atomic admission for a request of n jobs, shared by every gateway replica: the key's
# requests this minute (fixed window) and its jobs in flight (a zset of job ids scored by when
# the entry expires, so a crashed gateway cannot leak slots; a job is out of flight once the
# router's done marker for it exists).  Returns {0, 0} admitted, {1, retry_ms} over the rate,
# {2, retry_ms} too many in flight.  Times are integer ms.
ADMIT = """
local rpm, cap, now, expire_at = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if rpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= rpm then
  return {1, redis.call('PTTL', KEYS[2])}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[6] .. id) == 1 then redis.call('ZREM', KEYS[1], id) end
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) + #ARGV - 6 > cap then return {2, 1000} end
if redis.call('INCR', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
for i = 7, #ARGV do redis.call('ZADD', KEYS[1], expire_at, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], expire_at - now)
return {0, 0}
"""


@dataclass
class GatewayConfig(ServiceConfig):
    """diffserve gateway: HTTP front door (OpenAI images API, jobs API, API keys, playground)."""

    host: str = option("127.0.0.1", "listen address (0.0.0.0 in a container)", env="DIFFSERVE_GATEWAY_HOST")
    port: int = option(8000, "HTTP port", env="DIFFSERVE_GATEWAY_PORT")
    cascade: str = option(
        "sdturbo-sdv15", "cascade served: the only valid `model`, and the default", env="DIFFSERVE_CASCADE"
    )
    api_keys_file: str | None = option(
        None,
        "JSON file of hashed API keys (README); keys are required when this or --api-keys is set",
        env="DIFFSERVE_API_KEYS_FILE",
    )
    api_keys: list[str] = option(
        [], "hashed keys inline, comma-separated name:sha256hex[:rpm[:max_in_flight]]", env="DIFFSERVE_API_KEYS"
    )
    rate_limit_rpm: int = option(
        600, "requests per minute per key unless the key says (0: no limit)", env="DIFFSERVE_RATE_LIMIT_RPM"
    )
    max_in_flight: int = option(
        64, "jobs in flight per key unless the key says (0: no limit)", env="DIFFSERVE_MAX_IN_FLIGHT"
    )
    timeout_s: float = option(
        120.0, "longest a request waits for its images (then 504)", env="DIFFSERVE_GATEWAY_TIMEOUT_S"
    )
    result_ttl_s: int = option(3600, "how long url images and async jobs are kept", env="DIFFSERVE_RESULT_TTL_S")
    max_prompt_chars: int = option(2000, "longest prompt accepted", env="DIFFSERVE_MAX_PROMPT_CHARS")
    worker_alive_s: float = option(
        10.0, "a worker counts as alive for /readyz this long after its heartbeat", env="DIFFSERVE_WORKER_ALIVE_S"
    )
    drain_s: float = option(30.0, "on SIGTERM, how long open requests may take to finish", env="DIFFSERVE_DRAIN_S")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blob_ttl_s < self.result_ttl_s:  # a url image must not outlive the bytes it points to
            raise ValueError(f"blob_ttl_s ({self.blob_ttl_s}) must be at least result_ttl_s ({self.result_ttl_s})")


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


# ---------------------------------------------------------------- API keys


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the secret; the secret itself is never stored
    rpm: int
    max_in_flight: int


ANONYMOUS = ApiKey("anonymous", "", 0, 0)  # keys off: no limits


def load_keys(cfg: GatewayConfig) -> list[ApiKey]:
    """Keys from the JSON file and the inline list; a malformed entry stops the start."""
    entries = []
    if cfg.api_keys_file:
        with open(cfg.api_keys_file, encoding="utf-8") as fh:
            entries += json.load(fh)["keys"]
    for spec in cfg.api_keys:
        parts = spec.split(":")
        entries.append(
            {
                "name": parts[0],
                "sha256": parts[1] if len(parts) > 1 else "",
                **({"rpm": int(parts[2])} if len(parts) > 2 else {}),
                **({"max_in_flight": int(parts[3])} if len(parts) > 3 else {}),
            }
        )
    keys = []
    for e in entries:
        digest = str(e.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not e.get("name"):
            raise SystemExit(f"api key {e.get('name')!r}: needs a name and a 64-hex sha256 of the secret")
        keys.append(
            ApiKey(
                str(e["name"]),
                digest,
                int(e.get("rpm", cfg.rate_limit_rpm)),
                int(e.get("max_in_flight", cfg.max_in_flight)),
            )
        )
    return keys


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- request parsing


@dataclass
class ImageRequest:
    prompt: str
    n: int
    output_format: str
    quality: int
    response_format: str
    stream: bool
    partials: bool


def parse_image_request(body: object, cfg: GatewayConfig, size: str, *, jobs_api: bool = False) -> ImageRequest:
    """The OpenAI images.generate fields we serve; unknown fields are ignored, a wrong type or
    value is a 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")

    fields: dict[str, Any] = body

    def get(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = fields.get(name)
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise invalid(f"'{name}' must be of type {names}", name)
        return value

    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("'prompt' is required: a non-empty string", "prompt")
    if len(prompt) > cfg.max_prompt_chars:
        metrics.ERRORS.labels("gateway", E_PROMPT_TOO_LONG).inc()
        raise ApiError(
            400, f"'prompt' is longer than {cfg.max_prompt_chars} characters", param="prompt", code=E_PROMPT_TOO_LONG
        )
    if "\x00" in prompt:
        raise invalid("'prompt' contains a NUL character", "prompt")
    model = get("model", str, cfg.cascade)
    if model != cfg.cascade:
        metrics.ERRORS.labels("gateway", E_UNKNOWN_MODEL).inc()
        raise ApiError(
            400, f"model {model!r} is not served here; models: {cfg.cascade}", param="model", code=E_UNKNOWN_MODEL
        )
    n = get("n", int, 1)
    if not 1 <= n <= (1 if jobs_api else 10):
        raise invalid("'n' must be 1 for a job" if jobs_api else "'n' must be between 1 and 10", "n")
    requested = get("size", str, "auto")
    if requested not in ("auto", size):
        raise invalid(f"size {requested!r} is not supported; sizes: auto, {size}", "size")
    output_format = get("output_format", str, "png")
    if output_format not in IMAGE_FORMATS:
        raise invalid(f"'output_format' must be one of {', '.join(IMAGE_FORMATS)}", "output_format")
    quality = get("output_compression", int, 90)
    if not 0 <= quality <= 100:
        raise invalid("'output_compression' must be between 0 and 100", "output_compression")
    response_format = get("response_format", str, "b64_json")
    if response_format not in ("b64_json", "url"):
        raise invalid("'response_format' must be b64_json or url", "response_format")
    stream = get("stream", bool, False)
    partial_images = get("partial_images", int, 0)
    if not 0 <= partial_images <= 3:
        raise invalid("'partial_images' must be between 0 and 3", "partial_images")
    get("user", str, None)
    return ImageRequest(prompt, n, output_format, max(1, quality), response_format, stream, partial_images > 0)


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


def result_error(result: FinalResult) -> ApiError:
    """A final result that carries no image, as the HTTP error it means."""
    code = result.error_code or "internal_error"
    statuses: dict[str, int] = {
        E_OVERLOADED: 429,
        E_DEADLINE: 504,
        E_INVALID: 400,
        E_PROMPT_TOO_LONG: 400,
        E_UNKNOWN_MODEL: 400,
        E_CANCELLED: 409,
    }
    status = statuses.get(code, 500)
    retry_after = None
    if status == 429:  # the router's hint (the predicted time until a retry fits), else a second
        retry_after = result.retry_after_ms / 1000 if result.retry_after_ms else 1
    return ApiError(status, result.error_message or code, code=code, retry_after=retry_after)


def extra(result: FinalResult, seed: int | None = None) -> dict[str, Any]:
    """Our own fields beside each OpenAI image object."""
    return {
        "job_id": result.job_id,
        "seed": seed,
        "answered_by": result.answered_by,
        "model": result.model,
        "confidence": result.confidence,
        "degraded": result.degraded,
        "latency_ms": result.latency_ms,
        "slo_met": result.slo_met,
    }


class Gateway:
    def __init__(self, svc: Service[GatewayConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.client = Client(self.cfg)
        self.api_keys = load_keys(self.cfg)
        spec = cascade(self.cfg.cascade)
        self.size = f"{MODELS[spec.heavy].resolution}x{MODELS[spec.heavy].resolution}"
        self.playground = PLAYGROUND.read_text(encoding="utf-8")
        self.admit_script = self.r.register_script(ADMIT)
        routes = [
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            Route("/v1/images/generations", self.generations, methods=["POST"]),
            Route("/v1/images/files/{token}", self.image_file),
            Route("/v1/jobs", self.create_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}", self.cancel_job, methods=["DELETE"]),
            Route("/v1/jobs/{job_id}/events", self.job_events),
            Route("/v1/status", self.status),
        ]
        handlers: dict[Any, Callable[..., Awaitable[Response]]] = {
            ApiError: _api_error,
            HTTPException: _http_error,
            # Redis gone: tell the caller to come back; the service itself keeps running.
            **{cls: self._no_redis for cls in TRANSIENT_ERRORS},
            MaxConnectionsError: self._pool_full,
            BlobUnavailable: self._no_blobs,
            LookupError: _image_gone,
        }
        self.app = CountRequests(Starlette(routes=routes, exception_handlers=handlers))

    async def _no_redis(self, _request: Request, exc: Exception) -> JSONResponse:
        self.svc.log.warning("redis unavailable", extra={"error": str(exc)[:200]})
        metrics.ERRORS.labels("gateway", "redis_unavailable").inc()
        return ApiError(
            503, "the queue (Redis) is unreachable; retry later", code="unavailable", retry_after=1
        ).response()

    async def _no_blobs(self, _request: Request, exc: Exception) -> JSONResponse:
        self.svc.log.warning("image store unavailable", extra={"error": str(exc)[:200]})
        return ApiError(503, f"{exc}; retry later", code="unavailable", retry_after=1).response()

    async def _pool_full(self, _request: Request, _exc: Exception) -> JSONResponse:
        """redis-py's pool cap (100 connections a client) reached, e.g. by many open event streams."""
        metrics.ERRORS.labels("gateway", E_OVERLOADED).inc()
        return ApiError(
            429,
            "overloaded: too many requests in flight on this gateway, retry later",
            code=E_OVERLOADED,
            retry_after=1,
        ).response()

    # ---------- auth and limits ----------
    def authenticate(self, request: Request) -> ApiKey:
        if not self.api_keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            metrics.KEY_REQUESTS.labels("none", "unauthorized").inc()
            raise ApiError(401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
        digest = hash_key(secret.strip())
        found = None
        for key in self.api_keys:  # compare with every key, in constant time each
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            metrics.KEY_REQUESTS.labels("unknown", "unauthorized").inc()
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return found

    async def admit(self, key: ApiKey, job_ids: list[str]) -> None:
        if key is ANONYMOUS:
            return
        now = int(now_ms())
        prefix = f"{self.keys.gateway_prefix}key:{key.name}:"
        window, into = divmod(now, 60_000)
        verdict, retry_ms = await self.admit_script(
            keys=[prefix + "in-flight", prefix + f"rpm:{window}"],
            args=[
                key.rpm,
                key.max_in_flight,
                now,
                now + int((self.cfg.timeout_s + self.cfg.result_ttl_s) * 1000),
                60_000 - into,
                self.keys.done_prefix,
                *job_ids,
            ],
        )
        if verdict == 1:
            metrics.KEY_REQUESTS.labels(key.name, "rate_limited").inc()
            raise ApiError(
                429,
                f"rate limit of {key.rpm} requests per minute reached",
                code="rate_limit_exceeded",
                retry_after=max(1, int(retry_ms)) / 1000,
            )
        if verdict == 2:
            metrics.KEY_REQUESTS.labels(key.name, "too_many_in_flight").inc()
            raise ApiError(
                429,
                f"more than {key.max_in_flight} jobs in flight for this key",
                code="too_many_in_flight",
                retry_after=1,
            )
        metrics.KEY_REQUESTS.labels(key.name, "admitted").inc()
        metrics.KEY_JOBS.labels(key.name).inc(len(job_ids))

    async def release(self, key: ApiKey, job_ids: list[str]) -> None:
        if key is not ANONYMOUS:
            await self.r.zrem(f"{self.keys.gateway_prefix}key:{key.name}:in-flight", *job_ids)

    # ---------- images API ----------
    async def generations(self, request: Request) -> Response:
        key = self.authenticate(request)
        req = parse_image_request(await read_json(request), self.cfg, self.size)
        job_ids = [new_job_id() for _ in range(req.n)]
        await self.admit(key, job_ids)
        seeds = secrets.SystemRandom().sample(range(2**31), req.n)  # n distinct seeds: n different images
        if req.stream:
            return StreamingResponse(
                self._stream(key, req, job_ids, seeds),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        work = asyncio.ensure_future(asyncio.gather(*(self._submit(req, j, s) for j, s in zip(job_ids, seeds))))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            waiting: set[asyncio.Future[Any]] = {work, gone}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the caller hung up: its jobs are not worth a GPU any more
                await self.client.cancel(*job_ids, ttl_s=self.cfg.result_ttl_s)
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            try:
                results = work.result()
            except asyncio.TimeoutError:
                await self.client.cancel(*job_ids, ttl_s=self.cfg.result_ttl_s)
                metrics.ERRORS.labels("gateway", E_DEADLINE).inc()
                raise ApiError(504, f"no image within {self.cfg.timeout_s:g} s", code=E_DEADLINE) from None
            for result in results:
                if result.status != Status.OK:
                    raise result_error(result)
            data = [await self._image_object(request, req, r, s) for r, s in zip(results, seeds)]
            return JSONResponse(
                {
                    "created": int(time.time()),
                    "data": data,
                    "output_format": req.output_format,
                    "size": self.size,
                    "background": "opaque",
                    "quality": "auto",
                }
            )
        finally:
            work.cancel()
            gone.cancel()
            await self.release(key, job_ids)

    async def _submit(
        self, req: ImageRequest, job_id: str, seed: int, on_light: Callable[[LightReady], None] | None = None
    ) -> FinalResult:
        return await self.client.submit(
            req.prompt,
            job_id=job_id,
            seed=seed,
            image_format=req.output_format,
            image_quality=req.quality,
            timeout=self.cfg.timeout_s,
            on_light=on_light,
            cascade=self.cfg.cascade,
            image_ref=True,  # the bytes come from the image store, not through the queues
        )

    async def _image_object(
        self, request: Request, req: ImageRequest, result: FinalResult, seed: int
    ) -> dict[str, Any]:
        if req.response_format == "url":
            # The stored image itself: presigned when the store can sign (S3), else a link to this gateway
            # (its key holds the small answer; the bytes stay in the store until they expire).
            signed = result.image_ref and await self.client.blobs.url(result.image_ref, self.cfg.result_ttl_s)
            if signed:
                image = {"url": signed}
            else:
                token = secrets.token_urlsafe(18)
                await self.r.set(f"{self.keys.gateway_prefix}image:{token}", result.encode(), ex=self.cfg.result_ttl_s)
                image = {"url": str(request.url_for("image_file", token=f"{token}.{result.image_format}"))}
        else:
            image = {"b64_json": base64.b64encode(await self.client.image(result, release=True)).decode()}
        return {**image, "revised_prompt": None, "diffserve": extra(result, seed)}

    async def _stream(
        self, key: ApiKey, req: ImageRequest, job_ids: list[str], seeds: list[int]
    ) -> AsyncIterator[bytes]:
        """SSE: per job, its light image as image_generation.partial_image when it goes on to the heavy
        model (and partials were asked for), then image_generation.completed with the answer."""
        events: asyncio.Queue[LightReady | FinalResult] = asyncio.Queue()
        index = {job_id: i for i, job_id in enumerate(job_ids)}

        async def one(job_id: str, seed: int) -> None:
            on_light = (lambda light: events.put_nowait(light)) if req.partials else None
            try:
                events.put_nowait(await self._submit(req, job_id, seed, on_light))
            except asyncio.TimeoutError:
                events.put_nowait(
                    FinalResult(
                        job_id=job_id,
                        status=Status.ERROR,
                        error_code=E_DEADLINE,
                        error_message=f"no image within {self.cfg.timeout_s:g} s",
                    )
                )

        tasks = [asyncio.ensure_future(one(j, s)) for j, s in zip(job_ids, seeds)]
        finished: set[str] = set()
        common = {"background": "opaque", "output_format": req.output_format, "quality": "auto", "size": self.size}
        try:
            while len(finished) < len(job_ids):
                message = await events.get()
                ok = isinstance(message, LightReady) or message.status == Status.OK
                data = await self._image_bytes(message) if ok else b""
                if isinstance(message, LightReady):
                    if data is None:  # a preview the store cannot give is skipped; the answer follows
                        continue
                    yield sse(
                        "image_generation.partial_image",
                        {
                            "type": "image_generation.partial_image",
                            **common,
                            "created_at": int(time.time()),
                            "b64_json": base64.b64encode(data).decode(),
                            "partial_image_index": 0,
                            "diffserve": {
                                "job_id": message.job_id,
                                "index": index[message.job_id],
                                "answered_by": Role.LIGHT,
                                "model": message.model,
                                "confidence": message.confidence,
                            },
                        },
                    )
                    continue
                finished.add(message.job_id)
                if message.status != Status.OK:
                    yield sse("error", result_error(message).body())
                    continue
                if data is None:
                    yield sse("error", ApiError(500, "the image could not be read", code=E_INTERNAL).body())
                    continue
                yield sse(
                    "image_generation.completed",
                    {
                        "type": "image_generation.completed",
                        **common,
                        "created_at": int(time.time()),
                        "b64_json": base64.b64encode(data).decode(),
                        "usage": {
                            "input_tokens": 0,
                            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                            "output_tokens": 0,
                            "total_tokens": 0,
                        },
                        "diffserve": {**extra(message, seeds[index[message.job_id]]), "index": index[message.job_id]},
                    },
                )
        finally:  # done, or the caller hung up (Starlette cancels us): cancel what is still pending
            pending = [j for j in job_ids if j not in finished]
            for task in tasks:
                task.cancel()
            # Shielded: Starlette cancels through an anyio scope, which would cancel these awaits too.
            with anyio.CancelScope(shield=True), contextlib.suppress(*TRANSIENT_ERRORS):
                if pending:
                    await self.client.cancel(*pending, ttl_s=self.cfg.result_ttl_s)
                await self.release(key, job_ids)

    async def _image_bytes(self, message: FinalResult | LightReady) -> bytes | None:
        """The image of a streamed message (read and deleted from the image store when stored); None when
        the store cannot give it (counted)."""
        try:
            return await self.client.image(message, release=True)
        except (BlobUnavailable, LookupError) as exc:
            metrics.ERRORS.labels("gateway", E_INTERNAL).inc()
            self.svc.log.warning("streamed image unavailable", extra={"error": str(exc)[:200]})
            return None

    async def image_file(self, request: Request) -> Response:
        token, _, _ext = request.path_params["token"].partition(".")
        raw: Any = await self.r.get(f"{self.keys.gateway_prefix}image:{token}")
        if raw is None:
            raise ApiError(404, "no such image (links expire with the result TTL)", code="not_found")
        result = FinalResult.decode(raw)
        data = await self.client.image(result)
        return Response(data, media_type=MIME.get(result.image_format or "", "application/octet-stream"))

    # ---------- jobs API ----------
    def _job_keys(self, job_id: str) -> tuple[str, str]:
        """(its meta hash, its own reply stream: the router's final result and any LightReady land there)."""
        return f"{self.keys.gateway_prefix}job:{job_id}", f"{self.keys.reply_prefix}job-{job_id}"

    async def create_job(self, request: Request) -> Response:
        key = self.authenticate(request)
        req = parse_image_request(await read_json(request), self.cfg, self.size, jobs_api=True)
        job_id = new_job_id()
        await self.admit(key, [job_id])
        meta, reply = self._job_keys(job_id)
        created = int(time.time())
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={"key": key.name, "created": created, "format": req.output_format})
            pipe.expire(meta, self.cfg.result_ttl_s)
            await pipe.execute()
        await self.client.enqueue(
            req.prompt,
            job_id=job_id,
            seed=secrets.randbelow(2**31),
            image_format=req.output_format,
            image_quality=req.quality,
            reply_to=reply,
            partials=True,
            cascade=self.cfg.cascade,
        )
        return JSONResponse(
            {"id": job_id, "object": "image.job", "status": "queued", "created": created},
            202,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )

    async def _job(self, request: Request) -> tuple[str, dict[bytes, bytes]]:
        key = self.authenticate(request)
        job_id = request.path_params["job_id"]
        meta: Any = await self.r.hgetall(self._job_keys(job_id)[0]) if len(job_id) <= 128 else {}
        if not meta or meta.get(b"key", b"").decode() != key.name:  # another key's job is not yours to see
            raise ApiError(404, f"no job {job_id!r}", param="job_id", code="not_found")
        return job_id, meta

    async def _job_messages(
        self, job_id: str, after: str = "-", block_ms: int | None = None
    ) -> list[tuple[str, LightReady | FinalResult]]:
        """[(entry id, LightReady | FinalResult)] on the job's reply stream after ``after``."""
        reply = self._job_keys(job_id)[1]
        items: Any
        if block_ms is None:
            items = await self.r.xrange(reply, min=after)
        else:
            got: Any = await self.r.xread({reply: after}, block=block_ms, count=16)
            items = got[0][1] if got else []
        out: list[tuple[str, LightReady | FinalResult]] = []
        for entry_id, fields in items:
            try:
                body = unpack(fields[ENTRY_FIELD])
                kind: type[LightReady | FinalResult] = (
                    LightReady if body.get("type") == LightReady.TYPE else FinalResult
                )
                out.append((entry_id.decode(), kind.from_dict(body)))
            except (MessageError, KeyError):
                continue
        return out

    def _job_view(
        self, job_id: str, meta: dict[bytes, bytes], messages: list[tuple[str, LightReady | FinalResult]]
    ) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": job_id,
            "object": "image.job",
            "status": "queued",
            "created": int(meta[b"created"]),
            "output_format": meta[b"format"].decode(),
            "size": self.size,
        }
        for _entry_id, message in messages:
            if isinstance(message, LightReady):
                view["status"] = "light_ready"
                view["light_image"] = {
                    "b64_json": base64.b64encode(message.image or b"").decode(),
                    "model": message.model,
                    "confidence": message.confidence,
                }
            else:
                view["status"] = {Status.OK: "done", Status.CANCELLED: "cancelled"}.get(message.status, "error")
                if message.status == Status.OK:
                    view["data"] = [
                        {
                            "b64_json": base64.b64encode(message.image or b"").decode(),
                            "revised_prompt": None,
                            "diffserve": extra(message),
                        }
                    ]
                else:
                    view["error"] = result_error(message).body()["error"]
        return view

    async def get_job(self, request: Request) -> Response:
        job_id, meta = await self._job(request)
        return JSONResponse(self._job_view(job_id, meta, await self._job_messages(job_id)))

    async def job_events(self, request: Request) -> Response:
        job_id, meta = await self._job(request)

        async def events() -> AsyncIterator[bytes]:
            yield sse("queued", {"id": job_id, "status": "queued"})
            last, deadline = "-", time.monotonic() + self.cfg.timeout_s
            messages = await self._job_messages(job_id)
            while time.monotonic() < deadline:
                for entry_id, message in messages:
                    last = entry_id
                    view = self._job_view(job_id, meta, [(entry_id, message)])
                    yield sse("light_ready" if isinstance(message, LightReady) else "done", view)
                    if not isinstance(message, LightReady):
                        return
                messages = await self._job_messages(job_id, "0-0" if last == "-" else last, block_ms=1000)
            yield sse("error", ApiError(504, "no result within the gateway timeout", code=E_DEADLINE).body())

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def cancel_job(self, request: Request) -> Response:
        job_id, meta = await self._job(request)
        view = self._job_view(job_id, meta, await self._job_messages(job_id))
        if view["status"] in ("queued", "light_ready"):
            await self.client.cancel(job_id, ttl_s=self.cfg.result_ttl_s)
            view["cancel_requested"] = True
        return JSONResponse(view, 202 if view.get("cancel_requested") else 200)

    # ---------- health, status, playground ----------
    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        checks = {"redis": False, "plan": False, "workers": 0}
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.r.ping()
            checks["redis"] = True
            checks["plan"] = await load_plan(self.r, self.keys) is not None
            checks["workers"] = await self.r.zcount(
                self.keys.workers, now_ms() - self.cfg.worker_alive_s * 1000, "+inf"
            )
        ready = checks["redis"] and checks["plan"] and checks["workers"] > 0
        return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)

    async def metrics(self, _request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def status(self, request: Request) -> Response:
        """What the playground's live panel shows: the plan in force, queue depths, live workers."""
        self.authenticate(request)
        plan = await load_plan(self.r, self.keys)
        queues = {attr: await backlog(self.r, getattr(self.keys, attr), group) for attr, group in PIPELINE_GROUPS}
        alive: Any = await self.r.zrangebyscore(self.keys.workers, now_ms() - self.cfg.worker_alive_s * 1000, "+inf")
        roles: dict[str, int] = {}
        for worker in alive:
            role: Any = await self.r.hget(self.keys.worker_info(worker.decode()), "role")
            roles[(role or b"unknown").decode()] = roles.get((role or b"unknown").decode(), 0) + 1
        plan_view = (
            None
            if plan is None
            else {
                "version": plan.version,
                "policy": plan.policy,
                "threshold": plan.threshold,
                "light_batch": plan.light_batch,
                "heavy_batch": plan.heavy_batch,
                "light_workers": plan.light_workers,
                "heavy_workers": plan.heavy_workers,
                "demand_qps": plan.demand_qps,
            }
        )
        return JSONResponse(
            {
                "cascade": self.cfg.cascade,
                "size": self.size,
                "plan": plan_view,
                "queues": queues,
                "workers": roles,
                "keys_required": bool(self.api_keys),
            }
        )

    async def index(self, _request: Request) -> Response:
        return HTMLResponse(self.playground)


async def _api_error(_request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _image_gone(_request: Request, exc: Exception) -> Response:
    metrics.ERRORS.labels("gateway", E_INTERNAL).inc()
    return ApiError(500, str(exc), code=E_INTERNAL).response()


async def _http_error(_request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
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


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # Service.run owns SIGTERM/SIGINT and asks us to drain


async def serve(svc: Service[GatewayConfig]) -> None:
    gateway = Gateway(svc)
    cfg = svc.config
    server = _Server(
        uvicorn.Config(
            gateway.app,
            host=cfg.host,
            port=cfg.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            # annotated int, but it is an asyncio.wait_for timeout: fractions of a second work
            timeout_graceful_shutdown=cfg.drain_s,  # type: ignore[arg-type]
        )
    )
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        svc.ready()
        svc.log.info("listening", extra={"host": cfg.host, "port": cfg.port, "api_keys": len(gateway.api_keys)})
        stop = asyncio.ensure_future(svc.stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True  # stop accepting; open requests get drain_s to finish
        stop.cancel()
    await task
    await gateway.client.close()


def main(argv: list[str] | None = None) -> None:
    config = GatewayConfig.from_args(argv, prog="diffserve gateway")
    run("gateway", config, serve, stop_grace_s=config.drain_s + STOP_GRACE_S)  # open requests get drain_s


if __name__ == "__main__":
    main()

"""The OpenAI images API: ``POST /v1/images/generations`` (also streamed: the light image first)
and the ``url`` images it links to."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from common import metrics
from common.client import Client
from common.config import Keys
from common.messages import (
    E_CANCELLED,
    E_DEADLINE,
    E_INVALID,
    E_OVERLOADED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    IMAGE_FORMATS,
    FinalResult,
    LightReady,
    Role,
    Status,
    new_job_id,
)
from common.streams import TRANSIENT_ERRORS
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, disconnected, invalid, read_json, sse
from services.gateway.keys import ApiKey, Limits

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

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


class ImagesApi:
    def __init__(self, cfg: GatewayConfig, keys: Keys, r: aioredis.Redis, client: Client, limits: Limits, size: str):
        self.cfg, self.keys, self.r, self.client, self.limits, self.size = cfg, keys, r, client, limits, size

    async def generations(self, request: Request) -> Response:
        key = self.limits.authenticate(request)
        req = parse_image_request(await read_json(request), self.cfg, self.size)
        job_ids = [new_job_id() for _ in range(req.n)]
        await self.limits.admit(key, job_ids)
        seeds = secrets.SystemRandom().sample(range(2**31), req.n)  # n distinct seeds: n different images
        if req.stream:
            return StreamingResponse(
                self._stream(key, req, job_ids, seeds),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        work = asyncio.ensure_future(asyncio.gather(*(self._submit(req, j, s) for j, s in zip(job_ids, seeds))))
        gone = asyncio.ensure_future(disconnected(request))
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
            await self.limits.release(key, job_ids)

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
        )

    async def _image_object(
        self, request: Request, req: ImageRequest, result: FinalResult, seed: int
    ) -> dict[str, Any]:
        if req.response_format == "url":
            token = secrets.token_urlsafe(18)
            await self.r.set(f"{self.keys.gateway_prefix}image:{token}", result.encode(), ex=self.cfg.result_ttl_s)
            image = {"url": str(request.url_for("image_file", token=f"{token}.{result.image_format}"))}
        else:
            image = {"b64_json": base64.b64encode(result.image or b"").decode()}  # an ok result has one
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
                if isinstance(message, LightReady):
                    yield sse(
                        "image_generation.partial_image",
                        {
                            "type": "image_generation.partial_image",
                            **common,
                            "created_at": int(time.time()),
                            "b64_json": base64.b64encode(message.image).decode(),
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
                yield sse(
                    "image_generation.completed",
                    {
                        "type": "image_generation.completed",
                        **common,
                        "created_at": int(time.time()),
                        "b64_json": base64.b64encode(message.image or b"").decode(),
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
                await self.limits.release(key, job_ids)

    async def image_file(self, request: Request) -> Response:
        token, _, _ext = request.path_params["token"].partition(".")
        raw: Any = await self.r.get(f"{self.keys.gateway_prefix}image:{token}")
        if raw is None:
            raise ApiError(404, "no such image (links expire with the result TTL)", code="not_found")
        result = FinalResult.decode(raw)
        return Response(result.image, media_type=MIME.get(result.image_format or "", "application/octet-stream"))

"""The OpenAI images API: ``POST /v1/images/generations`` (also streamed: the light image first),
the ``url`` images it links to, and ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from common import metrics
from common.blobs import BlobUnavailable
from common.cascades import MODELS, cascade
from common.client import Client
from common.config import Keys
from common.messages import (
    E_CANCELLED,
    E_DEADLINE,
    E_INTERNAL,
    E_OVERLOADED,
    IMAGE_FORMATS,
    Admitted,
    FinalResult,
    LightReady,
    Progress,
    Role,
    Status,
    new_job_id,
)
from common.streams import TRANSIENT_ERRORS
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, disconnected, read_json, sse
from services.gateway.keys import ApiKey, Limits
from services.gateway.request import ImageRequest, extra, native_size, parse_image_request, result_error

log = logging.getLogger("gateway")

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# How long a streamed request waits for the router to admit its jobs before the 200: a refusal
# then is a plain 429.  A router that predates Admitted never sends one: the stream starts anyway.
ADMISSION_WAIT_S = 5.0


def models_view(cfg: GatewayConfig) -> dict[str, Any]:
    """The cascade as an OpenAI model object, with what it is made of."""
    spec = cascade(cfg.cascade)
    side = native_size(cfg.cascade)
    return {
        "id": cfg.cascade,
        "object": "model",
        "created": 0,
        "owned_by": "diffserve",
        "diffserve": {
            "light": spec.light,
            "heavy": spec.heavy,
            "slo_ms": spec.slo_ms,
            "sizes": [f"{side}x{side}"],
            "steps": {"light": MODELS[spec.light].steps, "heavy": MODELS[spec.heavy].steps},
            "output_formats": list(IMAGE_FORMATS),
        },
    }


class ImagesApi:
    def __init__(self, cfg: GatewayConfig, keys: Keys, r: aioredis.Redis, client: Client, limits: Limits, size: str):
        self.cfg, self.keys, self.r, self.client, self.limits, self.size = cfg, keys, r, client, limits, size

    async def models(self, request: Request) -> Response:
        await self.limits.read(request, self.limits.authenticate(request))
        return JSONResponse({"object": "list", "data": [models_view(self.cfg)]})

    async def model(self, request: Request) -> Response:
        await self.limits.read(request, self.limits.authenticate(request))
        if request.path_params["model"] != self.cfg.cascade:
            raise ApiError(
                404, f"no model {request.path_params['model']!r}; models: {self.cfg.cascade}", code="not_found"
            )
        return JSONResponse(models_view(self.cfg))

    async def generations(self, request: Request) -> Response:
        key = self.limits.authenticate(request)
        req = parse_image_request(await read_json(request, self.cfg.body_timeout_s), self.cfg)
        job_ids = [new_job_id() for _ in range(req.n)]
        await self.limits.admit(key, job_ids)
        seeds = req.seeds()
        if req.stream:
            return await self._stream(key, req, job_ids, seeds)
        try:
            return await self._wait(request, req, job_ids, seeds)
        finally:
            await self.limits.release(key, job_ids)

    def _submit(
        self,
        req: ImageRequest,
        job_id: str,
        seed: int,
        on_light: Any = None,
        on_event: Any = None,
    ) -> asyncio.Task[FinalResult]:
        return asyncio.ensure_future(
            self.client.submit(
                req.prompt,
                job_id=job_id,
                seed=seed,
                image_format=req.output_format,
                image_quality=req.quality,
                timeout=self.cfg.timeout_s,
                on_light=on_light,
                on_event=on_event,
                cascade=self.cfg.cascade,
                negative_prompt=req.negative_prompt,
                slo_ms=req.slo_ms,
                image_ref=True,  # the bytes come from the image store, not through the queues
            )
        )

    async def _wait(self, request: Request, req: ImageRequest, job_ids: list[str], seeds: list[int]) -> Response:
        """Wait for every job's answer, but no longer than it helps: once a job is refused as
        overloaded the others are cancelled and the request answers at once (the caller retries all
        of it), keeping the images already made; a caller who hangs up cancels its jobs."""
        done = await self._answers(request, req, job_ids, seeds)
        if done is None:  # the caller hung up: its jobs are not worth a GPU any more
            await self.client.cancel(*job_ids, ttl_s=self.cfg.result_ttl_s)
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        refused = any(r.error_code == E_OVERLOADED for r in done.values())
        left = [j for i, j in enumerate(job_ids) if i not in done]
        if left:  # cancelled alongside a refused one, or past the timeout: nothing waits for them any more
            await self.client.cancel(*left, ttl_s=self.cfg.result_ttl_s)
            if not refused:
                metrics.ERRORS.labels("gateway", E_DEADLINE).inc(len(left))
        errors = self._errors(done, len(job_ids), refused)
        made = sorted(i for i, r in done.items() if r.status == Status.OK)
        if not made:  # a refusal first: its 429 and Retry-After tell the caller when to come back
            raise min(errors, key=lambda pair: pair[1].status != 429)[1]
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": [await self._image_object(request, req, done[i], seeds[i], i) for i in made],
            "output_format": req.output_format,
            "size": self.size,
            "background": "opaque",
            "quality": "auto",
        }
        if errors:  # a partial answer: the images that were made, and why the others are missing
            body["diffserve"] = {"errors": [{"index": i, **error.body()} for i, error in errors]}
        return JSONResponse(body)

    async def _answers(
        self, request: Request, req: ImageRequest, job_ids: list[str], seeds: list[int]
    ) -> dict[int, FinalResult] | None:
        """Each job's answer by its index, until all came, one was refused as overloaded or the timeout
        passed; None when the caller hung up first."""
        tasks: dict[asyncio.Future[Any], int] = {
            self._submit(req, j, s): i for i, (j, s) in enumerate(zip(job_ids, seeds, strict=True))
        }
        gone = asyncio.ensure_future(disconnected(request))
        done: dict[int, FinalResult] = {}
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            pending: set[asyncio.Future[Any]] = {*tasks, gone}
            while len(done) < len(job_ids):
                finished, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
                )
                if gone in finished:
                    return None
                if not finished:
                    break  # the gateway's timeout
                for task in finished:
                    try:
                        done[tasks[task]] = task.result()
                    except TimeoutError:
                        pass  # answered as not within the timeout
                if any(r.error_code == E_OVERLOADED for r in done.values()):
                    break
        finally:
            for task in [*tasks, gone]:
                task.cancel()
        return done

    def _errors(self, done: dict[int, FinalResult], n: int, refused: bool) -> list[tuple[int, ApiError]]:
        """Why each image that was not made is missing."""
        errors: list[tuple[int, ApiError]] = []
        for i in range(n):
            if i not in done:
                errors.append(
                    (i, ApiError(409, "cancelled: another image of this request was refused", code=E_CANCELLED))
                    if refused
                    else (i, ApiError(504, f"no image within {self.cfg.timeout_s:g} s", code=E_DEADLINE))
                )
            elif done[i].status != Status.OK:
                errors.append((i, result_error(done[i])))
        return errors

    async def _image_object(
        self, request: Request, req: ImageRequest, result: FinalResult, seed: int, index: int
    ) -> dict[str, Any]:
        if req.response_format == "url":
            # The stored image itself: presigned when the store can sign (S3), else a link to this gateway
            # (its key holds the small answer; the bytes stay in the store until they expire).
            signed = result.image_ref and await self.client.blobs.url(result.image_ref, self.cfg.result_ttl_s)
            if signed:
                image = {"url": signed}
            else:
                token = secrets.token_urlsafe(18)
                key = f"{self.keys.gateway_prefix}image:{token}"
                await self.r.set(key, result.encode(), ex=self.cfg.result_ttl_s)
                image = {"url": str(request.url_for("image_file", token=f"{token}.{result.image_format}"))}
        else:
            image = {"b64_json": base64.b64encode(await self.client.image(result, release=True)).decode()}
        return {**image, "revised_prompt": None, "diffserve": extra(result, seed, index)}

    async def _stream(self, key: ApiKey, req: ImageRequest, job_ids: list[str], seeds: list[int]) -> Response:
        """SSE: per job, its light image as image_generation.partial_image when it goes on to the heavy
        model (and partials were asked for), then image_generation.completed with the answer.  The jobs
        are admitted before the 200: a refusal is a plain 429 with Retry-After, as without streaming."""
        events: asyncio.Queue[LightReady | FinalResult] = asyncio.Queue()
        admitted: set[str] = set()
        first_answer: dict[str, FinalResult] = {}
        decided = asyncio.Event()
        index = {job_id: i for i, job_id in enumerate(job_ids)}

        def on_event(event: Admitted | Progress) -> None:
            if isinstance(event, Admitted):
                admitted.add(event.job_id)
                if len(admitted | first_answer.keys()) == len(job_ids):
                    decided.set()

        async def one(job_id: str, seed: int) -> None:
            on_light = (lambda light: events.put_nowait(light)) if req.partials else None
            try:
                result = await self._submit(req, job_id, seed, on_light, on_event)
            except TimeoutError:
                result = FinalResult(
                    job_id=job_id,
                    status=Status.ERROR,
                    error_code=E_DEADLINE,
                    error_message=f"no image within {self.cfg.timeout_s:g} s",
                )
            if job_id not in admitted:
                first_answer[job_id] = result
                if len(admitted | first_answer.keys()) == len(job_ids):
                    decided.set()
            events.put_nowait(result)

        tasks = [asyncio.ensure_future(one(j, s)) for j, s in zip(job_ids, seeds, strict=False)]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(decided.wait(), ADMISSION_WAIT_S)
        refused = [r for r in first_answer.values() if r.error_code == E_OVERLOADED]
        if refused:  # not streaming yet: the whole request is refused, the others cancelled
            for task in tasks:
                task.cancel()
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.client.cancel(*job_ids, ttl_s=self.cfg.result_ttl_s)
                await self.limits.release(key, job_ids)
            raise result_error(refused[0])
        return StreamingResponse(
            self._events(key, req, job_ids, seeds, index, events, tasks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self,
        key: ApiKey,
        req: ImageRequest,
        job_ids: list[str],
        seeds: list[int],
        index: dict[str, int],
        events: asyncio.Queue[LightReady | FinalResult],
        tasks: list[asyncio.Task[None]],
    ) -> AsyncIterator[bytes]:
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
                i = index[message.job_id]
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
                        "diffserve": extra(message, seeds[i], i),
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

    async def _image_bytes(self, message: FinalResult | LightReady) -> bytes | None:
        """The image of a streamed message (read and deleted from the image store when stored); None when
        the store cannot give it (counted)."""
        try:
            return await self.client.image(message, release=True)
        except (BlobUnavailable, LookupError) as exc:
            metrics.ERRORS.labels("gateway", E_INTERNAL).inc()
            log.warning("streamed image unavailable", extra={"error": str(exc)[:200]})
            return None

    async def image_file(self, request: Request) -> Response:
        await self.limits.read(request)
        token, _, _ext = request.path_params["token"].partition(".")
        raw: Any = await self.r.get(f"{self.keys.gateway_prefix}image:{token}")
        if raw is None:
            raise ApiError(404, "no such image (links expire with the result TTL)", code="not_found")
        result = FinalResult.decode(raw)
        data = await self.client.image(result)
        return Response(data, media_type=MIME.get(result.image_format or "", "application/octet-stream"))

"""The jobs API: ``POST /v1/jobs`` (202 and an id), ``GET /v1/jobs/<id>`` (its state),
``GET /v1/jobs/<id>/events`` (SSE), ``DELETE /v1/jobs/<id>`` (cancel).  Each job has a reply
stream of its own, so any gateway replica can answer for it.

Every open event stream of a gateway is fed by one shared reader (``EventHub``: one XREAD over all
the reply streams watched, on one connection), so a key holding hundreds of streams open holds no
Redis connection and starves no one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from common import metrics
from common.client import Client
from common.config import Keys
from common.messages import (
    E_DEADLINE,
    ENTRY_FIELD,
    EVENT_TYPES,
    Admitted,
    FinalResult,
    LightReady,
    Message,
    MessageError,
    Progress,
    Status,
    new_job_id,
    unpack,
)
from common.streams import TRANSIENT_ERRORS
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, read_json, sse
from services.gateway.keys import Limits
from services.gateway.request import extra, parse_image_request, result_error

HUB_BLOCK_MS = 100  # a stream watched while a read blocks joins the next read, at most this much later
HUB_COUNT = 64  # entries per stream per read


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def decode_event(fields: dict[bytes, bytes]) -> Message | None:
    """A reply-stream entry as the message it carries (an event or the final result); None if unreadable."""
    try:
        body = unpack(fields[ENTRY_FIELD])
        kind = EVENT_TYPES.get(body.get("type", ""), FinalResult)
        return kind.from_dict(body)
    except (MessageError, KeyError):
        return None


class EventHub:
    """One reader for every job reply stream this gateway's event streams watch: an XREAD over all
    of them on one connection, its entries handed to each watcher's queue."""

    def __init__(self, r: aioredis.Redis):
        self.r = r
        self.last: dict[str, str] = {}  # stream -> the id read up to
        self.queues: dict[str, set[asyncio.Queue[tuple[str, dict[bytes, bytes]]]]] = {}
        self.changed = asyncio.Event()

    @contextlib.contextmanager
    def watch(self, stream: str) -> Iterator[asyncio.Queue[tuple[str, dict[bytes, bytes]]]]:
        """A queue of (entry id, fields) of ``stream`` from now on (read what came before with XRANGE
        after this starts, and skip ids already seen: the two may overlap)."""
        queue: asyncio.Queue[tuple[str, dict[bytes, bytes]]] = asyncio.Queue()
        if stream not in self.queues:
            self.queues[stream] = set()
            self.last[stream] = "0-0"
            metrics.GATEWAY_WATCHED.inc()
        self.queues[stream].add(queue)
        self.changed.set()
        try:
            yield queue
        finally:
            self.queues[stream].discard(queue)
            if not self.queues[stream]:
                del self.queues[stream], self.last[stream]
                metrics.GATEWAY_WATCHED.dec()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.last:
                self.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 1.0)
                continue
            try:
                streams: dict[Any, Any] = dict(self.last)
                got: Any = await self.r.xread(streams, count=HUB_COUNT, block=HUB_BLOCK_MS)
            except TRANSIENT_ERRORS:
                await asyncio.sleep(0.5)
                continue
            for raw_stream, items in got or []:
                stream = raw_stream.decode()
                if stream not in self.last:  # nobody watches it any more
                    continue
                for raw_id, fields in items:
                    entry_id = raw_id.decode()
                    self.last[stream] = entry_id
                    for queue in self.queues[stream]:
                        queue.put_nowait((entry_id, fields))


class JobsApi:
    def __init__(
        self,
        cfg: GatewayConfig,
        keys: Keys,
        r: aioredis.Redis,
        client: Client,
        limits: Limits,
        size: str,
        hub: EventHub,
    ):
        self.cfg, self.keys, self.r, self.client, self.limits, self.size = cfg, keys, r, client, limits, size
        self.hub = hub

    def _job_keys(self, job_id: str) -> tuple[str, str]:
        """(its meta hash, its own reply stream: the router's final result and any events land there)."""
        return f"{self.keys.gateway_prefix}job:{job_id}", f"{self.keys.reply_prefix}job-{job_id}"

    async def create_job(self, request: Request) -> Response:
        key = self.limits.authenticate(request)
        req = parse_image_request(await read_json(request, self.cfg.body_timeout_s), self.cfg, jobs_api=True)
        job_id = new_job_id()
        await self.limits.admit(key, [job_id])
        meta, reply = self._job_keys(job_id)
        created = int(time.time())
        seed = req.seeds()[0]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                meta,
                mapping={"key": key.name, "created": created, "format": req.output_format, "seed": seed},
            )
            pipe.expire(meta, self.cfg.result_ttl_s)
            await pipe.execute()
        await self.client.enqueue(
            req.prompt,
            job_id=job_id,
            seed=seed,
            image_format=req.output_format,
            image_quality=req.quality,
            reply_to=reply,
            partials=True,
            progress=True,
            cascade=self.cfg.cascade,
            negative_prompt=req.negative_prompt,
            slo_ms=req.slo_ms,
        )
        return JSONResponse(
            {"id": job_id, "object": "image.job", "status": "queued", "created": created, "seed": seed},
            202,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )

    async def _job(self, request: Request) -> tuple[str, dict[bytes, bytes]]:
        key = self.limits.authenticate(request)
        await self.limits.read(request, key)
        job_id = request.path_params["job_id"]
        meta: Any = await self.r.hgetall(self._job_keys(job_id)[0]) if len(job_id) <= 128 else {}
        if not meta or meta.get(b"key", b"").decode() != key.name:  # another key's job is not yours to see
            raise ApiError(404, f"no job {job_id!r}", param="job_id", code="not_found")
        return job_id, meta

    async def _history(self, job_id: str, after: str = "-") -> list[tuple[str, Message]]:
        """[(entry id, message)] on the job's reply stream after ``after``."""
        items: Any = await self.r.xrange(self._job_keys(job_id)[1], min=after)
        out = []
        for raw_id, fields in items:
            message = decode_event(fields)
            if message is not None:
                out.append((raw_id.decode(), message))
        return out

    def _job_view(self, job_id: str, meta: dict[bytes, bytes], messages: list[Message]) -> dict[str, Any]:
        seed = int(meta[b"seed"]) if b"seed" in meta else None
        view: dict[str, Any] = {
            "id": job_id,
            "object": "image.job",
            "status": "queued",
            "created": int(meta[b"created"]),
            "output_format": meta[b"format"].decode(),
            "size": self.size,
            "seed": seed,
        }
        for message in messages:
            if isinstance(message, Admitted):
                view["queue"] = {"name": message.queue, "ahead": message.ahead, "wait_ms": round(message.wait_ms)}
            elif isinstance(message, Progress):
                view["progress"] = {"step": message.step, "steps": message.steps, "model": message.model}
            elif isinstance(message, LightReady):
                view["status"] = "light_ready"
                view["light_image"] = {
                    "b64_json": base64.b64encode(message.image or b"").decode(),
                    "model": message.model,
                    "confidence": message.confidence,
                }
            elif isinstance(message, FinalResult):
                view["status"] = {Status.OK: "done", Status.CANCELLED: "cancelled"}.get(message.status, "error")
                if message.status == Status.OK:
                    view["data"] = [
                        {
                            "b64_json": base64.b64encode(message.image or b"").decode(),
                            "revised_prompt": None,
                            "diffserve": extra(message, seed),
                        }
                    ]
                else:
                    view["error"] = result_error(message).body()["error"]
        return view

    async def get_job(self, request: Request) -> Response:
        job_id, meta = await self._job(request)
        return JSONResponse(self._job_view(job_id, meta, [m for _id, m in await self._history(job_id)]))

    async def job_events(self, request: Request) -> Response:
        job_id, meta = await self._job(request)
        names = {Admitted: "admitted", Progress: "progress", LightReady: "light_ready", FinalResult: "done"}

        async def events() -> AsyncIterator[bytes]:
            yield sse("queued", self._job_view(job_id, meta, []))
            seen: list[Message] = []
            last = (0, 0)
            deadline = time.monotonic() + self.cfg.timeout_s
            with self.hub.watch(self._job_keys(job_id)[1]) as queue:
                backlog = await self._history(job_id)
                while True:
                    for entry_id, message in backlog:
                        if _id(entry_id) <= last:  # the history and the hub overlap
                            continue
                        last = _id(entry_id)
                        seen.append(message)
                        yield sse(names[type(message)], self._job_view(job_id, meta, seen))
                        if isinstance(message, FinalResult):
                            return
                    try:
                        entry_id, fields = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
                    except TimeoutError:
                        break
                    event = decode_event(fields)
                    backlog = [(entry_id, event)] if event is not None else []
            yield sse("error", ApiError(504, "no result within the gateway timeout", code=E_DEADLINE).body())

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def cancel_job(self, request: Request) -> Response:
        job_id, meta = await self._job(request)
        view = self._job_view(job_id, meta, [m for _id, m in await self._history(job_id)])
        if view["status"] in ("queued", "light_ready"):
            await self.client.cancel(job_id, ttl_s=self.cfg.result_ttl_s)
            view["cancel_requested"] = True
        return JSONResponse(view, 202 if view.get("cancel_requested") else 200)

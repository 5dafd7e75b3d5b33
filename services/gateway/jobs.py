"""The jobs API: ``POST /v1/jobs`` (202 and an id), ``GET /v1/jobs/<id>`` (its state),
``GET /v1/jobs/<id>/events`` (SSE), ``DELETE /v1/jobs/<id>`` (cancel).  Each job has a reply
stream of its own, so any gateway replica can answer for it."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from common.client import Client
from common.config import Keys
from common.messages import E_DEADLINE, ENTRY_FIELD, FinalResult, LightReady, MessageError, Status, new_job_id, unpack
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, read_json, sse
from services.gateway.images import extra, parse_image_request, result_error
from services.gateway.keys import Limits


class JobsApi:
    def __init__(self, cfg: GatewayConfig, keys: Keys, r: aioredis.Redis, client: Client, limits: Limits, size: str):
        self.cfg, self.keys, self.r, self.client, self.limits, self.size = cfg, keys, r, client, limits, size

    def _job_keys(self, job_id: str) -> tuple[str, str]:
        """(its meta hash, its own reply stream: the router's final result and any LightReady land there)."""
        return f"{self.keys.gateway_prefix}job:{job_id}", f"{self.keys.reply_prefix}job-{job_id}"

    async def create_job(self, request: Request) -> Response:
        key = self.limits.authenticate(request)
        req = parse_image_request(await read_json(request), self.cfg, self.size, jobs_api=True)
        job_id = new_job_id()
        await self.limits.admit(key, [job_id])
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
        key = self.limits.authenticate(request)
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
                    "b64_json": base64.b64encode(message.image).decode(),
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

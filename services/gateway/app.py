"""The gateway's app: routes, health, status, metrics and the playground, and ``main``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import MaxConnectionsError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common import metrics
from common.blobs import BlobUnavailable
from common.client import Client
from common.messages import E_INTERNAL, E_OVERLOADED, Plan
from common.plan_store import live_ids, live_workers, load_plan
from common.service import STOP_GRACE_S, Service, run
from common.streams import PIPELINE_GROUPS, TRANSIENT_ERRORS, backlog, connect
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, CountRequests, api_error, guarded_protocol, http_error
from services.gateway.images import ImagesApi
from services.gateway.jobs import EventHub, JobsApi
from services.gateway.keys import Limits
from services.gateway.request import native_size

PLAYGROUND = Path(__file__).with_name("playground.html")


class Gateway:
    def __init__(self, svc: Service[GatewayConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        # Keeps no answer nobody waits for: a caller that hung up or timed out leaves nothing behind.
        self.client = Client(self.cfg, max_unclaimed=0)
        self.limits = Limits(self.cfg, self.keys, self.r)
        side = native_size(self.cfg.cascade)
        self.size = f"{side}x{side}"
        self.playground = PLAYGROUND.read_text(encoding="utf-8")
        # Its own connection: one blocking read for every open event stream (jobs.EventHub).
        self.hub = EventHub(connect(self.cfg, client_name=f"gateway-events:{self.cfg.instance_id}"))
        images = ImagesApi(self.cfg, self.keys, self.r, self.client, self.limits, self.size)
        jobs = JobsApi(self.cfg, self.keys, self.r, self.client, self.limits, self.size, self.hub)
        routes = [
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            Route("/v1/models", images.models),
            Route("/v1/models/{model}", images.model),
            Route("/v1/images/generations", images.generations, methods=["POST"]),
            Route("/v1/images/files/{token}", images.image_file),
            Route("/v1/jobs", jobs.create_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", jobs.get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}", jobs.cancel_job, methods=["DELETE"]),
            Route("/v1/jobs/{job_id}/events", jobs.job_events),
            Route("/v1/status", self.status),
        ]
        handlers: dict[Any, Callable[..., Awaitable[Response]]] = {
            ApiError: api_error,
            HTTPException: http_error,
            # Redis gone: tell the caller to come back; the service itself keeps running.
            **{cls: self._no_redis for cls in TRANSIENT_ERRORS},
            MaxConnectionsError: self._pool_full,
            BlobUnavailable: self._no_blobs,
            LookupError: _image_gone,
        }
        middleware = []
        if self.cfg.cors_origins:  # opt-in: browser apps on these origins may call the API
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=self.cfg.cors_origins,
                    allow_methods=["GET", "POST", "DELETE"],
                    allow_headers=["Authorization", "Content-Type"],
                    max_age=600,
                )
            )
        self.app = CountRequests(Starlette(routes=routes, exception_handlers=handlers, middleware=middleware))

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

    # ---------- health, status, playground ----------
    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        checks = {"redis": False, "plan": False, "workers": 0}
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.r.ping()
            checks["redis"] = True
            checks["plan"] = await load_plan(self.r, self.keys) is not None
            checks["workers"] = len(await live_ids(self.r, self.keys, self.cfg.worker_timeout_s))
        ready = checks["redis"] and checks["plan"] and checks["workers"] > 0
        return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        """The gateway's metrics on its API port: with keys on, for a key, and never the per-key
        families (they name the keys; the operator's --metrics-port has them)."""
        await self.limits.read(request, self.limits.authenticate(request))
        return Response(generate_latest(metrics.registry("gateway", public=True)), media_type=CONTENT_TYPE_LATEST)

    async def status(self, request: Request) -> Response:
        """What the playground's live panel shows: the plan in force, queue depths, live workers."""
        await self.limits.read(request, self.limits.authenticate(request))
        plan = await load_plan(self.r, self.keys)
        queues = {attr: await backlog(self.r, getattr(self.keys, attr), group) for attr, group in PIPELINE_GROUPS}
        roles: dict[str, int] = {}
        for worker in await live_workers(self.r, self.keys, self.cfg.worker_timeout_s):
            roles[worker.role or "unknown"] = roles.get(worker.role or "unknown", 0) + 1
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
                "heavy_off": heavy_off(plan),
            }
        )
        return JSONResponse(
            {
                "cascade": self.cfg.cascade,
                "size": self.size,
                "plan": plan_view,
                "queues": queues,
                "workers": roles,
                "keys_required": self.limits.required,
            }
        )

    async def index(self, request: Request) -> Response:
        await self.limits.read(request)
        return HTMLResponse(self.playground)


def heavy_off(plan: Plan) -> str | None:
    """Why the plan sends no job to the heavy model, or None when it may."""
    if plan.heavy_workers == 0:
        return "the plan has no heavy worker: every answer is the light model's"
    if plan.heavy_fraction <= 0 and (not plan.discriminator_routes or plan.threshold <= 0):
        return "the plan answers every job with the light image (the heavy model is not used)"
    return None


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
            http=guarded_protocol(cfg.header_timeout_s, cfg.max_connections),
            # annotated int, but both are asyncio timeouts: fractions of a second work
            timeout_graceful_shutdown=cfg.drain_s,  # type: ignore[arg-type]
            timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type]
        )
    )
    hub_stop = asyncio.Event()
    hub = asyncio.ensure_future(gateway.hub.run(hub_stop))
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        svc.ready()
        svc.log.info("listening", extra={"host": cfg.host, "port": cfg.port, "api_keys": len(gateway.limits.api_keys)})
        stop = asyncio.ensure_future(svc.stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True  # stop accepting; open requests get drain_s to finish
        stop.cancel()
    try:
        await task
    finally:
        hub_stop.set()
        await hub
        await gateway.hub.r.aclose()
        await gateway.client.close()


async def _image_gone(_request: Request, exc: Exception) -> Response:
    metrics.ERRORS.labels("gateway", E_INTERNAL).inc()
    return ApiError(500, str(exc), code=E_INTERNAL).response()


def main(argv: list[str] | None = None) -> None:
    # Without a Redis URL, the stack `diffserve up` recorded (then on its own port, not up's).
    config = GatewayConfig.from_args(argv, prog="diffserve gateway", local_stack=True)
    run("gateway", config, serve, stop_grace_s=config.drain_s + STOP_GRACE_S)  # open requests get drain_s


if __name__ == "__main__":
    main()

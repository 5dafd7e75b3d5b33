"""Prometheus metrics of the services.  Every family belongs to the services listed for it in
``FAMILIES``, and a service's /metrics lists only its own (with the process and Python collectors),
so no dashboard reads a family from a service that never sets it.  One meaning per name: the
controller's ``diffserve_threshold`` is the plan's, the discriminator's own gauge is
``diffserve_discriminator_threshold``.  Labels never carry prompt text."""

from __future__ import annotations

import functools

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Families are made unregistered (registry=None) and collected by each service's own registry.
READY = Gauge(
    "diffserve_ready", "1 once the service has connected and loaded what it needs", ["service"], registry=None
)
ERRORS = Counter("diffserve_errors_total", "errors by code", ["service", "code"], registry=None)
PROCESSED = Counter("diffserve_processed_total", "entries processed", ["service", "outcome"], registry=None)
QUEUE_DEPTH = Gauge("diffserve_queue_depth", "entries waiting or in flight per queue", ["queue"], registry=None)
BATCH_SIZE = Histogram(
    "diffserve_batch_size", "entries per processed batch", ["service", "model"], buckets=_BATCH_BUCKETS, registry=None
)
BATCH_LATENCY = Histogram(
    "diffserve_batch_latency_seconds",
    "model time per batch",
    ["service", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
RECLAIMED = Counter("diffserve_reclaimed_total", "entries taken over from a dead consumer", ["service"], registry=None)
E2E_LATENCY = Histogram(
    "diffserve_end_to_end_latency_seconds",
    "arrival to final result",
    ["answered_by"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
SLO = Counter("diffserve_slo_total", "final results by SLO outcome", ["outcome"], registry=None)
DUPLICATES = Counter(
    "diffserve_duplicate_completions_total", "completions ignored because the job was answered", registry=None
)
ROUTED = Counter(
    "diffserve_discriminator_routed_total", "light results by routing decision", ["decision"], registry=None
)
HEAVY_EXCHANGES = Counter(
    "diffserve_heavy_exchanges_total",
    "late jobs sent to the heavy model in the place of an easier waiting one (tried; one taken by a heavy "
    "worker meanwhile leaves the late job answered light)",
    registry=None,
)
BURST_PLANS = Counter(
    "diffserve_burst_plans_total",
    "plans made between the controller's ticks for a burst the light stage could not absorb (heavy workers "
    "moved to it)",
    registry=None,
)
THRESHOLD_NUDGES = Counter(
    "diffserve_threshold_nudges_total",
    "plans made between the controller's ticks that moved the threshold alone: down a step when the heavy stage "
    "was sent more than it runs at the cascade's threshold, up when it had room to spare below it",
    ["direction"],
    registry=None,
)
DISCRIMINATOR_THRESHOLD = Gauge(
    "diffserve_discriminator_threshold",
    "confidence threshold applied to the last scored job (the plan's, or the share keeper's around it)",
    registry=None,
)
THRESHOLD = Gauge("diffserve_threshold", "confidence threshold of the plan in force", registry=None)
WORKERS = Gauge("diffserve_workers", "workers per role in the plan", ["role"], registry=None)
DEMAND = Gauge("diffserve_demand_qps", "estimated demand (queries/s)", registry=None)
PLAN_INFEASIBLE = Gauge("diffserve_plan_infeasible", "1 when even the all-light plan cannot meet demand", registry=None)
SOLVE_TIME = Histogram("diffserve_plan_solve_seconds", "MILP solve time", buckets=_LATENCY_BUCKETS, registry=None)
LIGHT_ANSWERS = Counter(
    "diffserve_light_answers_total",
    "light answers delivered by why they are light: confident, deadline (the deadline rule), plan (no heavy "
    "capacity planned for it)",
    ["reason"],
    registry=None,
)
WORKERS_WANTED = Gauge(
    "diffserve_workers_wanted",
    "fewest workers with which the plan for the forecast demand reaches the quality the controller targets "
    "(the autoscaler's signal; common/scaling.py)",
    registry=None,
)
ESTIMATED_QUALITY = Gauge(
    "diffserve_estimated_quality",
    "estimated quality of the plan (FID: lower is better) with the live workers, and with the wanted ones",
    ["workers"],
    registry=None,
)
MODEL_LOAD = Histogram(
    "diffserve_model_load_seconds",
    "model load / role switch time",
    ["model", "source"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
ENCODE_TIME = Histogram(
    "diffserve_image_encode_seconds", "per-image encode time", ["format"], buckets=_LATENCY_BUCKETS, registry=None
)
CANCEL_FREED = Counter(
    "diffserve_worker_cancel_freed_seconds_total",
    "model time not spent on cancelled jobs: skipped before their batch started (their share of it), "
    "or the rest of a batch stopped between denoising steps",
    ["model", "when"],
    registry=None,
)
BLOB_BYTES = Counter(
    "diffserve_blob_bytes_total", "image bytes written to / read from the image store", ["op"], registry=None
)
BLOB_ERRORS = Counter(
    "diffserve_blob_errors_total",
    "image-store operations that failed after retrying for --blob-timeout-s",
    ["op"],
    registry=None,
)
GATEWAY_REQUESTS = Counter(
    "diffserve_gateway_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=None
)
GATEWAY_LATENCY = Histogram(
    "diffserve_gateway_request_seconds",
    "HTTP request time (streams: until closed)",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
GATEWAY_CONNECTIONS = Gauge("diffserve_gateway_connections", "open HTTP connections", registry=None)
GATEWAY_CLOSED = Counter(
    "diffserve_gateway_connections_closed_total",
    "connections the gateway closed: idle, slow headers or body, over the connection cap",
    ["reason"],
    registry=None,
)
GATEWAY_WATCHED = Gauge(
    "diffserve_gateway_watched_streams", "job reply streams the shared event reader follows", registry=None
)
KEY_REQUESTS = Counter(
    "diffserve_gateway_key_requests_total",
    "requests per API key (its name) by outcome",
    ["key", "outcome"],
    registry=None,
)
KEY_JOBS = Counter("diffserve_gateway_key_jobs_total", "jobs admitted per API key (its name)", ["key"], registry=None)

CLOCK_OFFSET = Gauge(
    "diffserve_clock_offset_seconds",
    "this host's wall clock minus Redis's (the one clock deadlines use)",
    registry=None,
)

_EVERY = (READY, ERRORS, CLOCK_OFFSET)
_IMAGES = (BLOB_BYTES, BLOB_ERRORS)  # the services that write or read the image store
FAMILIES: dict[str, tuple[Collector, ...]] = {
    "router": (*_EVERY, *_IMAGES, PROCESSED, QUEUE_DEPTH, E2E_LATENCY, SLO, DUPLICATES, LIGHT_ANSWERS),
    "worker": (
        *_EVERY,
        *_IMAGES,
        PROCESSED,
        RECLAIMED,
        BATCH_SIZE,
        BATCH_LATENCY,
        MODEL_LOAD,
        ENCODE_TIME,
        CANCEL_FREED,
    ),
    "discriminator": (*_EVERY, *_IMAGES, RECLAIMED, BATCH_SIZE, BATCH_LATENCY, ROUTED, DISCRIMINATOR_THRESHOLD),
    "controller": (
        *_EVERY,
        THRESHOLD,
        WORKERS,
        DEMAND,
        PLAN_INFEASIBLE,
        SOLVE_TIME,
        WORKERS_WANTED,
        ESTIMATED_QUALITY,
        BURST_PLANS,
        THRESHOLD_NUDGES,
    ),
    "gateway": (
        *_EVERY,
        *_IMAGES,
        GATEWAY_REQUESTS,
        GATEWAY_LATENCY,
        GATEWAY_CONNECTIONS,
        GATEWAY_CLOSED,
        GATEWAY_WATCHED,
        KEY_REQUESTS,
        KEY_JOBS,
    ),
}
# Per-key families name the keys: only on the operator's metrics port, not on the gateway's API port.
PER_KEY = (KEY_REQUESTS, KEY_JOBS)


@functools.cache
def registry(service: str, *, public: bool = False) -> CollectorRegistry:
    """The families ``service`` exports (``public``: without the per-key ones) and the process collectors."""
    reg = CollectorRegistry(auto_describe=True)
    for collector in (*FAMILIES[service], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        if not (public and collector in PER_KEY):
            reg.register(collector)
    return reg


def serve(service: str, port: int, addr: str) -> None:
    """Expose ``service``'s /metrics on ``addr:port`` (port 0 disables it)."""
    if port:
        start_http_server(port, addr=addr, registry=registry(service))

"""Prometheus metrics shared by the services. Labels never carry prompt text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

READY = Gauge("diffserve_ready", "1 once the service has connected and loaded what it needs", ["service"])
QUEUE_DEPTH = Gauge("diffserve_queue_depth", "entries waiting or in flight per queue", ["queue"])
BATCH_SIZE = Histogram(
    "diffserve_batch_size", "entries per processed batch", ["service", "model"], buckets=_BATCH_BUCKETS
)
BATCH_LATENCY = Histogram(
    "diffserve_batch_latency_seconds", "model time per batch", ["service", "model"], buckets=_LATENCY_BUCKETS
)
PROCESSED = Counter("diffserve_processed_total", "entries processed", ["service", "outcome"])
ERRORS = Counter("diffserve_errors_total", "errors by code", ["service", "code"])
RECLAIMED = Counter("diffserve_reclaimed_total", "entries taken over from a dead consumer", ["service"])
E2E_LATENCY = Histogram(
    "diffserve_end_to_end_latency_seconds", "arrival to final result", ["answered_by"], buckets=_LATENCY_BUCKETS
)
SLO = Counter("diffserve_slo_total", "final results by SLO outcome", ["outcome"])
DUPLICATES = Counter("diffserve_duplicate_completions_total", "completions ignored because the job was answered")
LIGHT_ANSWERS = Counter(
    "diffserve_light_answers_total",
    "light answers delivered by why they are light: confident, deadline (the deadline rule), plan (no heavy "
    "capacity planned for it)",
    ["reason"],
)
ROUTED = Counter("diffserve_discriminator_routed_total", "light results by routing decision", ["decision"])
THRESHOLD = Gauge("diffserve_threshold", "confidence threshold in force")
WORKERS = Gauge("diffserve_workers", "workers per role in the plan", ["role"])
DEMAND = Gauge("diffserve_demand_qps", "estimated demand (queries/s)")
WORKERS_WANTED = Gauge(
    "diffserve_workers_wanted",
    "fewest workers with which the plan for the forecast demand reaches the quality the controller targets "
    "(the autoscaler's signal; common/scaling.py)",
)
ESTIMATED_QUALITY = Gauge(
    "diffserve_estimated_quality",
    "estimated quality of the plan (FID: lower is better) with the live workers, and with the wanted ones",
    ["workers"],
)
PLAN_INFEASIBLE = Gauge("diffserve_plan_infeasible", "1 when even the all-light plan cannot meet demand")
SOLVE_TIME = Histogram("diffserve_plan_solve_seconds", "MILP solve time", buckets=_LATENCY_BUCKETS)
MODEL_LOAD = Histogram(
    "diffserve_model_load_seconds", "model load / role switch time", ["model", "source"], buckets=_LATENCY_BUCKETS
)
ENCODE_TIME = Histogram("diffserve_image_encode_seconds", "per-image encode time", ["format"], buckets=_LATENCY_BUCKETS)
BLOB_BYTES = Counter("diffserve_blob_bytes_total", "image bytes written to / read from the image store", ["op"])
BLOB_ERRORS = Counter(
    "diffserve_blob_errors_total", "image-store operations that failed after retrying for --blob-timeout-s", ["op"]
)
GATEWAY_REQUESTS = Counter(
    "diffserve_gateway_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"]
)
GATEWAY_LATENCY = Histogram(
    "diffserve_gateway_request_seconds",
    "HTTP request time (streams: until closed)",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
KEY_REQUESTS = Counter(
    "diffserve_gateway_key_requests_total", "requests per API key (its name) by outcome", ["key", "outcome"]
)
CLOCK_OFFSET = Gauge(
    "diffserve_clock_offset_seconds", "this host's wall clock minus Redis's (the one clock deadlines use)"
)
KEY_JOBS = Counter("diffserve_gateway_key_jobs_total", "jobs admitted per API key (its name)", ["key"])


def serve(port: int, addr: str) -> None:
    """Expose /metrics on ``addr:port`` (port 0 disables it)."""
    if port:
        start_http_server(port, addr=addr)

"""The gateway's settings (``diffserve gateway --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import (
    CascadeSettings,
    GatewayAddress,
    ReplySettings,
    RequestLimits,
    ServiceConfig,
    WorkerRegistrySettings,
    option,
)


@dataclass(kw_only=True)
class GatewayConfig(
    ServiceConfig, GatewayAddress, ReplySettings, CascadeSettings, RequestLimits, WorkerRegistrySettings
):
    """diffserve gateway: HTTP front door (OpenAI images API, jobs API, API keys, playground)."""

    api_keys_file: str | None = option(
        None,
        "JSON file of hashed API keys (README); keys are required when this or --api-keys is set",
        env="DIFFSERVE_API_KEYS_FILE",
    )
    api_keys: list[str] = option(
        [],
        "hashed keys inline, comma-separated name:sha256hex[:rpm[:max_in_flight[:burst]]]",
        env="DIFFSERVE_API_KEYS",
        secret=True,
    )
    rate_limit_rpm: int = option(
        600,
        "requests that start jobs, per minute per key unless the key says (0: no limit); a token bucket "
        "that holds a key's burst (default a tenth of its rpm)",
        env="DIFFSERVE_RATE_LIMIT_RPM",
    )
    read_rate_limit_rpm: int = option(
        1200,
        "with keys on: every other request (job reads, event streams, status, models, metrics) per minute "
        "per key, and page views and image links per client address (0: no limit)",
        env="DIFFSERVE_READ_RATE_LIMIT_RPM",
    )
    max_in_flight: int = option(
        64, "jobs in flight per key unless the key says (0: no limit)", env="DIFFSERVE_MAX_IN_FLIGHT"
    )
    timeout_s: float = option(
        120.0, "longest a request waits for its images (then 504)", env="DIFFSERVE_GATEWAY_TIMEOUT_S"
    )
    drain_s: float = option(30.0, "on SIGTERM, how long open requests may take to finish", env="DIFFSERVE_DRAIN_S")
    header_timeout_s: float = option(
        10.0,
        "a connection that has not sent a whole request head this long after it opened (or after its "
        "last response) is closed",
        env="DIFFSERVE_HEADER_TIMEOUT_S",
    )
    body_timeout_s: float = option(
        10.0,
        "a request body must arrive whole within this (else 408 and the connection closed)",
        env="DIFFSERVE_BODY_TIMEOUT_S",
    )
    keep_alive_s: float = option(
        5.0, "an idle keep-alive connection is closed after this", env="DIFFSERVE_KEEP_ALIVE_S"
    )
    max_connections: int = option(
        2048, "open connections at most; one more is closed at once (counted)", env="DIFFSERVE_MAX_CONNECTIONS"
    )
    cors_origins: list[str] = option(
        [],
        "browser origins (https://app.example) allowed to call the API from their pages, comma-separated; "
        "none by default",
        env="DIFFSERVE_CORS_ORIGINS",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blob_ttl_s < self.result_ttl_s:  # a url image must not outlive the bytes it points to
            raise ValueError(f"blob_ttl_s ({self.blob_ttl_s}) must be at least result_ttl_s ({self.result_ttl_s})")

"""The gateway's settings (``diffserve gateway --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ServiceConfig, option


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

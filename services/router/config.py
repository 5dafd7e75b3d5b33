"""The router's settings (``diffserve router --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from common import admission
from common.backends import BackendSettings, SloSettings
from common.config import (
    ConsumerSettings,
    ReplySettings,
    RequestLimits,
    ServiceConfig,
    WorkerRegistrySettings,
    option,
)
from common.routing import LatePolicySettings


@dataclass(kw_only=True)
class RouterConfig(
    ServiceConfig,
    BackendSettings,
    ReplySettings,
    SloSettings,
    RequestLimits,
    ConsumerSettings,
    LatePolicySettings,
    WorkerRegistrySettings,
):
    """diffserve router: admission, validation and exactly-once delivery of results."""

    max_entry_bytes: int = option(65536, "largest job entry accepted", env="DIFFSERVE_MAX_ENTRY_BYTES")
    max_light_backlog: int = option(
        admission.DEFAULT_MAX_LIGHT_BACKLOG,
        "hard cap of the light queue: new jobs for the light model are refused as overloaded at it "
        "(below it, jobs are refused when their predicted wait does not fit their deadline)",
        env="DIFFSERVE_MAX_LIGHT_BACKLOG",
    )
    admission_headroom: float = option(
        admission.DEFAULT_ADMISSION_HEADROOM,
        "admission predicts each stage at this share of its profiled speed (the profile leaves out "
        "per-batch overheads: a queue packed to exactly the deadline would miss it)",
        env="DIFFSERVE_ADMISSION_HEADROOM",
    )
    refused_ttl_s: int = option(
        300, "how long the answer to a job refused before admission is kept", env="DIFFSERVE_REFUSED_TTL_S"
    )
    batch: int = option(128, "entries read per pull", env="DIFFSERVE_ROUTER_BATCH")
    trim_interval_s: float = option(
        5.0, "how often processed stream entries are trimmed", env="DIFFSERVE_TRIM_INTERVAL_S"
    )
    per_stream_read: int = option(
        16,
        "entries a read takes from each submission stream before it takes more from any (fair reading)",
        env="DIFFSERVE_PER_STREAM_READ",
    )
    fair_reserve: float = option(
        0.25,
        "share of each job's slack (and of --max-light-backlog) kept for sources under their fair share of "
        "the recent admissions: a source over its share is admitted only into the rest (0: no fair share)",
        env="DIFFSERVE_FAIR_RESERVE",
    )
    tenant_max_queued: int = option(
        1000,
        "a tenant's submission stream is cut to its newest this many entries (the older ones are never "
        "read or answered): a tenant filling its own stream cannot fill Redis",
        env="DIFFSERVE_TENANT_MAX_QUEUED",
    )
    tenant_max_connections: int = option(
        32,
        "Redis connections one tenant user may hold; the router closes the newest beyond it (needs "
        "+client|list +client|kill; 0: no limit). Size Redis's maxclients for the services plus this x tenants",
        env="DIFFSERVE_TENANT_MAX_CONNECTIONS",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.admission_headroom <= 1:
            raise ValueError(f"admission_headroom must be in (0, 1], not {self.admission_headroom}")
        if self.blob_ttl_s < self.result_ttl_s:  # an answer must not outlive the image it refers to
            raise ValueError(f"blob_ttl_s ({self.blob_ttl_s}) must be at least result_ttl_s ({self.result_ttl_s})")
        if not 0 <= self.fair_reserve < 1:
            raise ValueError(f"fair_reserve must be in [0, 1), not {self.fair_reserve}")

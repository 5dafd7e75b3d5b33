"""API keys (only their sha256 is stored) and the limits every replica shares through Redis.

Rates are token buckets (GCRA: one stored time per bucket): a key may start ``burst`` requests at
once and then one every ``60/rpm`` seconds, so no minute ever admits more than ``rpm + burst``
(the fixed window this replaces admitted twice its rate across a minute boundary).  Requests that
start jobs count against ``rpm``; everything else a key does (job reads, event streams, status,
models, metrics) against ``read_rpm``, and page views and image links, which carry no key, per
client address.  With keys off nothing is limited."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.requests import Request

from common import metrics
from common.config import Keys
from common.lua import script
from common.service import now_ms
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, invalid

# The token bucket (GCRA) both scripts below start with.
_BUCKET = script("services", "gateway/bucket.lua")

# One atomic admission for a request of n jobs, shared by every gateway replica (rate and jobs in flight).
ADMIT = _BUCKET + script("services", "gateway/admit.lua")

# One request against a bucket alone (reads).
TAKE = _BUCKET + script("services", "gateway/take.lua")


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the secret; the secret itself is never stored
    rpm: int  # requests that start jobs, per minute (0: no limit)
    max_in_flight: int  # jobs (0: no limit)
    burst: int = 1  # requests a full bucket lets start at once
    read_rpm: int = 0  # every other request, per minute (0: no limit)


ANONYMOUS = ApiKey(name="anonymous", sha256="", rpm=0, max_in_flight=0)  # keys off: no limits


def default_burst(rpm: int) -> int:
    return max(1, rpm // 10)


def load_keys(cfg: GatewayConfig) -> list[ApiKey]:
    """Keys from the JSON file and the inline list; a malformed entry stops the start."""
    entries = []
    if cfg.api_keys_file:
        with open(cfg.api_keys_file, encoding="utf-8") as fh:
            entries += json.load(fh)["keys"]
    for spec in cfg.api_keys:
        parts = spec.split(":")
        fields = ("rpm", "max_in_flight", "burst")
        entries.append(
            {
                "name": parts[0],
                "sha256": parts[1] if len(parts) > 1 else "",
                **{name: int(value) for name, value in zip(fields, parts[2:], strict=False)},
            }
        )
    keys = []
    for e in entries:
        digest = str(e.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not e.get("name"):
            raise SystemExit(f"api key {e.get('name')!r}: needs a name and a 64-hex sha256 of the secret")
        rpm = int(e.get("rpm", cfg.rate_limit_rpm))
        keys.append(
            ApiKey(
                name=str(e["name"]),
                sha256=digest,
                rpm=rpm,
                max_in_flight=int(e.get("max_in_flight", cfg.max_in_flight)),
                burst=int(e.get("burst", default_burst(rpm))),
                read_rpm=int(e.get("read_rpm", cfg.read_rate_limit_rpm)),
            )
        )
    return keys


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _interval_ms(rpm: int) -> float:
    return 60_000 / rpm if rpm > 0 else 0.0


class Limits:
    """Who is calling (authenticate), whether a request of n jobs may start (admit/release), and
    whether anything else may (read)."""

    def __init__(self, cfg: GatewayConfig, keys: Keys, r: aioredis.Redis):
        self.cfg, self.keys, self.r = cfg, keys, r
        self.api_keys = load_keys(cfg)
        self.admit_script = r.register_script(ADMIT)
        self.take_script = r.register_script(TAKE)

    @property
    def required(self) -> bool:
        return bool(self.api_keys)

    def authenticate(self, request: Request) -> ApiKey:
        if not self.api_keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            metrics.KEY_REQUESTS.labels("none", "unauthorized").inc()
            raise ApiError(401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
        digest = hash_key(secret.strip())
        found = None
        for key in self.api_keys:  # compare with every key, in constant time each
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            metrics.KEY_REQUESTS.labels("unknown", "unauthorized").inc()
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return found

    async def read(self, request: Request, key: ApiKey | None = None) -> None:
        """Count a request that starts no job against ``key``'s read rate, or (no key: page views,
        image links) against its client address's; 429 over it."""
        if not self.api_keys or key is ANONYMOUS:
            return
        rpm = key.read_rpm if key is not None else self.cfg.read_rate_limit_rpm
        if rpm <= 0:
            return
        who = f"key:{key.name}" if key is not None else f"addr:{request.client.host if request.client else '-'}"
        wait_ms = await self.take_script(
            keys=[f"{self.keys.gateway_prefix}reads:{who}"],
            args=[_interval_ms(rpm), default_burst(rpm), now_ms()],
        )
        if wait_ms:
            metrics.KEY_REQUESTS.labels(key.name if key else "none", "read_rate_limited").inc()
            raise ApiError(
                429,
                f"read rate limit of {rpm} requests per minute reached",
                code="rate_limit_exceeded",
                retry_after=int(wait_ms) / 1000,
            )

    async def admit(self, key: ApiKey, job_ids: list[str]) -> None:
        if key is ANONYMOUS:
            return
        if key.max_in_flight and len(job_ids) > key.max_in_flight:  # could never be admitted: not a 429
            raise invalid(f"'n' is larger than this key's cap of {key.max_in_flight} jobs in flight", "n")
        now = now_ms()
        prefix = f"{self.keys.gateway_prefix}key:{key.name}:"
        verdict, retry_ms = await self.admit_script(
            keys=[prefix + "in-flight", prefix + "rate"],
            args=[
                _interval_ms(key.rpm),
                key.burst,
                key.max_in_flight,
                now,
                now + (self.cfg.timeout_s + self.cfg.result_ttl_s) * 1000,
                self.keys.done_prefix,
                *job_ids,
            ],
        )
        if verdict == 1:
            metrics.KEY_REQUESTS.labels(key.name, "rate_limited").inc()
            raise ApiError(
                429,
                f"rate limit of {key.rpm} requests per minute reached",
                code="rate_limit_exceeded",
                retry_after=max(1, int(retry_ms)) / 1000,
            )
        if verdict == 2:
            metrics.KEY_REQUESTS.labels(key.name, "too_many_in_flight").inc()
            raise ApiError(
                429,
                f"more than {key.max_in_flight} jobs in flight for this key",
                code="too_many_in_flight",
                retry_after=1,
            )
        metrics.KEY_REQUESTS.labels(key.name, "admitted").inc()
        metrics.KEY_JOBS.labels(key.name).inc(len(job_ids))

    async def release(self, key: ApiKey, job_ids: list[str]) -> None:
        if key is not ANONYMOUS:
            await self.r.zrem(f"{self.keys.gateway_prefix}key:{key.name}:in-flight", *job_ids)

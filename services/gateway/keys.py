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
from common.service import now_ms
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, invalid

# GCRA on KEYS[bucket]: ARGV interval (ms per request), burst, now (ms).  Sets `wait` (ms until the
# request would fit, 0 when it fits) and `tat` (the bucket's new value, to store when admitted).
_BUCKET = """
local function bucket(key, interval, burst, now)
  if interval <= 0 then return 0, nil end
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local wait = tat + interval - now - burst * interval
  if wait > 0 then return wait, nil end
  return 0, tat + interval
end
local function spend(key, tat, now)
  if tat then redis.call('SET', key, tostring(tat), 'PX', math.max(1, math.ceil(tat - now))) end
end
"""

# One atomic admission for a request of n jobs, shared by every gateway replica: the key's rate
# (KEYS[2]) and its jobs in flight (KEYS[1]: a zset of job ids scored by when the entry expires, so
# a crashed gateway cannot leak slots; a job is out of flight once the router's done marker for it
# exists).  ARGV: interval, burst, cap, now, expire_at, done prefix, job ids.  Returns {0, 0}
# admitted, {1, retry_ms} over the rate, {2, retry_ms} too many in flight.
ADMIT = (
    _BUCKET
    + """
local interval, burst, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, expire_at = tonumber(ARGV[4]), tonumber(ARGV[5])
local wait, tat = bucket(KEYS[2], interval, burst, now)
if wait > 0 then return {1, math.ceil(wait)} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[6] .. id) == 1 then redis.call('ZREM', KEYS[1], id) end
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) + #ARGV - 6 > cap then return {2, 1000} end
spend(KEYS[2], tat, now)
for i = 7, #ARGV do redis.call('ZADD', KEYS[1], expire_at, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(expire_at - now))
return {0, 0}
"""
)

# One request against a bucket alone (reads): ARGV interval, burst, now.  Returns ms to wait (0: admitted).
TAKE = (
    _BUCKET
    + """
local now = tonumber(ARGV[3])
local wait, tat = bucket(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if wait > 0 then return math.ceil(wait) end
spend(KEYS[1], tat, now)
return 0
"""
)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the secret; the secret itself is never stored
    rpm: int  # requests that start jobs, per minute (0: no limit)
    max_in_flight: int  # jobs (0: no limit)
    burst: int = 1  # requests a full bucket lets start at once
    read_rpm: int = 0  # every other request, per minute (0: no limit)


ANONYMOUS = ApiKey("anonymous", "", 0, 0)  # keys off: no limits


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
                **{name: int(value) for name, value in zip(fields, parts[2:])},
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
                str(e["name"]),
                digest,
                rpm,
                int(e.get("max_in_flight", cfg.max_in_flight)),
                int(e.get("burst", default_burst(rpm))),
                int(e.get("read_rpm", cfg.read_rate_limit_rpm)),
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

"""API keys (only their sha256 is stored) and the limits every replica shares through Redis."""

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
from services.gateway.http import ApiError


# One atomic admission for a request of n jobs, shared by every gateway replica: the key's
# requests this minute (fixed window) and its jobs in flight (a zset of job ids scored by when
# the entry expires, so a crashed gateway cannot leak slots; a job is out of flight once the
# router's done marker for it exists).  Returns {0, 0} admitted, {1, retry_ms} over the rate,
# {2, retry_ms} too many in flight.  Times are integer ms.
ADMIT = """
local rpm, cap, now, expire_at = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if rpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= rpm then
  return {1, redis.call('PTTL', KEYS[2])}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[6] .. id) == 1 then redis.call('ZREM', KEYS[1], id) end
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) + #ARGV - 6 > cap then return {2, 1000} end
if redis.call('INCR', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
for i = 7, #ARGV do redis.call('ZADD', KEYS[1], expire_at, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], expire_at - now)
return {0, 0}
"""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the secret; the secret itself is never stored
    rpm: int
    max_in_flight: int


ANONYMOUS = ApiKey("anonymous", "", 0, 0)  # keys off: no limits


def load_keys(cfg: GatewayConfig) -> list[ApiKey]:
    """Keys from the JSON file and the inline list; a malformed entry stops the start."""
    entries = []
    if cfg.api_keys_file:
        with open(cfg.api_keys_file, encoding="utf-8") as fh:
            entries += json.load(fh)["keys"]
    for spec in cfg.api_keys:
        parts = spec.split(":")
        entries.append(
            {
                "name": parts[0],
                "sha256": parts[1] if len(parts) > 1 else "",
                **({"rpm": int(parts[2])} if len(parts) > 2 else {}),
                **({"max_in_flight": int(parts[3])} if len(parts) > 3 else {}),
            }
        )
    keys = []
    for e in entries:
        digest = str(e.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not e.get("name"):
            raise SystemExit(f"api key {e.get('name')!r}: needs a name and a 64-hex sha256 of the secret")
        keys.append(
            ApiKey(
                str(e["name"]),
                digest,
                int(e.get("rpm", cfg.rate_limit_rpm)),
                int(e.get("max_in_flight", cfg.max_in_flight)),
            )
        )
    return keys


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Limits:
    """Who is calling (authenticate) and whether a request of n jobs may start (admit/release)."""

    def __init__(self, cfg: GatewayConfig, keys: Keys, r: aioredis.Redis):
        self.cfg, self.keys, self.r = cfg, keys, r
        self.api_keys = load_keys(cfg)
        self.admit_script = r.register_script(ADMIT)

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

    async def admit(self, key: ApiKey, job_ids: list[str]) -> None:
        if key is ANONYMOUS:
            return
        now = int(now_ms())
        prefix = f"{self.keys.gateway_prefix}key:{key.name}:"
        window, into = divmod(now, 60_000)
        verdict, retry_ms = await self.admit_script(
            keys=[prefix + "in-flight", prefix + f"rpm:{window}"],
            args=[
                key.rpm,
                key.max_in_flight,
                now,
                now + int((self.cfg.timeout_s + self.cfg.result_ttl_s) * 1000),
                60_000 - into,
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

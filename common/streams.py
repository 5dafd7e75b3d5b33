"""The one Redis-streams helper every service uses.

The cycle is read -> process -> write outputs and ack in one MULTI -> repeat.
Entries a dead consumer left pending are taken over with XAUTOCLAIM once they
have been idle for ``reclaim_idle_ms``; a live consumer working on a long batch
keeps its entries fresh (XCLAIM to itself) so nobody steals them.  Streams are
trimmed only below the oldest entry some group still has to process or ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.config import Keys, RedisSettings
from common.messages import ENTRY_FIELD, MessageError, unpack

log = logging.getLogger(__name__)

# Every command, blocking ones included, must answer within this; longer waits (a client's BLPOP) are
# split into pieces shorter than it. Without it redis-py's default (5 s) applies.
SOCKET_TIMEOUT_S = 10.0

# Errors after which the same command may succeed once Redis is back.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)

# Consumer groups of the pipeline: (stream attribute of Keys, group name).
PIPELINE_GROUPS = (
    ("jobs", "router"),
    ("light_queue", "workers"),
    ("light_results", "discriminator"),
    ("heavy_queue", "workers"),
    ("completions", "router"),
)


def connect(settings: RedisSettings, *, client_name: str | None = None) -> aioredis.Redis:
    """A client for ``settings``; TLS when the URL is ``rediss://``. Blocking reads use a BLOCK
    well under ``SOCKET_TIMEOUT_S``, so a hung Redis still surfaces as an error."""
    # A stale pooled connection (after a Redis restart) is retried on a fresh one a few times;
    # longer outages surface as errors that run_forever rides out with its own backoff.
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": 5,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    settings.check_tls()  # a Client may have changed the URL after its settings were made
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if settings.redis_url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if settings.redis_tls_ca:
            kwargs["ssl_ca_certs"] = settings.redis_tls_ca
        if settings.redis_tls_cert:
            kwargs["ssl_certfile"] = settings.redis_tls_cert
            kwargs["ssl_keyfile"] = settings.redis_tls_key
    if client_name:
        kwargs["client_name"] = client_name
    # A caller with more commands in flight than the pool has connections waits for one (up to
    # 20 s) instead of failing at once: redis-py caps a pool at 100 connections.
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=100, timeout=20, **kwargs)
    return aioredis.Redis.from_pool(pool)


class Backoff:
    """Exponential backoff with jitter for reconnecting; reset after a success."""

    def __init__(self, base: float = 0.1, cap: float = 5.0):
        self.base, self.cap, self.attempt = base, cap, 0

    async def wait(self) -> float:
        delay: float = min(self.cap, self.base * 2**self.attempt) * (0.5 + random.random() / 2)
        self.attempt += 1
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class Entry:
    id: str
    payload: bytes | None  # the ``m`` field; None for entries that use plain fields
    fields: dict[bytes, bytes]
    deliveries: int = 1  # > 1 when reclaimed from another consumer
    oversized: int = 0  # > 0: the entry's size; it was left in Redis, ``fields`` hold only its job_id/reply_to


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> Entry:
    fields = fields or {}
    return Entry(_s(entry_id), fields.get(ENTRY_FIELD), fields)


# A consumer with a size limit reads through this script: one entry at a time, and an entry over
# ARGV[1] bytes (its ``m`` field, else the sum of its field names and values, as the router counts)
# comes back as a stub: ``_oversized <size>`` plus its job_id (when short and valid) and reply_to
# (when short), so no batch of big entries ever reaches the consumer's memory. It is the same
# XREADGROUP/XAUTOCLAIM the consumer would send (same pending list, same delivery counter).
# ARGV: limit, mode, group, consumer, count, then read: id (">" or a pending id); claim: min-idle, start.
BOUNDED_READ = """
local limit, mode, group, consumer, count = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local function get(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
end
local function bound(entry)
  local fields = entry[2]
  if not fields then return entry end
  local size = 0
  for i = 1, #fields, 2 do size = size + #fields[i] + #fields[i + 1] end
  local m = get(fields, 'm')
  if m then size = #m end
  if size <= limit then return entry end
  local job_id, reply_to = get(fields, 'job_id'), get(fields, 'reply_to')
  if m then
    local ok, body = pcall(cmsgpack.unpack, m)
    if ok and type(body) == 'table' then job_id, reply_to = body['job_id'], body['reply_to'] end
    body = nil
  end
  local stub = {'_oversized', tostring(size)}
  if type(job_id) == 'string' and #job_id <= 128 and string.match(job_id, '^[%w_%.:%-]+$') then
    table.insert(stub, 'job_id'); table.insert(stub, job_id)
  end
  if type(reply_to) == 'string' and #reply_to <= 200 then
    table.insert(stub, 'reply_to'); table.insert(stub, reply_to)
  end
  fields, m = nil, nil  -- let the collector have the big strings before the next read
  collectgarbage('step', 1024)
  return {entry[1], stub}
end
local out = {}
if mode == 'read' then
  local id = ARGV[6]
  for _ = 1, count do
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[1], id)
    if not reply then break end
    local entry = reply[1][2][1]
    if not entry then break end
    table.insert(out, bound(entry))
    if id ~= '>' then id = entry[1] end
  end
  return out
end
local cursor, deleted = ARGV[7], {}
for _ = 1, count do
  local reply = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[6], cursor, 'COUNT', 1)
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do table.insert(out, bound(entry)) end
  for _, id in ipairs(reply[3] or {}) do table.insert(deleted, id) end
  if cursor == '0-0' then break end
end
return {cursor, out, deleted}
"""


def _stub_if_over(entry: Entry, limit: int) -> Entry:
    """BOUNDED_READ's rule for the one entry an idle wait read whole, so every read path answers alike."""
    size = len(entry.payload) if entry.payload is not None else sum(len(k) + len(v) for k, v in entry.fields.items())
    if size <= limit:
        return entry
    source = entry.fields
    if entry.payload is not None:
        try:
            body = unpack(entry.payload)
        except MessageError:
            body = {}
        source = {k.encode(): v.encode() for k, v in body.items() if isinstance(v, str)}
    kept: dict[bytes, bytes] = {k: source[k] for k in (b"job_id", b"reply_to") if k in source}
    return Entry(entry.id, None, kept, entry.deliveries, size)


def _bounded_entries(items: Any) -> list[Entry]:
    """The script's entries (raw ``[id, [k, v, ...]]``) as Entries, stubs marked ``oversized``."""
    entries = []
    for entry_id, flat in items or []:
        if not flat:
            continue  # deleted (trimmed) while pending
        fields = dict(zip(flat[::2], flat[1::2]))
        size = fields.pop(b"_oversized", None)
        entries.append(_entry(entry_id, fields) if size is None else Entry(_s(entry_id), None, fields, 1, int(size)))
    return entries


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


MAX_ID_PART = 2**64 - 1  # both parts of a stream id are unsigned 64-bit


def next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id``; the last possible id itself (anyone who may XADD with an
    explicit id can reach it), since nothing follows it."""
    ms, seq = _id_key(entry_id)
    if seq < MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < MAX_ID_PART else entry_id


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def ensure_group(r: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists. Idempotent."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_pipeline_groups(r: aioredis.Redis, keys: Keys) -> None:
    """Every service creates all groups first, so nothing a producer writes can be
    trimmed before its consumers have seen it."""
    for attr, group in PIPELINE_GROUPS:
        await ensure_group(r, getattr(keys, attr), group)


async def add(r: aioredis.Redis, stream: str, payload: bytes, *, maxlen: int | None = None) -> str:
    kwargs: dict[str, Any] = {"maxlen": maxlen, "approximate": True} if maxlen else {}
    return _s(await r.xadd(stream, {ENTRY_FIELD: payload}, **kwargs))


# An event on a client's reply stream before its answer (Admitted, Progress): added only to a stream
# (a key of another type under that name is left to the answer's delivery, which replaces it),
# trimmed, and given the answer's TTL unless it has one.
NOTIFY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'stream' then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return 1
"""


def notify(pipe: aioredis.client.Pipeline, stream: str, payload: bytes, *, maxlen: int, ttl_s: int) -> None:
    """Queue a NOTIFY of ``payload`` on ``stream`` in ``pipe`` (plain EVAL: it may run inside MULTI)."""
    pipe.eval(NOTIFY, 1, stream, payload, maxlen, ttl_s)


class StreamConsumer:
    """One consumer in one group of one stream."""

    def __init__(
        self,
        r: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        reclaim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        max_entry_bytes: int | None = None,
    ):
        """``max_entry_bytes``: entries larger than this are returned as stubs (``Entry.oversized``)
        and never read whole, except the one a blocking read waits for (one entry at a time)."""
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.reclaim_idle_ms = reclaim_idle_ms
        self.max_deliveries = max_deliveries
        self.max_entry_bytes = max_entry_bytes
        self._bounded = r.register_script(BOUNDED_READ) if max_entry_bytes is not None else None
        self._reclaim_cursor = "0-0"
        self._resume_own = True  # after a restart under the same name, first finish our own pending entries
        self._unacked = False  # the last batch read has not been acked yet
        self._next_reclaim = 0.0

    async def ensure_group(self) -> None:
        await ensure_group(self.r, self.stream, self.group)

    async def read(self, count: int, block_ms: int = 1000) -> list[Entry]:
        """Up to ``count`` entries: first any reclaimed from dead consumers, then new ones."""
        if self._unacked:
            # The last batch was never acked (a Redis outage or a failed step): it is still pending on
            # us, so take it up again now instead of waiting reclaim_idle_ms for XAUTOCLAIM.
            self._resume_own = True
        try:
            if self._resume_own:
                if self._bounded:
                    own = _bounded_entries(await self._bounded_call("read", count, "0"))
                else:
                    reply: Any = await self.r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
                    own = [_entry(i, f) for _s_, items in reply or [] for i, f in items if f]
                if own:
                    # Redis counted this re-delivery; a poison entry that crashed us N times must say N.
                    await self._set_deliveries(own)
                    self._unacked = True
                    return own  # acked ones leave the pending list, so reading "0" again moves on
                self._resume_own = False
            entries: list[Entry] = []
            if time.monotonic() >= self._next_reclaim:
                entries = await self._reclaim(count)
                if not entries:  # nothing stuck: look again a little later, not on every pull
                    self._next_reclaim = time.monotonic() + min(1.0, self.reclaim_idle_ms / 4000)
            if len(entries) < count and self._bounded:
                entries.extend(_bounded_entries(await self._bounded_call("read", count - len(entries), ">")))
            if len(entries) < count and not (self._bounded and entries):
                reply = await self.r.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    # With a size limit, only an idle wait reads directly: one entry, whatever its size.
                    count=1 if self._bounded else count - len(entries),
                    block=None if entries else block_ms,
                )
                for _stream, items in reply or []:
                    entries.extend(_entry(i, f) for i, f in items)
                if self.max_entry_bytes is not None:
                    entries = [_stub_if_over(e, self.max_entry_bytes) for e in entries]
            self._unacked = bool(entries)
            return entries
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted without persistence: recreate and carry on
                log.warning("consumer group missing, recreating", extra={"stream": self.stream, "group": self.group})
                await self.ensure_group()
                self._reclaim_cursor = "0-0"
                return []
            raise

    async def _bounded_call(self, mode: str, count: int, *args: str | int) -> Any:
        assert self._bounded is not None and self.max_entry_bytes is not None  # a size-limited consumer
        return await self._bounded(
            keys=[self.stream], args=[self.max_entry_bytes, mode, self.group, self.consumer, count, *args]
        )

    async def _reclaim(self, count: int) -> list[Entry]:
        if self._bounded:
            cursor, claimed, _deleted = await self._bounded_call(
                "claim", count, self.reclaim_idle_ms, self._reclaim_cursor
            )
            self._reclaim_cursor = _s(cursor)
            entries = _bounded_entries(claimed)
        else:
            reply = await self.r.xautoclaim(
                self.stream, self.group, self.consumer, self.reclaim_idle_ms, start_id=self._reclaim_cursor, count=count
            )
            cursor, claimed = reply[0], reply[1]
            self._reclaim_cursor = _s(cursor)
            entries = [_entry(i, f) for i, f in claimed if f is not None]
        if entries:
            await self._set_deliveries(entries)
            log.info("reclaimed entries", extra={"stream": self.stream, "count": len(entries)})
        return entries

    async def _set_deliveries(self, entries: list[Entry]) -> None:
        """Redis's own times-delivered counter (XPENDING) for entries now pending on this consumer."""
        pending = await self.r.xpending_range(
            self.stream,
            self.group,
            min=entries[0].id,
            max=entries[-1].id,
            count=len(entries) * 2,
            consumername=self.consumer,
        )
        counts = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        for e in entries:
            e.deliveries = counts.get(e.id, 2)

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.r.xack(self.stream, self.group, *ids)
        self._unacked = False

    async def write_and_ack(
        self,
        ids: Sequence[str],
        outputs: Iterable[tuple[str, bytes]],
        extra: Callable[[aioredis.client.Pipeline], None] | None = None,
    ) -> list[Any]:
        """XADD every output and XACK the inputs in one transaction: either the outputs
        exist and the inputs are acked, or neither (the inputs get reclaimed). Returns the
        replies: the XADDs', then ``extra``'s commands', then the XACK's."""
        async with self.r.pipeline(transaction=True) as pipe:
            for stream, payload in outputs:
                pipe.xadd(stream, {ENTRY_FIELD: payload})
            if extra:
                extra(pipe)
            if ids:
                pipe.xack(self.stream, self.group, *ids)
            replies = await pipe.execute()
        self._unacked = False
        return replies

    @contextlib.asynccontextmanager
    async def keep_claimed(self, ids: Sequence[str]) -> AsyncIterator[None]:
        """While a long batch runs, reset the idle time of its entries so that
        other consumers do not reclaim them from a live consumer."""
        interval = max(0.05, self.reclaim_idle_ms / 3000)
        done = asyncio.Event()

        async def refresh() -> None:
            while not done.is_set():
                try:
                    await asyncio.wait_for(done.wait(), interval)
                except asyncio.TimeoutError:
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await self.r.xclaim(self.stream, self.group, self.consumer, 0, list(ids), justid=True)

        # Stopped by a flag, not cancel(): redis-py can swallow a cancel that lands mid-command.
        task = asyncio.create_task(refresh()) if ids else None
        try:
            yield
        finally:
            done.set()
            if task:
                await task


def _missing(exc: ResponseError) -> bool:
    """The errors that mean "nothing there yet" (a stream or group not created yet, or gone after a
    flush), as opposed to ones that must surface (an ACL user without permission, a wrong type)."""
    text = str(exc)
    return "no such key" in text.lower() or text.startswith("NOGROUP")


async def backlog(r: aioredis.Redis, stream: str, group: str) -> int:
    """Entries not yet done by ``group``: undelivered (lag) plus delivered-but-unacked; 0 when the
    stream or the group does not exist.  Other errors raise: a NOPERM must not read as an empty queue."""
    try:
        for g in await r.xinfo_groups(stream):
            if _s(g["name"]) == group:
                lag = g.get("lag")
                return int(lag or 0) + int(g["pending"])
    except ResponseError as exc:
        if not _missing(exc):
            raise
    return 0


async def trim_processed(r: aioredis.Redis, stream: str) -> int:
    """Drop entries below the oldest one that any group still has to deliver or ack.
    Returns how many were removed. A stream without groups (or without the stream) is left alone;
    other errors raise."""
    try:
        groups = await r.xinfo_groups(stream)
        if not groups:
            return 0
        keep_from: str | None = None
        for g in groups:
            candidate = next_id(_s(g["last-delivered-id"]))
            if int(g["pending"]):
                summary = await r.xpending(stream, g["name"])
                if summary["min"] is not None:  # None: acked since XINFO GROUPS looked
                    candidate = min(candidate, _s(summary["min"]), key=_id_key)
            keep_from = candidate if keep_from is None else min(keep_from, candidate, key=_id_key)
    except ResponseError as exc:
        if not _missing(exc):
            raise
        return 0  # the stream or a group went away between the reads (a flush): nothing to trim
    return int(await r.xtrim(stream, minid=keep_from, approximate=False))


async def run_forever(
    name: str,
    step: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Call ``step`` until ``stop`` is set; ride out Redis outages with backoff."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            await step()
            backoff.reset()
        except TRANSIENT_ERRORS as exc:
            delay = await backoff.wait()
            log.warning(
                "redis unavailable, retrying",
                extra={"loop": name, "error": str(exc)[:200], "retry_in_s": round(delay, 2)},
            )
            if on_reconnect:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await on_reconnect()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one step must not kill the service; the entries get reclaimed
            log.exception("loop step failed", extra={"loop": name})
            await asyncio.sleep(1.0)

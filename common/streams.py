"""The one Redis-streams helper every service uses.

The cycle is read -> process -> write outputs and ack in one MULTI -> repeat.
Entries a dead consumer left pending are taken over with XAUTOCLAIM once they
have been idle for ``reclaim_idle_ms``; a live consumer working on a long batch
keeps its entries fresh (XCLAIM to itself) so nobody steals them.  Streams are
trimmed only below the oldest entry some group still has to process or ack.

Longer than 500 lines on purpose: the one Redis-streams helper every service uses (connections, the
consumer cycle, the router's bounded reader, backlog and trimming), by the architecture's rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.config import Keys, RedisSettings
from common.lua import script
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
    stream: str = ""  # the stream it was read from (set by SubmissionReader, which reads many)


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes] | None, stream: str = "") -> Entry:
    fields = fields or {}
    return Entry(_s(entry_id), fields.get(ENTRY_FIELD), fields, stream=stream)


# The router's read of every submission stream (SubmissionReader): fair, size-bounded, one round trip.
BOUNDED_READ = script("common", "lua/bounded_read.lua")


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
    return Entry(entry.id, None, kept, entry.deliveries, size, entry.stream)


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


# An event on a client's reply stream before its answer (Admitted, Progress).
NOTIFY = script("common", "lua/notify.lua")


def notify(pipe: aioredis.client.Pipeline, stream: str, payload: bytes, *, maxlen: int, ttl_s: int) -> None:
    """Queue a NOTIFY of ``payload`` on ``stream`` in ``pipe`` (plain EVAL: it may run inside MULTI)."""
    pipe.eval(NOTIFY, 1, stream, payload, maxlen, ttl_s)


async def undelivered(r: aioredis.Redis, stream: str, group: str, count: int) -> list[Entry]:
    """Up to ``count`` entries of ``stream`` that ``group`` has not handed to any consumer yet, oldest first."""
    last = "0-0"
    try:
        for info in await r.xinfo_groups(stream):
            if _s(info.get("name")) == group:
                last = _s(info.get("last-delivered-id"))
    except ResponseError as exc:  # no such stream yet; a NOPERM must not read as an empty queue
        if not missing(exc):
            raise
        return []
    rows = await r.xrange(stream, next_id(last), "+", count=count) or []
    return [_entry(_s(i), cast("dict[bytes, bytes]", f), stream) for i, f in rows]


# The deadline rule's exchange in the heavy queue (common/routing.exchange_for), atomic with the caller's batch.
EXCHANGE = script("common", "lua/exchange.lua")


@dataclass(frozen=True)
class Exchange:
    """A late job for the place of the waiting entry ``waiting_id``, with both answers it may need."""

    waiting_id: str
    waiting_answer: bytes  # the waiting job's light answer, should it yield its place
    late_job: bytes  # the late job for the queue, should it get that place
    late_answer: bytes  # the late job's light answer, should a worker have taken the waiting one meanwhile


def exchange_waiting(
    pipe: aioredis.client.Pipeline, *, queue: str, completions: str, group: str, swap: Exchange
) -> None:
    """Queue in ``pipe`` the exchange ``swap`` in ``queue``: the waiting entry, still undelivered to ``group``,
    deleted and its answer added to ``completions``, the late job added to ``queue``; when the entry was
    delivered meanwhile, the late job's answer instead. Its reply is 1 when exchanged, else 0."""
    pipe.eval(
        EXCHANGE, 2, queue, completions, group, swap.waiting_id, swap.waiting_answer, swap.late_job, swap.late_answer
    )


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
    ):
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.reclaim_idle_ms = reclaim_idle_ms
        self.max_deliveries = max_deliveries
        self._reclaim_cursor = "0-0"
        self._resume_own = True  # after a restart under the same name, first finish our own pending entries
        self._unacked = False  # the last batch read has not been acked yet
        self._deferred: set[str] = set()  # entries of batches finished in the background (defer)
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
                reply: Any = await self.r.xreadgroup(
                    self.group, self.consumer, {self.stream: "0"}, count=count + len(self._deferred)
                )
                own = [_entry(i, f) for _s_, items in reply or [] for i, f in items if f]
                own = [e for e in own if e.id not in self._deferred][:count]
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
            if len(entries) < count:
                reply = await self.r.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    count=count - len(entries),
                    block=None if entries else block_ms,
                )
                for _stream, items in reply or []:
                    entries.extend(_entry(i, f) for i, f in items)
            self._unacked = bool(entries)
            return entries
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted without persistence: recreate and carry on
                log.warning("consumer group missing, recreating", extra={"stream": self.stream, "group": self.group})
                await self.ensure_group()
                self._reclaim_cursor = "0-0"
                return []
            raise

    async def read_more(self, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new entries for the batch read last, not yet acked (a heavy worker filling a short
        batch): waits up to ``block_ms`` for one; never our pending or a reclaim, which :meth:`read` owns."""
        try:
            reply: Any = await self.r.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=max(1, count), block=max(1, block_ms)
            )
        except ResponseError as exc:
            if missing(exc):  # Redis lost the group meanwhile: run what we have; the next read recreates it
                return []
            raise
        entries = [_entry(i, f) for _stream, items in reply or [] for i, f in items]
        self._unacked = self._unacked or bool(entries)
        return entries

    async def _reclaim(self, count: int) -> list[Entry]:
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
        await set_deliveries(self.r, self.stream, self.group, self.consumer, entries)

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.r.xack(self.stream, self.group, *ids)
        self._acked(ids)

    def _acked(self, ids: Sequence[str]) -> None:
        if not self._deferred.intersection(ids):  # a deferred batch's ack says nothing of the one read since
            self._unacked = False

    def defer(self, ids: Sequence[str]) -> None:
        """The batch read last is finished in the background while the next is read (run_batch's overlap):
        the next read is no retry of it, and resuming our own pending entries passes its entries by."""
        self._deferred.update(ids)
        self._unacked = False

    def undefer(self, ids: Sequence[str], *, failed: bool) -> None:
        """A deferred batch acked, or ``failed`` before its ack: then its entries are ours to take up again."""
        self._deferred.difference_update(ids)
        if failed:
            self._resume_own = True

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
        self._acked(ids)
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
                except TimeoutError:
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


async def set_deliveries(r: aioredis.Redis, stream: str, group: str, consumer: str, entries: list[Entry]) -> None:
    """Redis's own times-delivered counter (XPENDING) for entries of ``stream`` now pending on ``consumer``."""
    pending = await r.xpending_range(
        stream, group, min=entries[0].id, max=entries[-1].id, count=len(entries) * 2, consumername=consumer
    )
    counts = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
    for e in entries:
        e.deliveries = counts.get(e.id, 2)


class SubmissionReader:
    """The router's consumer of every submission stream (the shared jobs stream and each tenant's):
    one consumer in one group on many streams, through ``BOUNDED_READ``.

    - Its connections do not grow with the number of streams: a read is one script call over all of
      them, and the idle wait one ``XREADGROUP BLOCK`` over all of them (Redis serves a blocked reader
      as soon as one entry arrives, so that wait returns about one entry, read whole, then cut to a stub).
    - Reads are fair: a read takes up to ``per_stream`` entries from each stream (starting at a
      rotating stream) before it takes more from any, so a flooded stream cannot hide a quiet one.
    - Reads are size-bounded: an entry over ``max_entry_bytes`` comes back as a stub (``Entry.oversized``).
    - Crash safety as ``StreamConsumer``: own pending entries first (after a restart under the same
      name, or a batch never acked), entries of a dead consumer reclaimed after ``reclaim_idle_ms``.
    """

    def __init__(
        self,
        r: aioredis.Redis,
        group: str,
        consumer: str,
        *,
        max_entry_bytes: int,
        reclaim_idle_ms: int = 30_000,
        per_stream: int = 16,
    ):
        self.r, self.group, self.consumer = r, group, consumer
        self.max_entry_bytes, self.reclaim_idle_ms, self.per_stream = max_entry_bytes, reclaim_idle_ms, per_stream
        self._script = r.register_script(BOUNDED_READ)
        self.streams: list[str] = []
        self._resume: set[str] = set()  # streams whose own pending entries come first
        self._unacked: set[str] = set()  # streams of the last batch, until it is acked
        self._next_reclaim = 0.0
        self._rotation = 0

    def set_streams(self, streams: Sequence[str]) -> None:
        """Read these streams from now on (their groups must exist: ``ensure_group``)."""
        added = set(streams) - set(self.streams)
        self.streams = list(streams)
        self._resume = (self._resume | added) & set(streams)
        self._unacked &= set(streams)

    async def ensure_group(self, stream: str) -> None:
        await ensure_group(self.r, stream, self.group)

    async def read(self, count: int, block_ms: int = 1000) -> list[Entry]:
        """Up to ``count`` entries, each with its ``stream``: own pending ones first, then reclaimed
        ones, then new ones; waits up to ``block_ms`` when there are none."""
        if not self.streams:
            await asyncio.sleep(block_ms / 1000)
            return []
        self._resume |= self._unacked
        try:
            if self._resume:
                resuming = sorted(self._resume)
                own = await self._call("read", resuming, count, count, "0")
                self._resume = {e.stream for e in own}
                if own:
                    await self._count_deliveries(own)
                    self._unacked = self._resume
                    return own
            entries: list[Entry] = []
            if time.monotonic() >= self._next_reclaim:
                entries = await self._call("claim", self.streams, count, count, self.reclaim_idle_ms)
                if entries:
                    await self._count_deliveries(entries)
                    log.info("reclaimed entries", extra={"count": len(entries)})
                else:  # nothing stuck: look again a little later, not on every pull
                    self._next_reclaim = time.monotonic() + min(1.0, self.reclaim_idle_ms / 4000)
            if len(entries) < count:
                self._rotation = (self._rotation + 1) % len(self.streams)
                rotated = self.streams[self._rotation :] + self.streams[: self._rotation]
                entries += await self._call("read", rotated, count - len(entries), self.per_stream, ">")
            if not entries:
                reply: Any = await self.r.xreadgroup(
                    self.group, self.consumer, dict.fromkeys(self.streams, ">"), count=1, block=block_ms
                )
                entries = [
                    _stub_if_over(_entry(i, f, _s(stream)), self.max_entry_bytes)
                    for stream, items in reply or []
                    for i, f in items
                ]
            self._unacked = {e.stream for e in entries}
            return entries
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted without persistence (or a stream was deleted)
                log.warning("consumer group missing, recreating", extra={"group": self.group})
                for stream in self.streams:
                    await self.ensure_group(stream)
                return []
            raise

    async def _call(self, mode: str, streams: list[str], count: int, per_stream: int, arg: str | int) -> list[Entry]:
        reply = await self._script(
            keys=streams,
            args=[self.max_entry_bytes, mode, self.group, self.consumer, count, per_stream, arg],
        )
        entries = []
        for index, (entry_id, flat) in reply or []:
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            size = fields.pop(b"_oversized", None)
            stream = streams[int(index) - 1]
            entries.append(
                _entry(entry_id, fields, stream)
                if size is None
                else Entry(_s(entry_id), None, fields, 1, int(size), stream)
            )
        return entries

    async def _count_deliveries(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[Entry]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e)
        for stream, group in by_stream.items():
            await set_deliveries(self.r, stream, self.group, self.consumer, sorted(group, key=lambda e: _id_key(e.id)))

    async def write_and_ack(
        self,
        entries: Sequence[Entry],
        outputs: Iterable[tuple[str, bytes]],
        extra: Callable[[aioredis.client.Pipeline], None] | None = None,
    ) -> list[Any]:
        """As ``StreamConsumer.write_and_ack``, acking each entry on its own stream."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        async with self.r.pipeline(transaction=True) as pipe:
            for stream, payload in outputs:
                pipe.xadd(stream, {ENTRY_FIELD: payload})
            if extra:
                extra(pipe)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            replies = await pipe.execute()
        self._unacked = set()
        return replies


def missing(exc: ResponseError) -> bool:
    """The errors that mean "nothing there yet" (a stream or group not created yet, or gone after a
    flush), as opposed to ones that must surface (an ACL user without permission, a wrong type)."""
    text = str(exc)
    return "no such key" in text.lower() or text.startswith("NOGROUP")


# Entries a group has not done; counts the undelivered itself in a stream an exchange has XDELed from.
BACKLOG = script("common", "lua/backlog.lua")
BACKLOG_COUNT_CAP = 10_000  # counting stops here (a queue that long is late for any deadline anyway)


async def backlog(r: aioredis.Redis, stream: str, group: str) -> int:
    """Entries not yet done by ``group``: undelivered plus delivered-but-unacked (common/lua/backlog.lua);
    0 when the stream or the group does not exist.  Other errors raise: a NOPERM must not read as an empty
    queue."""
    reply = await r.eval(BACKLOG, 1, stream, group, BACKLOG_COUNT_CAP)
    return int(reply)


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
        if not missing(exc):
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

"""Image bytes out of the queues: the blob store.

A worker writes each image it makes once, keyed by job (``<job_id>.light``, ``<job_id>.heavy``,
``<job_id>.thumb``), and stream entries carry a :class:`~common.messages.BlobRef` (key, size, format,
sha256) instead of the bytes. Images smaller than ``--blob-min-bytes`` stay inline: for a few hundred
bytes a reference and a round trip cost more than the bytes.

Backends (``DIFFSERVE_BLOB_URL``):

- empty: the queue Redis itself (the embedded default: nothing more to run);
- ``redis://...``, several comma-separated: other Redis servers, the key's CRC32 picks the shard
  (changing the list moves keys: drain the stack first);
- ``s3://bucket/prefix``: any S3-compatible store through obstore (the ``s3`` extra); endpoint,
  region and credentials from the usual ``AWS_*`` variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``);
- ``file:///absolute/directory``: files in a directory every process of the stack shares (tmpfs such
  as ``/dev/shm`` on one host, a volume every container or pod mounts): no server in the path, one
  copy in and one out per image.

Lifetimes: every blob is written with an expiry of ``--blob-ttl-s`` (Redis ``EX``; S3 objects and
files have none of their own, so the router sweeps those older than that), and the router deletes a
job's blobs once its answer is delivered unless the client was given references to them.

A store that is down or slow is retried until ``--blob-timeout-s`` has passed, then raises
:class:`BlobUnavailable`, which the services turn into an ``internal_error`` answer for the jobs concerned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import re
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis

from common import metrics
from common.config import Keys, RedisSettings
from common.messages import E_INTERNAL, BlobRef, FinalResult, Status
from common.streams import connect

log = logging.getLogger(__name__)

LIGHT, HEAVY, THUMB = "light", "heavy", "thumb"
MAX_BLOB_BYTES = 32 << 20  # the largest image the services store or read (common.imaging decodes no more)
T = TypeVar("T")


class BlobUnavailable(Exception):
    """The store did not answer within ``--blob-timeout-s`` (down, slow or refusing)."""


def blob_key(job_id: str, kind: str) -> str:
    # Not "<job_id>/<kind>": a job id may be ".." (a path segment object stores refuse); "...light" is fine.
    return f"{job_id}.{kind}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """The operations the services need; a backend implements the underscore ones (no retries)."""

    def __init__(self, *, ttl_s: int, timeout_s: float, min_bytes: int):
        self.ttl_s, self.timeout_s, self.min_bytes = ttl_s, timeout_s, min_bytes
        self._next_sweep = time.monotonic() + self.sweep_interval_s()

    # ---- backend primitives
    async def _put(self, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    async def _get(self, keys: list[str], take: bool) -> list[bytes | None]:
        raise NotImplementedError

    async def _delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    async def keys(self) -> list[str]:
        """Every stored key (tests and benchmarks count them)."""
        raise NotImplementedError

    async def url(self, ref: BlobRef, expires_s: int) -> str | None:
        """A URL anyone holding it can GET the bytes from for ``expires_s`` (S3: presigned), else None."""
        return None

    async def _sweep(self) -> int:
        return 0  # stores with per-key expiry need no sweeping

    async def close(self) -> None:
        pass

    # ---- what the services call
    async def _retrying(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(call(), max(0.01, left))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # transport errors of either backend, a timeout, a store refusing
                if time.monotonic() + delay >= deadline:
                    metrics.BLOB_ERRORS.labels(op).inc()
                    what = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    raise BlobUnavailable(f"the image store is unavailable ({op}: {what})") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    def check_key(self, key: str) -> None:
        """Raise ValueError for a key this store cannot hold (before any retrying)."""

    async def keep(self, items: Sequence[tuple[str, bytes, str, str]]) -> list[bytes | BlobRef]:
        """``(key, data, format, sha256)`` per image: what goes into the stream entry for each, the bytes
        themselves when small, else a reference (the big ones stored in one round)."""
        out: list[bytes | BlobRef] = []
        stored: list[tuple[str, bytes]] = []
        for key, data, fmt, sha in items:
            if len(data) < self.min_bytes:
                out.append(data)
                continue
            if len(data) > MAX_BLOB_BYTES:
                raise ValueError(f"image of {len(data)} bytes is over the {MAX_BLOB_BYTES}-byte limit")
            self.check_key(key)
            stored.append((key, data))
            out.append(BlobRef(key=key, size=len(data), format=fmt, digest=sha))
        if stored:
            await self._retrying("put", lambda: self._put(stored))
            metrics.BLOB_BYTES.labels("put").inc(sum(len(d) for _k, d in stored))
        return out

    async def read(self, refs: Sequence[BlobRef], *, take: bool = False) -> list[bytes | None]:
        """The bytes of each reference, None where the blob is gone (expired, deleted) or is not what the
        reference says (size); ``take``: delete them as they are read."""
        if not refs:
            return []
        keys = [r.key for r in refs]
        got = await self._retrying("get", lambda: self._get(keys, take))
        metrics.BLOB_BYTES.labels("get").inc(sum(len(d) for d in got if d))
        return [d if d is not None and len(d) == r.size else None for d, r in zip(got, refs, strict=False)]

    async def discard(self, keys: Sequence[str]) -> None:
        """Delete what nobody will read again, best effort: one try of at most a second; what a failure
        leaves behind expires (a pipeline stage must not stall on it)."""
        if not keys:
            return
        try:
            await asyncio.wait_for(self._delete(list(keys)), min(1.0, self.timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.BLOB_ERRORS.labels("discard").inc()
            log.warning("images left to expire", extra={"count": len(keys), "error": str(exc)[:200]})

    def sweep_interval_s(self) -> float:
        return min(600.0, max(1.0, self.ttl_s / 4))

    async def maybe_sweep(self) -> int:
        """Delete what outlived the TTL, at most every ``sweep_interval_s`` (a no-op with Redis)."""
        if time.monotonic() < self._next_sweep:
            return 0
        self._next_sweep = time.monotonic() + self.sweep_interval_s()
        try:
            removed = await self._sweep()
        except Exception as exc:  # best effort, as discard: the next sweep catches up
            metrics.BLOB_ERRORS.labels("sweep").inc()
            log.warning("expired images not swept", extra={"error": str(exc)[:200]})
            return 0
        if removed:
            log.info("expired images deleted", extra={"count": removed})
        return removed


class RedisBlobs(BlobStore):
    """Blobs as Redis strings ``<ns>:blob:<key>`` with ``EX``; one or more servers (shards)."""

    def __init__(self, shards: list[aioredis.Redis], prefix: str, *, owned: bool, **kwargs: Any):
        super().__init__(**kwargs)
        self.shards, self.prefix, self.owned = shards, prefix, owned

    def _by_shard(self, keys: Sequence[str]) -> dict[int, list[int]]:
        """Shard index -> positions in ``keys``."""
        groups: dict[int, list[int]] = {}
        n = len(self.shards)
        for i, key in enumerate(keys):
            groups.setdefault(zlib.crc32(key.encode()) % n if n > 1 else 0, []).append(i)
        return groups

    async def _put(self, items: list[tuple[str, bytes]]) -> None:
        async def one(shard: int, positions: list[int]) -> None:
            async with self.shards[shard].pipeline(transaction=False) as pipe:
                for i in positions:
                    key, data = items[i]
                    pipe.set(self.prefix + key, data, ex=self.ttl_s)
                await pipe.execute()

        await asyncio.gather(*(one(s, p) for s, p in self._by_shard([k for k, _d in items]).items()))

    async def _get(self, keys: list[str], take: bool) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)

        async def one(shard: int, positions: list[int]) -> None:
            names = [self.prefix + keys[i] for i in positions]
            values: list[Any]
            if take:
                async with self.shards[shard].pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.getdel(name)
                    values = await pipe.execute()
            else:
                values = await self.shards[shard].mget(names)
            for i, value in zip(positions, values, strict=False):
                out[i] = value

        await asyncio.gather(*(one(s, p) for s, p in self._by_shard(keys).items()))
        return out

    async def _delete(self, keys: list[str]) -> None:
        await asyncio.gather(
            *(self.shards[s].unlink(*[self.prefix + keys[i] for i in p]) for s, p in self._by_shard(keys).items())
        )

    async def keys(self) -> list[str]:
        found = []
        for shard in self.shards:
            async for name in shard.scan_iter(match=self.prefix + "*", count=1000):
                found.append(name.decode()[len(self.prefix) :])
        return found

    async def close(self) -> None:
        if self.owned:
            for shard in self.shards:
                await shard.aclose()


class S3Blobs(BlobStore):
    """Blobs as objects under ``s3://bucket/prefix``, through obstore (async, native)."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(**kwargs)
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError:
            raise SystemExit(
                "diffserve: an s3:// image store needs obstore: pip install -c constraints.txt 'diffserve[s3]'"
            ) from None
        self._obs = obstore
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"image store URL {url!r}: expected s3://bucket[/prefix]")
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            # A plain-http endpoint (a local S3-compatible server) is allowed when it is the one configured.
            client_options={"timeout": timeout, "connect_timeout": timeout, "allow_http": endpoint.startswith("http:")},
            # Our own retry loop bounds the whole operation; the client retries a little inside it.
            retry_config={"max_retries": 2, "retry_timeout": timeout},
        )

    async def _put(self, items: list[tuple[str, bytes]]) -> None:
        await asyncio.gather(*(self._obs.put_async(self.store, key, data) for key, data in items))

    async def _get_one(self, key: str) -> bytes | None:
        try:
            got = await self._obs.get_async(self.store, key)
        except FileNotFoundError:
            return None
        if got.meta["size"] > MAX_BLOB_BYTES:
            return None
        return bytes(await got.bytes_async())

    async def _get(self, keys: list[str], take: bool) -> list[bytes | None]:
        out = list(await asyncio.gather(*(self._get_one(key) for key in keys)))
        if take:
            await self._delete(keys)
        return out

    async def _delete(self, keys: list[str]) -> None:
        await self._obs.delete_async(self.store, keys)

    async def keys(self) -> list[str]:
        return [str(meta["path"]) for chunk in await self._list() for meta in chunk]

    async def _list(self) -> list[Any]:
        return [chunk async for chunk in self._obs.list(self.store, chunk_size=1000)]

    async def url(self, ref: BlobRef, expires_s: int) -> str | None:
        signed = await self._obs.sign_async(self.store, "GET", ref.key, datetime.timedelta(seconds=expires_s))
        return str(signed)

    async def _sweep(self) -> int:
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self.ttl_s)
        old = [str(m["path"]) for chunk in await self._list() for m in chunk if m["last_modified"] < cutoff]
        for start in range(0, len(old), 1000):
            await self._delete(old[start : start + 1000])
        return len(old)


class FileBlobs(BlobStore):
    """Blobs as files in one directory that every process shares, named by :func:`file_name`.

    A write goes to a temporary file renamed into place (a reader never sees half an image); a take
    renames the file away before reading it (of two takers, one gets it); a file older than the TTL
    (its mtime) reads as gone and the router's sweep deletes it. Each call does its file I/O in one
    thread, off the event loop (a network volume can block), except on a file system in memory."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(**kwargs)
        parts = urllib.parse.urlsplit(url)
        root = urllib.parse.unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not os.path.isabs(root) or parts.query or parts.fragment:
            raise ValueError(f"image store URL {url!r}: expected file:///absolute/directory")
        # Made once, at start: a volume that goes away later must fail (BlobUnavailable), not be recreated
        # on the file system underneath.
        os.makedirs(root, exist_ok=True)
        self.root = root
        # In memory a 512 KiB read or write is a copy of ~0.3 ms, which never waits for a device; a thread
        # hop costs about as much again, and a read in a thread another ~0.3 ms of page faults (glibc gives
        # each thread an arena that hands freed memory back). Measured: benchmarks/blob_store.py.
        self.inline = in_memory(root)

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        return call(*args) if self.inline else await asyncio.to_thread(call, *args)

    def check_key(self, key: str) -> None:
        file_name(key)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, file_name(key))

    def _scratch(self, what: str) -> str:
        return os.path.join(self.root, f".{what}-{uuid.uuid4().hex}")

    async def _put(self, items: list[tuple[str, bytes]]) -> None:
        await self._io(self._put_files, items)

    def _put_files(self, items: list[tuple[str, bytes]]) -> None:
        for key, data in items:
            path, tmp = self._path(key), self._scratch("tmp")
            try:
                with open(tmp, "xb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    async def _get(self, keys: list[str], take: bool) -> list[bytes | None]:
        return await self._io(self._get_files, keys, take)

    def _get_files(self, keys: list[str], take: bool) -> list[bytes | None]:
        os.stat(self.root)  # a store that is gone is unavailable (retried), not every image "expired"
        cutoff = time.time() - self.ttl_s
        out: list[bytes | None] = []
        for key in keys:
            try:
                path = self._path(key)
            except ValueError:  # no image can be stored under it
                out.append(None)
                continue
            if not take:
                out.append(_read_file(path, cutoff))
                continue
            moved = self._scratch("take")
            try:
                os.rename(path, moved)
            except FileNotFoundError:  # gone, or another taker got it first
                out.append(None)
                continue
            try:
                out.append(_read_file(moved, cutoff))
            except BaseException:
                os.replace(moved, path)  # back in place for the retry
                raise
            os.unlink(moved)
        return out

    async def _delete(self, keys: list[str]) -> None:
        await self._io(self._delete_files, keys)

    def _delete_files(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError, ValueError):
                os.unlink(self._path(key))

    async def keys(self) -> list[str]:
        names = await asyncio.to_thread(os.listdir, self.root)
        return [urllib.parse.unquote(n) for n in names if not n.startswith(".")]

    async def _sweep(self) -> int:
        return await asyncio.to_thread(self._sweep_files)

    def _sweep_files(self) -> int:
        """Delete the files (leftover temporary ones too) last written before the TTL."""
        cutoff = time.time() - self.ttl_s
        removed = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # deleted or taken meanwhile
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed


NAME_MAX = 255  # bytes in one file name on Linux file systems
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})


def in_memory(path: str) -> bool:
    """Whether ``path`` is on a file system held in memory (Linux: its mount in /proc/self/mounts)."""
    try:
        with open("/proc/self/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh]
    except OSError:  # no /proc: assume a file system that can block
        return False
    path = os.path.realpath(path)
    mount, kind = "", ""
    for escaped, fs in mounts:  # the last of the longest mount points that hold the path (mounts stack)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), escaped)  # "\040" is a space
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(mount):
            mount, kind = point, fs
    return kind in MEMORY_FILE_SYSTEMS


def file_name(key: str) -> str:
    """The file name a key is stored under. Keys come from job ids and references in stream entries,
    which are untrusted: every character but ASCII letters, digits and ``_.-~`` is %-escaped, ``/``
    included, and so is a leading ``.``; so no key names a path outside the directory, ``.``, ``..``
    or one of the store's own temporary files (those start with ``.``). ValueError when the name would
    be empty or too long."""
    name = urllib.parse.quote(key, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not name or len(name) > NAME_MAX:
        raise ValueError(f"image store key of {len(name)} characters: no file can be named after it")
    return name


def _read_file(path: str, cutoff: float) -> bytes | None:
    """The bytes of a stored image, None when it is not there, outlived the TTL or is over the size limit."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_mtime < cutoff or st.st_size > MAX_BLOB_BYTES:
                return None
            return fh.read()
    except FileNotFoundError:
        return None


async def inline_images(store: BlobStore, answers: list[tuple[FinalResult, BlobRef]]) -> int:
    """Put the stored bytes into answers that go out with their image inline (one read for all); an answer
    whose image the store cannot give becomes an ``internal_error`` (never an answer without its image).
    Returns how many failed."""
    if not answers:
        return 0
    try:
        read: list[bytes | None] = await store.read([ref for _answer, ref in answers])
        why = "the image expired or was lost from the image store"
    except BlobUnavailable as exc:
        read, why = [None] * len(answers), str(exc)
    failed = 0
    for (answer, _ref), data in zip(answers, read, strict=False):
        if data is not None:
            answer.image = data
            continue
        failed += 1
        answer.status, answer.error_code, answer.error_message = Status.ERROR, E_INTERNAL, why
        answer.image_format = answer.answered_by = answer.model = answer.confidence = None
        answer.slo_met = False
    return failed


def open_store(settings: RedisSettings, redis: aioredis.Redis | None = None) -> BlobStore:
    """The image store ``settings.blob_url`` names; the empty default shares ``redis`` (the caller's
    queue client) when given."""
    kwargs: dict[str, Any] = {
        "ttl_s": settings.blob_ttl_s,
        "timeout_s": settings.blob_timeout_s,
        "min_bytes": settings.blob_min_bytes,
    }
    url = settings.blob_url.strip()
    if url.startswith("s3://"):
        return S3Blobs(url, **kwargs)
    if url.startswith("file://"):
        return FileBlobs(url, **kwargs)
    prefix = Keys(settings.namespace).blob_prefix
    if not url:
        return RedisBlobs([redis or connect(settings, client_name="blobs")], prefix, owned=redis is None, **kwargs)
    urls = [u.strip() for u in url.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("redis://", "rediss://")):
            raise ValueError(f"image store URL {u!r}: use redis://, rediss://, s3:// or file://")
    # Credentials of another Redis come in its own URL; the TLS files are shared with the queue's.
    shards = [
        connect(
            dataclasses.replace(settings, redis_url=u, redis_username=None, redis_password=None), client_name="blobs"
        )
        for u in urls
    ]
    return RedisBlobs(shards, prefix, owned=True, **kwargs)

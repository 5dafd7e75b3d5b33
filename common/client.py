"""Python client: ``await client.submit(prompt) -> FinalResult``.

Each client owns a reply stream (``<ns>:reply:<id>``); the router XADDs every result
there exactly once, and one background reader hands results to the waiting callers.
Jobs pushed without ``reply_to`` get their result in the list ``<ns>:result:<job_id>``
instead (``wait_result``), which is what a plain ``XADD`` user reads with BLPOP.

A **tenant** client (``tenant="NAME"``, which ``diffserve submit`` takes from ``DIFFSERVE_TENANT``; Redis
user ``NAME`` by default) submits to its own stream ``<ns>:in:NAME`` and reads its own reply streams
``<ns>:out:NAME:*`` only: it needs no permission on any shared key (``diffserve tenant add NAME`` makes such
a user).

``submit(..., on_light=f)`` asks for the light image of a job that goes on to the heavy
model: the discriminator puts a ``LightReady`` on the reply stream and ``f`` gets it
before the final result arrives.  ``submit(..., on_event=g)`` asks for where the job stands:
``g`` gets the router's ``Admitted`` (the queue it joined, jobs ahead) and the heavy model's
``Progress`` (denoising steps).  ``cancel(job_id)`` stops a job that has not started, and one the
heavy model is running once every job in its batch is cancelled (else its result is dropped).

``submit(..., image_ref=True)`` asks for references instead of image bytes (``FinalResult.image_ref``,
``LightReady.image_ref``; small images still come inline); ``await client.image(result)`` reads the bytes
from the image store (``DIFFSERVE_BLOB_URL``, the queue Redis by default), ``release=True`` deletes them
as it reads (otherwise they expire after ``--blob-ttl-s``).

Each job carries a random ``reply_token`` that its answers echo; the reader accepts only an answer with
the token of a job it still waits for, so whoever can write the reply stream but cannot read the jobs
stream cannot forge one.  A submission whose reply was lost (the connection dropped after Redis took
the entry) is sent again, the same bytes under the same id: the router recognises the retry and the one
answer of the job comes back (design.md, "Retrying a job id").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from common import stackfile
from common.blobs import BlobStore, open_store
from common.config import Keys, RedisSettings
from common.messages import (
    ENTRY_FIELD,
    EVENT_TYPES,
    Admitted,
    Cancel,
    FinalResult,
    Job,
    LightReady,
    MessageError,
    Progress,
    new_job_id,
    unpack,
)
from common.streams import SOCKET_TIMEOUT_S, TRANSIENT_ERRORS, Backoff, add, connect
from common.tenants import check_name, default_reply

log = logging.getLogger(__name__)

READ_BLOCK_MS = 200  # also how long close() may wait for the reader
SUBMIT_ATTEMPTS = 5  # a submission that fails on the connection is sent again (same bytes) this often
BLPOP_PIECE_S = SOCKET_TIMEOUT_S / 2  # one BLPOP must return before the socket timeout fires


async def router_connected(r: aioredis.Redis) -> bool | None:
    """Whether a router process holds a connection to this Redis (services name theirs
    ``router:<instance>``); None when this user may not list connections (a tenant)."""
    try:
        clients: Any = await r.client_list(_type="normal")
    except NoPermissionError:
        return None
    return any(str(c.get("name", "")).startswith("router:") for c in clients)


async def preflight(client: Client, redis_url: str, timeout_s: float = 5.0) -> str | None:
    """One line saying why jobs sent through ``client`` would never be answered (no Redis there, or no
    router serving it), within ``timeout_s``; None when a router is connected (or when this user may
    not look: a tenant)."""
    where = _redacted(redis_url)
    try:
        alive = await asyncio.wait_for(router_connected(client.redis), timeout_s)
    except TimeoutError:
        return f"Redis at {where} did not answer within {timeout_s:g} s"
    except (RedisError, OSError) as exc:
        hint = " (start a local stack with `diffserve up`)" if stackfile.find() is None else ""
        return f"cannot reach Redis at {where}: {str(exc).splitlines()[0][:200]}{hint}"
    if alive is False:
        return (
            f"no router is serving Redis at {where} (namespace {client.keys.jobs.rsplit(':', 1)[0]}): "
            "start a stack with `diffserve up`, or pass the URL of one with --redis-url"
        )
    return None


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{auth.split(':')[0] + ':***@' if at else ''}{host}"


class Client:
    def __init__(
        self,
        settings: RedisSettings | None = None,
        *,
        redis_url: str | None = None,
        max_unclaimed: int = 10_000,
        tenant: str | None = None,
    ):
        """``max_unclaimed``: results nobody awaits that are kept for ``results()``; past it the
        oldest are dropped (counted in ``dropped``); 0 keeps none (a caller that only ever waits
        with ``submit``, like the gateway: an answer whose caller gave up is dropped on arrival).
        ``tenant``: submit as this tenant (its Redis user defaults to the tenant's name)."""
        settings = settings or RedisSettings()
        if redis_url:
            settings.redis_url = redis_url
        self.tenant = check_name(tenant) if tenant else None
        if self.tenant and not settings.redis_username:
            settings.redis_username = self.tenant
        self.keys = Keys(settings.namespace)
        self.settings = settings
        self.redis = connect(settings, client_name="client")
        self._blobs: BlobStore | None = None
        self.reader_redis = connect(settings, client_name="client-reader")
        self.jobs_stream = self.keys.jobs if self.tenant is None else self.keys.tenant_in(self.tenant)
        replies = self.keys.reply_prefix if self.tenant is None else self.keys.tenant_out(self.tenant)
        self.reply_stream = f"{replies}{uuid.uuid4().hex}"
        self._waiting: dict[str, asyncio.Future[FinalResult]] = {}
        self._on_light: dict[str, Callable[[LightReady], None]] = {}
        self._on_event: dict[str, Callable[[Admitted | Progress], None]] = {}
        self._unclaimed: asyncio.Queue[FinalResult] | None = asyncio.Queue(max_unclaimed) if max_unclaimed > 0 else None
        # job id -> the reply token of the answer still owed on our reply stream: anything else there
        # (another id, a wrong or missing token, a second answer) was forged or duplicated, and is dropped.
        self._owed: dict[str, str] = {}
        self.dropped = 0  # unclaimed results dropped because nobody read them
        self.rejected = 0  # results for job ids this client did not submit
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            # Let the reader see the flag rather than cancelling it: a cancel that lands while
            # redis-py is between commands can leave the task hanging.
            self._closing = True
            with contextlib.suppress(Exception):
                await self._reader
        if self.tenant is None:  # a tenant may not delete; its reply stream expires (--result-ttl-s)
            with contextlib.suppress(Exception):
                await self.redis.delete(self.reply_stream)
        if self._blobs is not None:
            await self._blobs.close()
        await self.redis.aclose()
        await self.reader_redis.aclose()

    @property
    def blobs(self) -> BlobStore:
        """The image store (opened on first use)."""
        if self._blobs is None:
            self._blobs = open_store(self.settings, self.redis)
        return self._blobs

    async def image(self, message: FinalResult | LightReady, *, release: bool = False) -> bytes:
        """The image bytes of an answer or a light preview: inline, or read from the image store when the
        job asked for a reference. ``release``: delete them from the store as they are read (a tenant
        cannot delete; its images expire). LookupError when there is no image (an error answer) or it
        is gone (expired); BlobUnavailable when the store does not answer."""
        if message.image is not None:
            return message.image
        if message.image_ref is None:
            raise LookupError(f"{message.job_id}: the answer carries no image")
        (data,) = await self.blobs.read([message.image_ref], take=release and self.tenant is None)
        if data is None:
            raise LookupError(f"{message.job_id}: the image expired or was lost from the image store")
        return data

    async def enqueue(
        self,
        prompt: str,
        *,
        job_id: str | None = None,
        slo_ms: float | None = None,
        seed: int | None = None,
        image_format: str = "png",
        image_quality: int = 90,
        reply: bool = True,
        reply_to: str | None = None,
        partials: bool = False,
        cascade: str | None = None,
        prompt_index: int | None = None,
        image_ref: bool = False,
        negative_prompt: str | None = None,
        progress: bool = False,
    ) -> str:
        """Put one job on the jobs stream; returns its id. Results arrive via ``results()``/``submit``,
        or on ``reply_to`` (a stream named ``<ns>:reply:...``) when given.  ``prompt_index``: the
        prompt's line in the prompt file (trace replays).  ``image_ref``: answer with a reference to the
        stored image (read it with ``image()``)."""
        reply_to = reply_to or (self.reply_stream if reply else None)
        job_id = job_id or new_job_id()
        ours = reply_to == self.reply_stream
        job = Job(
            job_id=job_id,
            prompt=prompt,
            slo_ms=slo_ms,
            seed=seed,
            image_format=image_format,
            image_quality=image_quality,
            reply_to=reply_to,
            submitted_ms=time.time() * 1000,
            cascade=cascade,
            partials=partials,
            prompt_index=prompt_index,
            image_ref=image_ref,
            # A retry of an id still owed keeps its token: the same request, so the router serves it once.
            reply_token=(self._owed.get(job_id) or secrets.token_hex(16)) if ours else None,
            negative_prompt=negative_prompt,
            progress=progress,
        )
        if ours:
            assert job.reply_token is not None
            self._owed[job.job_id] = job.reply_token
            self._start_reader()
        payload, backoff = job.encode(), Backoff(base=0.2, cap=2.0)
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                await add(self.redis, self.jobs_stream, payload)
                break
            except TRANSIENT_ERRORS:
                # Redis may have taken the entry before the connection broke: the same bytes again are a
                # retry of the same request, which the router answers once.
                if attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                await backoff.wait()
        return job.job_id

    async def submit(
        self,
        prompt: str,
        *,
        timeout: float = 120.0,
        on_light: Callable[[LightReady], None] | None = None,
        on_event: Callable[[Admitted | Progress], None] | None = None,
        **kwargs: Any,
    ) -> FinalResult:
        """Enqueue and wait for the result; ``on_light`` is called with the light image first
        when the job goes on to the heavy model, ``on_event`` with its admission and progress."""
        self._start_reader()
        job_id = kwargs.pop("job_id", None) or new_job_id()
        future: asyncio.Future[FinalResult] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        if on_light:
            self._on_light[job_id] = on_light
        if on_event:
            self._on_event[job_id] = on_event
        try:
            await self.enqueue(
                prompt, job_id=job_id, partials=on_light is not None, progress=on_event is not None, **kwargs
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(job_id, None)
            self._on_light.pop(job_id, None)
            self._on_event.pop(job_id, None)

    async def cancel(self, *job_ids: str, ttl_s: int = 3600) -> None:
        """Cancel jobs: one that has not started on a GPU is never run and ends with a
        ``cancelled`` result; one already running finishes as usual. A tenant asks the router (a
        ``cancel`` entry on its stream), which sets the flag for a job it admitted."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                if self.tenant is None:
                    pipe.set(self.keys.cancel(job_id), 1, ex=ttl_s)
                else:
                    pipe.xadd(self.jobs_stream, {ENTRY_FIELD: Cancel(job_id=job_id).encode()})
            await pipe.execute()

    async def submit_many(self, prompts: list[str], *, timeout: float = 600.0, **kwargs: Any) -> list[FinalResult]:
        return list(await asyncio.gather(*(self.submit(p, timeout=timeout, **kwargs) for p in prompts)))

    async def results(self) -> AsyncIterator[FinalResult]:
        """Results of jobs nobody is awaiting with ``submit`` (what ``enqueue`` sent), as they arrive."""
        if self._unclaimed is None:
            raise RuntimeError("this client keeps no unclaimed results (max_unclaimed=0)")
        self._start_reader()
        while True:
            yield await self._unclaimed.get()

    async def wait_result(self, job_id: str, timeout: float = 120.0) -> FinalResult | None:
        """For jobs pushed without reply_to: BLPOP the job's result list (a tenant: XREAD its default
        reply stream); None after ``timeout``."""
        deadline = time.monotonic() + timeout
        if self.tenant is not None:
            stream = default_reply(self.keys, self.tenant, job_id)
            while (left := deadline - time.monotonic()) > 0:
                read: Any = await self.redis.xread({stream: "0-0"}, count=1, block=int(min(left, BLPOP_PIECE_S) * 1000))
                for _stream, items in read or []:
                    return FinalResult.decode(items[0][1][ENTRY_FIELD])
            return None
        while (left := deadline - time.monotonic()) > 0:
            reply: Any = await self.redis.blpop([self.keys.result(job_id)], timeout=min(left, BLPOP_PIECE_S))
            if reply:
                return FinalResult.decode(reply[1])
        return None

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        last_id = "0-0"
        while not self._closing:
            try:
                reply: Any = await self.reader_redis.xread({self.reply_stream: last_id}, count=512, block=READ_BLOCK_MS)
            except TRANSIENT_ERRORS:
                await asyncio.sleep(0.5)
                continue
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    last_id = entry_id
                    try:
                        body = unpack(fields[ENTRY_FIELD])
                        kind = EVENT_TYPES.get(body.get("type", ""))
                        if kind is not None:  # before the answer: the light image, admission, progress
                            self._event(kind.from_dict(body))
                            continue
                        result = FinalResult.from_dict(body)
                    except (MessageError, KeyError):
                        continue
                    self._accept(result)

    def _event(self, event: object) -> None:
        """A LightReady, Admitted or Progress on our reply stream: passed on only with the token of a job
        still owed (whoever can write the stream but not read the jobs stream cannot forge one)."""
        job_id, token = getattr(event, "job_id", ""), getattr(event, "reply_token", None)
        owed = self._owed.get(job_id)
        if owed is None or not secrets.compare_digest(token or "", owed):
            return
        if isinstance(event, LightReady):
            on_light = self._on_light.get(event.job_id)
            if on_light:
                on_light(event)
        elif isinstance(event, (Admitted, Progress)):
            on_event = self._on_event.get(event.job_id)
            if on_event:
                on_event(event)

    def _accept(self, result: FinalResult) -> None:
        owed = self._owed.get(result.job_id)
        if owed is None or not secrets.compare_digest(result.reply_token or "", owed):
            self.rejected += 1
            log.warning(
                "dropped an answer this client does not owe (forged or a second one)",
                extra={"job_id": result.job_id[:128]},
            )
            return
        del self._owed[result.job_id]
        future = self._waiting.get(result.job_id)
        if future is not None and not future.done():
            future.set_result(result)
            return
        if self._unclaimed is None:  # its caller gave up (hung up, timed out): nobody will read it
            self.dropped += 1
            return
        if self._unclaimed.full():
            self._unclaimed.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("unclaimed results dropped: nobody reads results()", extra={"dropped": self.dropped})
        self._unclaimed.put_nowait(result)

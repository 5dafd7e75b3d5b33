"""Shared by the pipeline stages (router, workers, discriminator): turning a pulled batch
into decoded messages, anything undecodable or poisonous into an answer, finding the jobs
their clients cancelled, and the one batch cycle of the model stages (:func:`run_batch`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis

from common import metrics
from common.clock import CLOCK
from common.config import Keys
from common.messages import (
    E_INTERNAL,
    Completion,
    DeadLetter,
    ErrorCode,
    LightReason,
    MessageError,
    Role,
    RoutedJob,
    Status,
    unpack,
)
from common.streams import Entry, StreamConsumer

# The discriminator scores at most this many light images at once (its --batch; the simulator models it).
DISCRIMINATOR_BATCH = 32

M = TypeVar("M")
T = TypeVar("T")


async def cancelled_ids(r: aioredis.Redis, keys: Keys, job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` whose client cancelled them: one MGET per batch."""
    if not job_ids:
        return set()
    flags = await r.mget([keys.cancel(job_id) for job_id in job_ids])
    return {job_id for job_id, flag in zip(job_ids, flags, strict=False) if flag is not None}


def split_batch(
    entries: list[Entry],
    decode: Callable[[bytes], M],
    *,
    keys: Keys,
    stream: str,
    service: str,
    max_deliveries: int,
    job_of: Callable[[M], RoutedJob],
) -> tuple[list[tuple[Entry, M]], list[tuple[str, bytes]]]:
    """Returns (good [(entry, message)], outputs for the bad ones). A bad entry becomes an
    error completion when its job can be identified, else a dead letter; an entry that was
    delivered more than ``max_deliveries`` times (it crashed its consumers) is failed too."""
    good: list[tuple[Entry, M]] = []
    outputs: list[tuple[str, bytes]] = []
    for entry in entries:
        try:
            message = decode(entry.payload or b"")
        except MessageError as exc:
            metrics.ERRORS.labels(service, exc.code).inc()
            outputs.append(_undecodable(entry, exc, keys, stream))
            continue
        if entry.deliveries > max_deliveries:
            metrics.ERRORS.labels(service, E_INTERNAL).inc()
            outputs.append(
                (
                    keys.completions,
                    Completion.failure(
                        job_of(message), E_INTERNAL, f"gave up after {entry.deliveries} attempts"
                    ).encode(),
                )
            )
            continue
        good.append((entry, message))
    return good, outputs


def _undecodable(entry: Entry, exc: MessageError, keys: Keys, stream: str) -> tuple[str, bytes]:
    body: dict[str, Any] = {}
    try:
        body = unpack(entry.payload or b"")
    except MessageError:
        pass
    nested = body.get("job")
    job: dict[str, Any] = nested if isinstance(nested, dict) else body
    job_id, arrival, deadline = job.get("job_id"), job.get("arrival_ms"), job.get("deadline_ms")
    if isinstance(job_id, str) and isinstance(arrival, (int, float)) and isinstance(deadline, (int, float)):
        reply_to = job.get("reply_to") if isinstance(job.get("reply_to"), str) else None
        token = job.get("reply_token") if isinstance(job.get("reply_token"), str) else None
        completion = Completion(
            job_id=job_id,
            arrival_ms=float(arrival),
            deadline_ms=float(deadline),
            reply_to=reply_to,
            reply_token=token,
            status=Status.ERROR,
            error_code=exc.code,
            error_message=str(exc),
        )
        return keys.completions, completion.encode()
    return keys.dead_letters, DeadLetter(
        stream=stream, entry_id=entry.id, error_code=exc.code, error_message=str(exc), raw=(entry.payload or b"")[:4096]
    ).encode()


def one_per_input(outputs: Iterable[T], inputs: list[Any], what: str) -> list[T]:
    """The batch invariant: a model returns exactly one output per input.  Anything else fails the
    whole batch (each job answered ``model_error``) rather than silently dropping the unmatched jobs
    while their entries are acked."""
    outputs = list(outputs)
    if len(outputs) != len(inputs):
        raise RuntimeError(f"{what} returned {len(outputs)} outputs for a batch of {len(inputs)}")
    return outputs


Outputs = list[tuple[str, bytes]]  # (stream, payload) written with the batch's ack


def light_answer(job: RoutedJob, model: str, worker_id: str, reason: LightReason) -> Completion:
    """A job sent on to the heavy model answered with its light image instead (it carries it, or its
    reference): the deadline rule's answer, from the heavy worker or from the discriminator's exchange."""
    return Completion.answer(
        job,
        job.light_ref or job.light_image or b"",
        image_format=job.light_image_format or "png",
        answered_by=Role.LIGHT,
        model=model,
        confidence=job.confidence,
        worker_id=worker_id,
        light_reason=reason,
    )


def failures(keys: Keys, jobs: Iterable[RoutedJob], code: ErrorCode, message: str, worker_id: str) -> Outputs:
    """Each job answered with the same error (a model that failed, an image store out of reach)."""
    return [(keys.completions, Completion.failure(j, code, message, worker_id).encode()) for j in jobs]


@dataclass(kw_only=True)
class Processed:
    """What a stage made of a batch: the outputs, and more for the same transaction (``extra``).  ``tail``: the
    rest of its outputs, still to make once the model is free (a worker's image encoding and storing), which
    :func:`run_batch` may overlap with the stage's next batch (``overlap``)."""

    outputs: Outputs = field(default_factory=list)
    extra: Callable[[Any], None] | None = None  # (a redis-py pipeline) -> None
    tail: Callable[[], Awaitable[Outputs]] | None = None


class Overlap:
    """The tail of a stage's last batch (:class:`Processed`), running while the model runs the next one: the
    CPU's share of a batch (PNG encoding 40-57 ms an image, common/data/h100/README.md) then costs the GPU no
    time.  One tail at a time besides the newest: a tail slower than the model holds the next batch back
    instead of piling images up.  A failed tail raises from the next :meth:`start` or :meth:`drain`; its
    entries, never acked, are the consumer's to take up again first (StreamConsumer.undefer)."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def start(self, tail: Callable[[], Awaitable[None]]) -> None:
        """Start ``tail``, then wait for the one before it."""
        previous, self._task = self._task, asyncio.ensure_future(tail())
        if previous is not None:
            await previous

    async def drain(self) -> None:
        """Wait for the running tail (before a worker stops)."""
        task, self._task = self._task, None
        if task is not None:
            await task


async def run_batch(
    consumer: StreamConsumer,
    count: int,
    decode: Callable[[bytes], M],
    process: Callable[[list[Entry], list[M]], Awaitable[Processed]],
    *,
    keys: Keys,
    service: str,
    job_of: Callable[[M], RoutedJob],
    block_ms: int = 250,
    fill_until: Callable[[list[M]], Awaitable[float]] | None = None,
    overlap: Overlap | None = None,
) -> list[M]:
    """One cycle of a model stage (workers, discriminator): read up to ``count`` entries, decode them (the
    bad and the poisonous answered, :func:`split_batch`), ``process`` the rest, then write every output and
    ack the batch in one transaction. Returns the messages processed.

    ``fill_until``: given the messages of a short read, until when (the deployment's clock, ``CLOCK.now_ms()``)
    to wait for more to fill the batch (the heavy worker's batch fill, common/routing.fill_until_ms).
    ``overlap``: a batch's tail (:class:`Processed`), its write and its ack go on while the next cycle runs."""
    entries = await consumer.read(max(1, count), block_ms=block_ms)
    if not entries:
        return []
    reclaimed = sum(e.deliveries > 1 for e in entries)
    if reclaimed:
        metrics.RECLAIMED.labels(service).inc(reclaimed)

    def decoded(read: list[Entry]) -> tuple[list[M], Outputs]:
        good, answered = split_batch(
            read,
            decode,
            keys=keys,
            stream=consumer.stream,
            service=service,
            max_deliveries=consumer.max_deliveries,
            job_of=job_of,
        )
        return [message for _entry, message in good], answered

    messages, outputs = decoded(entries)
    if fill_until is not None and messages and len(entries) < count:
        until = await fill_until(messages)
        while len(entries) < count and (wait_ms := int(until - CLOCK.now_ms())) > 0:
            more = await consumer.read_more(count - len(entries), wait_ms)
            entries += more
            more_messages, more_outputs = decoded(more)
            messages += more_messages
            outputs += more_outputs
    done = await process(entries, messages) if messages else Processed()
    ids, tail = [e.id for e in entries], done.tail

    async def finish() -> None:
        rest = await tail() if tail is not None else []
        await consumer.write_and_ack(ids, outputs + done.outputs + rest, done.extra)

    if tail is None or overlap is None:
        await finish()
        return messages
    consumer.defer(ids)

    async def finish_deferred() -> None:
        failed = True
        try:
            await finish()
            failed = False
        finally:
            consumer.undefer(ids, failed=failed)

    await overlap.start(finish_deferred)
    return messages

"""Shared by the pipeline stages (router, workers, discriminator): turning a pulled batch
into decoded messages, anything undecodable or poisonous into an answer, and finding
the jobs their clients cancelled."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from common import metrics
from common.config import Keys
from common.messages import E_INTERNAL, Completion, DeadLetter, MessageError, RoutedJob, Status, unpack
from common.streams import Entry

# The discriminator scores at most this many light images at once (its --batch; the simulator models it).
DISCRIMINATOR_BATCH = 32

M = TypeVar("M")
T = TypeVar("T")


async def cancelled_ids(r: aioredis.Redis, keys: Keys, job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` whose client cancelled them: one MGET per batch."""
    if not job_ids:
        return set()
    flags = await r.mget([keys.cancel(job_id) for job_id in job_ids])
    return {job_id for job_id, flag in zip(job_ids, flags) if flag is not None}


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

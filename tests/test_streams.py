"""The one Redis-streams helper, against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from common.config import Keys, RedisSettings
from common.messages import ENTRY_FIELD
from common.stage import Overlap, Processed, run_batch
from common.streams import (
    StreamConsumer,
    SubmissionReader,
    add,
    backlog,
    connect,
    ensure_group,
    run_forever,
    trim_processed,
)


def _run(coro):
    return asyncio.run(coro)


async def _client(url: str) -> aioredis.Redis:
    return connect(RedisSettings(redis_url=url))


async def _stream_of(url: str, stream: str, payloads: list[str]) -> tuple[aioredis.Redis, StreamConsumer]:
    """A stream holding ``payloads`` and a consumer "w" of its group "workers"."""
    r = await _client(url)
    c = StreamConsumer(r, stream, "workers", "w")
    await c.ensure_group()
    for payload in payloads:
        await add(r, stream, payload.encode())
    return r, c


def test_group_creation_is_idempotent_and_reads_in_batches(redis_server):
    async def go():
        r = await _client(redis_server.url)
        c = StreamConsumer(r, "s", "g", "c1")
        await c.ensure_group()
        await c.ensure_group()  # BUSYGROUP is not an error
        for i in range(10):
            await add(r, "s", f"p{i}".encode())
        first = await c.read(4, block_ms=100)
        assert [e.payload for e in first] == [b"p0", b"p1", b"p2", b"p3"]
        assert await backlog(r, "s", "g") == 10  # 4 delivered but not acked, 6 undelivered
        # A batch read again before it was acked (its step failed) is handed out again, first.
        assert [e.id for e in await c.read(100, block_ms=100)] == [e.id for e in first]
        await c.ack([e.id for e in first])
        second = await c.read(100, block_ms=100)
        assert len(second) == 6
        await c.ack([e.id for e in second])
        assert await backlog(r, "s", "g") == 0
        await r.aclose()

    _run(go())


def test_entries_of_a_dead_consumer_are_reclaimed_after_idle_time(redis_server):
    async def go():
        r = await _client(redis_server.url)
        dead = StreamConsumer(r, "s", "g", "dead", reclaim_idle_ms=200)
        live = StreamConsumer(r, "s", "g", "live", reclaim_idle_ms=200)
        await dead.ensure_group()
        for i in range(3):
            await add(r, "s", f"p{i}".encode())
        taken = await dead.read(3, block_ms=100)
        assert len(taken) == 3
        assert await live.read(3, block_ms=50) == []  # not idle long enough yet
        await asyncio.sleep(0.3)
        reclaimed = await live.read(3, block_ms=50)
        assert [e.id for e in reclaimed] == [e.id for e in taken]
        assert all(e.deliveries == 2 for e in reclaimed)
        await r.aclose()

    _run(go())


def test_keep_claimed_protects_a_long_batch_of_a_live_consumer(redis_server):
    async def go():
        r = await _client(redis_server.url)
        busy = StreamConsumer(r, "s", "g", "busy", reclaim_idle_ms=300)
        other = StreamConsumer(r, "s", "g", "other", reclaim_idle_ms=300)
        await busy.ensure_group()
        await add(r, "s", b"long job")
        entries = await busy.read(1)
        async with busy.keep_claimed([e.id for e in entries]):
            await asyncio.sleep(1.0)  # three reclaim periods
            assert await other.read(1, block_ms=50) == []
        await r.aclose()

    _run(go())


def test_a_batch_finished_in_the_background_is_not_read_again_unless_its_finish_failed(redis_server):
    """A worker encodes and writes one batch while its model runs the next (run_batch's overlap): the read of
    the next batch is no retry of the deferred one; a deferred batch that failed before its ack is taken up
    again first, and a deferred batch's ack does not clear the batch read since."""

    async def go():
        r, c = await _stream_of(redis_server.url, "s", [f"p{i}" for i in range(6)])
        first = await c.read(2, block_ms=100)
        c.defer([e.id for e in first])
        second = await c.read(2, block_ms=100)
        assert [e.payload for e in second] == [b"p2", b"p3"]
        await c.write_and_ack([e.id for e in first], [])  # the first batch's tail acks it
        c.undefer([e.id for e in first], failed=False)
        # the second was never acked (its step failed): read again, first
        assert [e.id for e in await c.read(2, block_ms=100)] == [e.id for e in second]
        c.defer([e.id for e in second])
        third = await c.read(2, block_ms=100)
        assert [e.payload for e in third] == [b"p4", b"p5"]
        c.defer([e.id for e in third])
        c.undefer([e.id for e in second], failed=True)  # its tail failed: ours again, the third still deferred
        assert [e.id for e in await c.read(4, block_ms=100)] == [e.id for e in second]
        await r.aclose()

    _run(go())


def test_a_model_stage_encodes_one_batch_while_it_runs_the_next(redis_server):
    """run_batch with an overlap: a batch's tail (a worker's encoding and writes) goes on while the next batch
    runs; each batch is written and acked once, and a tail slower than the model holds the batch after next."""
    events: list[str] = []

    async def process(_entries, messages):
        events.append(f"run {messages[0]}")
        await asyncio.sleep(0.05)  # the model

        async def tail():
            events.append(f"tail {messages[0]} starts")
            await asyncio.sleep(0.2)  # the encoding, slower than the model
            events.append(f"tail {messages[0]} ends")
            return [("out", f"answer {messages[0]}".encode())]

        return Processed(tail=tail)

    async def go():
        r, c = await _stream_of(redis_server.url, "in", [f"b{i}" for i in range(3)])
        overlap = Overlap()
        for _ in range(3):
            await run_batch(c, 1, bytes.decode, process, keys=Keys("t"), service="worker", job_of=None, overlap=overlap)
        await overlap.drain()
        answers = [fields[ENTRY_FIELD] for _id, fields in await r.xrange("out")]
        assert sorted(answers) == [b"answer b0", b"answer b1", b"answer b2"]
        assert await backlog(r, "in", "workers") == 0
        await r.aclose()

    _run(go())
    # b1 runs while b0's tail goes on; b2 waits for b0's tail (one tail besides the newest), not for b1's
    assert events.index("run b1") < events.index("tail b0 ends")
    assert events.index("tail b0 ends") < events.index("run b2") < events.index("tail b1 ends")


def test_write_and_ack_is_atomic_and_trimming_keeps_unprocessed_entries(redis_server):
    async def go():
        r = await _client(redis_server.url)
        c = StreamConsumer(r, "in", "g", "c")
        await c.ensure_group()
        await ensure_group(r, "in", "slow-group")  # a second group that has read nothing
        ids = [await add(r, "in", f"p{i}".encode()) for i in range(6)]
        entries = await c.read(6)
        await c.write_and_ack([e.id for e in entries[:4]], [("out", b"o") for _ in range(4)])
        assert await r.xlen("out") == 4
        # slow-group has read nothing: nothing may go.
        assert await trim_processed(r, "in") == 0
        slow = StreamConsumer(r, "in", "slow-group", "s")
        got = await slow.read(6)
        await slow.ack([e.id for e in got])
        # g still holds p4, p5 un-acked: only p0..p3 may go.
        assert await trim_processed(r, "in") == 4
        remaining = [i.decode() for i, _ in await r.xrange("in")]
        assert remaining == ids[4:]
        await c.ack([e.id for e in entries[4:]])
        assert await trim_processed(r, "in") == 2
        assert await trim_processed(r, "no-such-stream") == 0
        await r.aclose()

    _run(go())


def test_missing_group_after_a_redis_flush_is_recreated(redis_server):
    async def go():
        r = await _client(redis_server.url)
        c = StreamConsumer(r, "s", "g", "c")
        await c.ensure_group()
        await r.flushall()  # what a restart without persistence looks like
        assert await c.read(1, block_ms=50) == []
        await add(r, "s", b"after")
        assert [e.payload for e in await c.read(1, block_ms=100)] == [b"after"]
        await r.aclose()

    _run(go())


def test_filling_a_batch_reads_only_new_entries_and_survives_a_lost_group(redis_server):
    """A heavy worker filling a short batch (read_more) gets new entries, never its own pending ones again; if
    Redis lost the group meanwhile it runs what it has rather than fail the batch."""

    async def go():
        r = await _client(redis_server.url)
        c = StreamConsumer(r, "fill", "g", "c")
        await c.ensure_group()
        await add(r, "fill", b"first")
        assert [e.payload for e in await c.read(2, block_ms=50)] == [b"first"]
        await add(r, "fill", b"second")
        assert [e.payload for e in await c.read_more(1, block_ms=50)] == [b"second"]
        assert await c.read_more(1, block_ms=50) == []  # nothing new: the pending two are not read again
        await r.delete("fill")  # the group goes with the stream
        assert await c.read_more(1, block_ms=50) == []
        await r.aclose()

    _run(go())


def test_password_is_required_and_used(tmp_path):
    from common.localstack import RedisServer

    server = RedisServer(password="s3cret").start()
    try:

        async def go():
            settings = RedisSettings(redis_url=f"redis://127.0.0.1:{server.port}/0", redis_password="s3cret")
            r = connect(settings)
            assert await r.ping()
            await r.aclose()
            anonymous = connect(RedisSettings(redis_url=f"redis://127.0.0.1:{server.port}/0"))
            try:
                await anonymous.ping()
                raise AssertionError("unauthenticated ping succeeded")
            except Exception as exc:  # redis-py raises AuthenticationError
                assert "auth" in type(exc).__name__.lower() or "NOAUTH" in str(exc)
            await anonymous.aclose()

        _run(go())
    finally:
        server.stop()


def test_a_poison_entry_is_counted_across_restarts_under_the_same_name(redis_server):
    """A consumer that crashes on an entry and comes back under the same name (compose's fixed
    instance ids) sees Redis's own delivery counter, so max_deliveries fires."""

    async def go():
        r = await _client(redis_server.url)
        await ensure_group(r, "s", "g")
        await add(r, "s", b"poison")
        seen = []
        for _restart in range(5):
            c = StreamConsumer(r, "s", "g", "worker-1", max_deliveries=3)  # a fresh process, same name
            (entry,) = await c.read(1, block_ms=100)
            seen.append(entry.deliveries)
            # ...and it crashes before acking
        assert seen == [1, 2, 3, 4, 5]
        await r.aclose()

    _run(go())


def test_trim_survives_a_pending_list_that_empties_between_its_two_reads(redis_server):
    """XINFO GROUPS says 'pending: 1', the entry is acked, then XPENDING finds nothing."""

    async def go():
        taken: list[str] = []

        class AckBetween(aioredis.Redis):
            async def xpending(self, name, groupname):
                await self.xack(name, groupname, *taken)
                return await super().xpending(name, groupname)

        r = AckBetween.from_pool(connect(RedisSettings(redis_url=redis_server.url)).connection_pool)
        c = StreamConsumer(r, "s", "g", "c1")
        await c.ensure_group()
        await add(r, "s", b"p0")
        taken += [e.id for e in await c.read(1, block_ms=100)]
        removed = await trim_processed(r, "s")
        await r.aclose()
        return removed

    assert _run(go()) == 1


def test_trim_after_an_entry_at_the_last_possible_id(redis_server):
    """Anyone who may XADD with an explicit id can put an entry at the maximum id; once processed, trimming
    that stream must still work (it computed an id past the maximum, which Redis refused, and the
    router's housekeeping failed on every round)."""
    last = f"{2**64 - 1}-{2**64 - 1}"

    async def go():
        r = await _client(redis_server.url)
        c = StreamConsumer(r, "s", "g", "c1")
        await c.ensure_group()
        await add(r, "s", b"a")
        await r.xadd("s", {"m": b"b"}, id=f"{2**64 - 1}-0")
        await r.xadd("s", {"m": b"last"}, id=last)
        got = await c.read(10, block_ms=100)
        await c.ack([e.id for e in got])
        removed = await trim_processed(r, "s")
        remaining = [entry_id.decode() for entry_id, _ in await r.xrange("s")]
        await r.aclose()
        return [e.id for e in got], removed, remaining

    ids, removed, remaining = _run(go())
    assert ids[-1] == last
    assert removed == 2 and remaining == [last]


def test_only_a_missing_stream_or_group_reads_as_an_empty_queue(redis_server):
    """A user the ACL does not let read a queue gets an error, not a backlog of 0 (which would
    keep admission control from ever tripping); a stream or group that does not exist is empty."""
    from redis.exceptions import NoPermissionError

    redis_server.cli("ACL", "SETUSER", "narrow", "on", ">pw", "~diffserve:jobs", "+@all")

    async def go():
        r = await _client(redis_server.url)
        await ensure_group(r, "diffserve:queue:light", "workers")
        await add(r, "diffserve:queue:light", b"queued")
        narrow = connect(RedisSettings(redis_url=redis_server.url, redis_username="narrow", redis_password="pw"))
        try:
            with pytest.raises(NoPermissionError):
                await backlog(narrow, "diffserve:queue:light", "workers")
            with pytest.raises(NoPermissionError):
                await trim_processed(narrow, "diffserve:queue:light")
            assert await backlog(r, "diffserve:queue:light", "workers") == 1
            assert await backlog(narrow, "diffserve:jobs", "router") == 0  # allowed, not created yet
            assert await backlog(r, "diffserve:queue:light", "no-such-group") == 0
            assert await trim_processed(narrow, "diffserve:jobs") == 0
        finally:
            await narrow.aclose()
            await r.aclose()

    _run(go())


def test_a_loop_step_that_raises_a_non_transient_error_is_logged_and_the_loop_goes_on(redis_server, caplog):
    """What the router's housekeeping does when a queue read is refused (NOPERM): log it, carry on."""
    redis_server.cli("ACL", "SETUSER", "narrow", "on", ">pw", "~diffserve:jobs", "+@all")
    steps = []

    async def go():
        narrow = connect(RedisSettings(redis_url=redis_server.url, redis_username="narrow", redis_password="pw"))
        stop = asyncio.Event()

        async def step():
            steps.append(1)
            if len(steps) == 2:
                stop.set()
                return
            await backlog(narrow, "diffserve:queue:light", "workers")

        try:
            await asyncio.wait_for(run_forever("housekeeping", step, stop), 10)
        finally:
            await narrow.aclose()

    with caplog.at_level("ERROR", logger="common.streams"):
        _run(go())
    assert len(steps) == 2
    failures = [rec for rec in caplog.records if rec.getMessage() == "loop step failed"]
    assert len(failures) == 1 and "NoPermissionError" in (failures[0].exc_text or "")


def test_the_submission_reader_gets_stubs_for_big_entries_on_every_read_path(redis_server):
    """New entries, its own pending ones after a restart and ones reclaimed from a dead consumer:
    an entry over the limit comes back as a stub with its size, job id and reply stream only, with
    Redis's delivery counter as for any entry; small entries come back whole."""
    import msgpack

    big = msgpack.packb({"job_id": "big-1", "prompt": "x" * 100_000, "reply_to": "diffserve:reply:r1"})

    def reader(r, name, **kwargs):
        reader = SubmissionReader(r, "g", name, max_entry_bytes=1000, **kwargs)
        reader.set_streams(["s"])
        return reader

    async def go():
        r = await _client(redis_server.url)
        await ensure_group(r, "s", "g")
        await add(r, "s", b"small")
        await add(r, "s", big)
        await r.xadd("s", {"job_id": "plain-1", "prompt": "y" * 100_000})
        await r.xadd("s", {"job_id": "bad id!", "prompt": "y" * 100_000})
        fresh = await reader(r, "c1", reclaim_idle_ms=100).read(10, block_ms=100)
        again = await reader(r, "c1").read(10)  # restarted, same name
        await asyncio.sleep(0.2)
        reclaimed = await reader(r, "c2", reclaim_idle_ms=100).read(10)
        await r.aclose()
        return fresh, again, reclaimed

    fresh, again, reclaimed = _run(go())
    for batch, deliveries in ((fresh, 1), (again, 2), (reclaimed, 3)):
        assert [e.oversized > 0 for e in batch] == [False, True, True, True]
        assert batch[0].payload == b"small" and {e.stream for e in batch} == {"s"}
        assert batch[1].oversized == len(big) and batch[1].payload is None
        assert batch[1].fields == {b"job_id": b"big-1", b"reply_to": b"diffserve:reply:r1"}
        assert batch[2].fields == {b"job_id": b"plain-1"} and batch[3].fields == {}
        assert [e.deliveries for e in batch] == [deliveries] * 4


def test_the_submission_reader_waits_for_new_entries_and_acks_as_usual(redis_server):
    import msgpack

    async def go():
        r = await _client(redis_server.url)
        c = SubmissionReader(r, "g", "c1", max_entry_bytes=1000)
        for stream in ("s", "t"):
            await c.ensure_group(stream)
        c.set_streams(["s", "t"])
        assert await c.read(10, block_ms=50) == []

        async def later():
            await asyncio.sleep(0.1)
            for i in range(3):
                await add(r, "t", f"p{i}".encode())

        writer = asyncio.create_task(later())
        first = await c.read(10, block_ms=2000)  # woken by the first entry
        await writer
        await c.write_and_ack(first, [])
        rest = await c.read(10, block_ms=50)
        await c.write_and_ack(rest, [])
        assert [e.payload for e in first + rest] == [b"p0", b"p1", b"p2"]
        assert await backlog(r, "t", "g") == 0

        async def big_later():  # the one entry an idle wait reads whole is cut to a stub all the same
            await asyncio.sleep(0.1)
            await add(r, "s", msgpack.packb({"job_id": "big-2", "prompt": "x" * 5000}))

        writer = asyncio.create_task(big_later())
        (big,) = await c.read(10, block_ms=2000)
        await writer
        assert (big.oversized, big.payload, big.fields, big.stream) == (5024, None, {b"job_id": b"big-2"}, "s")
        await r.aclose()

    _run(go())


def test_the_submission_reader_reads_many_streams_fairly_on_one_connection(redis_server):
    """A flooded stream and 300 quiet ones: one read takes each quiet stream's entry before more of
    the flood, and the reader uses one connection whatever the number of streams."""

    async def go():
        r = await _client(redis_server.url)
        streams = ["flood"] + [f"quiet-{i}" for i in range(300)]
        c = SubmissionReader(r, "g", "c1", max_entry_bytes=1000, per_stream=4)
        for stream in streams:
            await c.ensure_group(stream)
        c.set_streams(streams)
        async with r.pipeline(transaction=False) as pipe:
            for i in range(2000):
                pipe.xadd("flood", {"m": b"f%d" % i})
            for stream in streams[1:]:
                pipe.xadd(stream, {"m": stream.encode()})
            await pipe.execute()
        batch = await c.read(400)
        connections = len(r.connection_pool._in_use_connections) + len(r.connection_pool._available_connections)
        await r.aclose()
        return batch, connections

    batch, connections = _run(go())
    per_stream = {}
    for e in batch:
        per_stream[e.stream] = per_stream.get(e.stream, 0) + 1
    assert len(batch) == 400
    assert all(per_stream.get(f"quiet-{i}") == 1 for i in range(300))
    assert per_stream["flood"] == 100  # 4 in the fair pass, then the rest of the read's room
    assert connections == 1

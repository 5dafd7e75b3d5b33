"""The Python client against a real redis-server: long waits, bounded memory, forged replies."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.client import Client
from common.messages import FinalResult
from common.streams import add


@pytest.mark.slow
def test_wait_result_waits_longer_than_the_socket_timeout(redis_server):
    """No result within the timeout: None after the timeout, not redis-py's socket TimeoutError."""

    async def go():
        async with Client(redis_url=redis_server.url) as client:
            start = time.monotonic()
            result = await client.wait_result("never-1", timeout=7)
            return result, time.monotonic() - start

    result, waited = asyncio.run(go())
    assert result is None and 6.5 < waited < 9


def test_unclaimed_results_are_bounded_and_forged_ones_are_dropped(redis_server):
    """Answers must carry the job's reply token: a forged one (for an id the client waits for, arriving
    before the real answer; or for an id it never sent; or a second one) is dropped and counted, and
    the real answer is still taken. Before tokens the first answer for an owed id won, forged or not."""

    async def go():
        async with Client(redis_url=redis_server.url, max_unclaimed=100) as client:
            ids = [await client.enqueue("a prompt", job_id=f"j{i}") for i in range(300)]
            tokens = dict(client._owed)
            await add(client.redis, client.reply_stream, FinalResult(job_id="j0", status="error").encode())
            await add(
                client.redis,
                client.reply_stream,
                FinalResult(job_id="j0", status="error", reply_token="0" * 32).encode(),
            )
            for job_id in ids:
                real = FinalResult(job_id=job_id, status="ok", reply_token=tokens[job_id])
                await add(client.redis, client.reply_stream, real.encode())
            await add(client.redis, client.reply_stream, FinalResult(job_id="forged-1", status="ok").encode())
            second = FinalResult(job_id="j299", status="ok", reply_token=tokens["j299"])
            await add(client.redis, client.reply_stream, second.encode())  # a second answer, token and all
            deadline = time.monotonic() + 10
            while client.rejected < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            kept = [client._unclaimed.get_nowait() for _ in range(client._unclaimed.qsize())]
            return kept, client.dropped, client.rejected

    kept, dropped, rejected = asyncio.run(go())
    assert [r.job_id for r in kept] == [f"j{i}" for i in range(200, 300)]  # the oldest were dropped
    assert {r.status for r in kept} == {"ok"}
    assert dropped == 200 and rejected == 4


def test_a_client_that_keeps_no_unclaimed_results_drops_answers_whose_caller_gave_up(redis_server):
    """What the gateway runs (issue 24.3): an answer that arrives after its caller hung up or timed out is
    dropped on arrival, so abandoned answers (images included) cannot pile up in the process."""

    async def go():
        async with Client(redis_url=redis_server.url, max_unclaimed=0) as client:
            with pytest.raises(asyncio.TimeoutError):  # no router here: nobody answers in time
                await client.submit("a prompt", job_id="gave-up", timeout=0.2)
            token = client._owed["gave-up"]  # the genuine late answer carries the job's reply token
            late = FinalResult(job_id="gave-up", status="ok", image=b"\x89PNG" + b"\0" * 100_000, reply_token=token)
            await add(client.redis, client.reply_stream, late.encode())
            deadline = time.monotonic() + 10
            while client.dropped < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            held = client._unclaimed.qsize() if client._unclaimed is not None else 0
            return client.dropped, client.rejected, held

    dropped, rejected, held = asyncio.run(go())
    assert (dropped, rejected, held) == (1, 0, 0)

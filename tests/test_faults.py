"""Faults against real processes and a real redis-server: crashes, a Redis restart, overload.
Every test asserts that no accepted job is lost or answered twice."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import pytest
import redis

from common.client import Client
from common.config import Keys
from common.localstack import LocalStack, RedisServer, StackSpec
from common.messages import RoutedJob
from common.profiles import load_prompts

KEYS = Keys()
FAST_RECLAIM = {"DIFFSERVE_RECLAIM_IDLE_MS": "1000"}


async def _run_with_fault(redis_url: str, prompts: list[str], fault, *, rate: float = 100.0, fault_after: int = 10):
    """Submit prompts at ``rate``; call ``fault()`` (in a thread) after ``fault_after`` were sent;
    return the results and the number of entries delivered to the reply stream."""
    async with Client(redis_url=redis_url) as client:
        tasks = []
        fault_thread = None
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(client.submit(prompt, timeout=180)))
            if i == fault_after:
                fault_thread = threading.Thread(target=fault)
                fault_thread.start()
            await asyncio.sleep(1 / rate)
        results = await asyncio.gather(*tasks)
        while fault_thread.is_alive():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        return results, await client.redis.xlen(client.reply_stream)


def _check_exactly_once(prompts, results, delivered):
    assert delivered == len(prompts)
    assert len({r.job_id for r in results}) == len(prompts)
    assert [r.status for r in results] == ["ok"] * len(prompts), {r.error_code for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["discriminator", "router"])
def test_crashed_service_comes_back_and_nothing_is_lost(redis_server, tmp_path, victim):
    prompts = load_prompts()[:60]
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.01, env=FAST_RECLAIM)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        def crash_and_restart():
            stack.kill(victim)
            time.sleep(0.5)
            stack.restart(victim)

        results, delivered = asyncio.run(_run_with_fault(redis_server.url, prompts, crash_and_restart))
    _check_exactly_once(prompts, results, delivered)


@pytest.mark.slow
def test_redis_restart_with_aof_services_reconnect(tmp_path):
    """Redis goes away for ~1 s with jobs in flight; with AOF the streams, groups and pending
    lists survive, the services reconnect with backoff, and every accepted job is answered once."""
    server = RedisServer(appendonly=True).start()
    prompts = load_prompts()[:40]
    try:
        spec = StackSpec(redis_url=server.url, light_workers=1, heavy_workers=1, time_scale=0.02, env=FAST_RECLAIM)
        with LocalStack(spec, str(tmp_path / "logs")) as stack:

            async def scenario():
                async with Client(redis_url=server.url) as client:
                    tasks = [asyncio.create_task(client.submit(p, timeout=180)) for p in prompts]
                    await asyncio.sleep(0.05)
                    await asyncio.to_thread(server.restart, 1.0)
                    results = await asyncio.gather(*tasks)
                    await asyncio.sleep(0.5)
                    return results, await client.redis.xlen(client.reply_stream)

            results, delivered = asyncio.run(scenario())
            assert all(stack.alive().values())
            logs = "".join((tmp_path / "logs" / f"{n}.log").read_text() for n in stack.procs)
            assert "redis unavailable, retrying" in logs
        _check_exactly_once(prompts, results, delivered)
    finally:
        server.stop()


@pytest.mark.slow
def test_overload_is_refused_with_a_clear_error_and_the_queue_stays_bounded(redis_server, tmp_path):
    """One slow light worker and a backlog cap of 20: a burst of 300 gets 'overloaded' answers
    for what cannot be queued, the rest are served, and every job gets exactly one answer."""
    r = redis.Redis.from_url(redis_server.url)
    spec = StackSpec(
        redis_url=redis_server.url,
        light_workers=1,
        heavy_workers=1,
        time_scale=0.05,
        env={"DIFFSERVE_MAX_LIGHT_BACKLOG": "20", "DIFFSERVE_TRIM_INTERVAL_S": "0.2", "DIFFSERVE_BATCH": "1"},
    )
    prompts = load_prompts()[:300]
    with LocalStack(spec, str(tmp_path / "logs")):
        peak = {"light": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                info = {g["name"].decode(): g for g in r.xinfo_groups(KEYS.light_queue)}
                g = info.get("workers")
                if g:
                    peak["light"] = max(peak["light"], int(g["lag"] or 0) + int(g["pending"]))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results, delivered = asyncio.run(_run_with_fault(redis_server.url, prompts, lambda: None, rate=2000))
        finally:
            stop.set()
            watcher.join()
    assert delivered == len(prompts)
    refused = [r_ for r_ in results if r_.status != "ok"]
    assert refused and {r_.error_code for r_ in refused} == {"overloaded"}
    assert all(r_.retry_after_ms and r_.retry_after_ms > 0 for r_ in refused)
    served = sum(r_.status == "ok" for r_ in results)
    assert served >= 20
    # The router measures the backlog for each read batch and counts what it admits from it.
    assert peak["light"] <= 20, peak


@pytest.mark.slow
def test_chaos_script_loses_and_duplicates_nothing():
    from loadtest.chaos import main as chaos

    summary = chaos(["--duration", "8", "--rate", "15", "--kill-every", "2", "--drain-s", "60", "--image-kb", "16"])
    assert summary["sent"] > 50 and sum(summary["kills"].values()) >= 2
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["answered"] == summary["sent"]
    # 16 KiB images go through the image store (the queue Redis): what a kill leaves behind expires.
    assert summary["blobs_without_expiry"] == 0 and summary["blobs_left"] <= 32, summary


@pytest.mark.slow
def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(redis_server, tmp_path):
    """A heavy worker asked to stop mid-batch finishes and acks that batch, then exits 0."""
    r = redis.Redis.from_url(redis_server.url)
    env = {"DIFFSERVE_THRESHOLD": "1.01", "DIFFSERVE_BATCH": "2", "DIFFSERVE_LATE_POLICY": "heavy"}
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.5, env=env)
    prompts = load_prompts()[:4]
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                tasks = [asyncio.create_task(client.submit(p, timeout=120)) for p in prompts]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    held = [c for c in r.xinfo_consumers(KEYS.heavy_queue, "workers") if c["pending"] > 0]
                    if held:
                        break
                    await asyncio.sleep(0.02)
                assert held, "the heavy worker never took a batch"
                victim = held[0]["name"].decode()
                in_hand = [
                    p["message_id"] for p in r.xpending_range(KEYS.heavy_queue, "workers", "-", "+", 100, victim)
                ]
                jobs_in_hand = {RoutedJob.decode(r.xrange(KEYS.heavy_queue, i, i)[0][1][b"m"]).job_id for i in in_hand}
                stack.procs[victim].send_signal(15)
                code = await asyncio.to_thread(stack.procs[victim].wait, 30)
                left = r.xpending_range(KEYS.heavy_queue, "workers", "-", "+", 100, victim)
                await asyncio.sleep(1.0)  # the router delivers what the worker wrote
                finished = {t.result().job_id: t.result() for t in tasks if t.done()}
                for t in tasks:
                    t.cancel()
                return code, left, jobs_in_hand, finished

        code, left, jobs_in_hand, finished = asyncio.run(scenario())
    assert code == 0
    assert left == []  # nothing left pending on the stopped worker
    assert jobs_in_hand and jobs_in_hand <= set(finished)
    assert all(finished[j].status == "ok" and finished[j].answered_by == "heavy" for j in jobs_in_hand)


@pytest.mark.slow
def test_a_direct_heavy_job_that_cannot_make_its_deadline_falls_back_to_the_light_model(redis_server, tmp_path):
    """Under proteus jobs may skip the light model; one whose deadline the heavy model cannot
    meet goes back to the light model and is answered with its image, marked degraded."""
    from common.messages import Plan
    from common.plan_store import store_plan

    async def put_plan():
        from common.config import RedisSettings
        from common.streams import connect

        r = connect(RedisSettings(redis_url=redis_server.url))
        await store_plan(r, KEYS, Plan(version=1, policy="proteus", heavy_fraction=1.0))
        await r.aclose()

    asyncio.run(put_plan())
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.1)
    with LocalStack(spec, str(tmp_path / "logs")):

        async def go():
            async with Client(redis_url=redis_server.url) as client:
                roomy = await client.submit("a quiet lake", slo_ms=5000, timeout=60)  # heavy: 178 ms
                tight = await client.submit("a busy market", slo_ms=50, timeout=60)  # cannot make 50 ms
                return roomy, tight

        roomy, tight = asyncio.run(go())
    assert (roomy.answered_by, roomy.degraded) == ("heavy", False)
    assert (tight.status, tight.answered_by, tight.degraded, tight.model) == ("ok", "light", True, "sdturbo")


@pytest.mark.slow
def test_a_poison_job_is_failed_after_max_deliveries_when_its_worker_restarts_under_the_same_name(
    redis_server, tmp_path
):
    """Compose restarts a crashed worker under its fixed instance id: the job that crashed it
    three times (max_deliveries 3) is answered with internal_error and acked, not run again."""
    r = redis.Redis.from_url(redis_server.url)
    spec = StackSpec(
        redis_url=redis_server.url,
        light_workers=1,
        heavy_workers=1,
        time_scale=0.01,
        env={"DIFFSERVE_MAX_DELIVERIES": "3"},
    )
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        stack.kill("worker-0")

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                task = asyncio.create_task(client.submit("a poison prompt", timeout=60))
                taken = []
                while not taken:  # play the crashed worker-0: take the job, never ack it
                    await asyncio.sleep(0.05)
                    taken = r.xreadgroup("workers", "worker-0", {KEYS.light_queue: ">"}, count=1)
                for _crash in range(2):
                    r.xreadgroup("workers", "worker-0", {KEYS.light_queue: "0"}, count=1)
                await asyncio.to_thread(stack.restart, "worker-0")
                return await task

        result = asyncio.run(scenario())
    assert result.status == "error" and result.error_code == "internal_error", result
    assert "4 attempts" in result.error_message
    assert r.xpending(KEYS.light_queue, "workers")["pending"] == 0


@pytest.mark.slow
def test_a_job_id_refused_before_admission_can_be_retried_and_a_duplicate_in_flight_is_refused(redis_server, tmp_path):
    """An error before admission (invalid request, overloaded) does not use up the job id: the
    client's retry with the same id is served. The same id sent again while the first is in flight
    (or answered) gets an explicit duplicate_job_id error, never silence."""
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.05)
    with LocalStack(spec, str(tmp_path / "logs")):

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                bad = await client.submit("a lighthouse", job_id="retry-1", image_quality=0, timeout=30)
                good = await client.submit("a lighthouse", job_id="retry-1", timeout=30)
                first = asyncio.create_task(client.submit("a harbour", job_id="dup-1", timeout=30))
                await asyncio.sleep(0.3)  # admitted, still on the GPU (time scale 0.05: ~0.4 s of work)
                await client.enqueue("a harbour again", job_id="dup-1")
                answers = [await first]
                answers.append(await anext(client.results()))
                return bad, good, answers

        bad, good, answers = asyncio.run(scenario())
    assert bad.error_code == "invalid_request"
    assert good.status == "ok"
    assert sorted(a.status if a.status == "ok" else a.error_code for a in answers) == ["duplicate_job_id", "ok"]


@pytest.mark.slow
def test_after_a_redis_restart_batches_in_flight_are_resumed_without_waiting_for_the_reclaim_time(tmp_path):
    """Default reclaim times (15 s): a batch whose write failed during the
    outage is taken up again by its own consumer as soon as Redis is back."""
    server = RedisServer(appendonly=True).start()
    prompts = load_prompts()[:40]
    try:
        spec = StackSpec(redis_url=server.url, light_workers=1, heavy_workers=1, time_scale=0.1)
        with LocalStack(spec, str(tmp_path / "logs")):

            async def scenario():
                async with Client(redis_url=server.url) as client:
                    tasks = [asyncio.create_task(client.submit(p, timeout=180)) for p in prompts]
                    await asyncio.sleep(0.3)  # batches on the GPUs now
                    await asyncio.to_thread(server.restart, 1.0)
                    back = time.monotonic()
                    results = await asyncio.gather(*tasks)
                    return results, time.monotonic() - back

            results, after_restart_s = asyncio.run(scenario())
        assert [r.status for r in results] == ["ok"] * len(prompts)
        assert after_restart_s < 8, after_restart_s
    finally:
        server.stop()


@pytest.mark.slow
def test_a_local_stack_serves_metrics_on_loopback_only(redis_server, tmp_path):
    """diffserve up / demo / loadtest stacks are local: their metrics ports must not listen on every interface."""
    from common.localstack import free_port

    base = free_port()
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=0, metrics_base_port=base)
    with LocalStack(spec, str(tmp_path / "logs")):
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    local = {line.split()[3] for line in listening.splitlines()}
    ours = {addr for addr in local if addr.rsplit(":", 1)[1] in {str(base + i) for i in range(3)}}
    assert ours == {f"127.0.0.1:{base + i}" for i in range(3)}, ours


@pytest.mark.slow
@pytest.mark.parametrize("skew_ms, answered_by", [(0, "heavy"), (60_000, "light")])
def test_a_heavy_worker_allows_for_the_configured_clock_skew(redis_server, tmp_path, skew_ms, answered_by):
    """A deadline stamped by the router's clock, 20 s ahead: the heavy worker runs the job; told that
    clocks may differ by 60 s (DIFFSERVE_CLOCK_SKEW_MS), it answers with the light image instead."""
    from common.service import now_ms
    from common.streams import add

    spec = StackSpec(
        redis_url=redis_server.url,
        light_workers=0,
        heavy_workers=1,
        time_scale=0.01,
        env={"DIFFSERVE_LATE_POLICY": "light", "DIFFSERVE_CLOCK_SKEW_MS": str(skew_ms)},
    )
    with LocalStack(spec, str(tmp_path / "logs")):
        now = now_ms()
        job = RoutedJob(
            job_id="skew-1",
            prompt="a lighthouse",
            arrival_ms=now,
            deadline_ms=now + 20_000,
            seed=1,
            light_image=b"light-png",
            light_image_format="png",
            confidence=0.1,
        )

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                await add(client.redis, KEYS.heavy_queue, job.encode())
                return await client.wait_result("skew-1", timeout=30)

        result = asyncio.run(scenario())
    assert result.status == "ok" and result.answered_by == answered_by and result.degraded == (skew_ms > 0)


def test_worker_shutdown_does_not_hang_on_a_hung_redis(redis_server):
    """Redis stops answering (SIGSTOP) while a worker shuts down: deregistering is bounded."""
    import os
    import signal

    from common.service import Service
    from services.worker import Worker, WorkerConfig

    async def go():
        svc = Service("worker", WorkerConfig(redis_url=redis_server.url, instance_id="w-hang"))
        worker = Worker(svc)
        await svc.redis.ping()
        pid = int(redis_server.pidfile.read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            await asyncio.wait_for(worker.close(), 8)
            return time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)

    assert asyncio.run(go()) < 4


@pytest.mark.slow
def test_refused_entries_leave_no_big_keys_and_little_short_lived_bookkeeping(redis_server, tmp_path):
    """A 1 MB job id in plain fields (prompt missing) must not become a key name; an oversized plain
    entry is refused by size; a refused job's answer and marker live for the short refused TTL."""
    r = redis.Redis.from_url(redis_server.url)
    spec = StackSpec(
        redis_url=redis_server.url, light_workers=0, heavy_workers=0, env={"DIFFSERVE_REFUSED_TTL_S": "60"}
    )
    with LocalStack(spec, str(tmp_path / "logs")):
        r.xadd(KEYS.jobs, {"job_id": "x" * 1_000_000})
        r.xadd(KEYS.jobs, {"job_id": "big-1", "prompt": "p", "padding": "y" * 1_000_000})
        r.xadd(KEYS.jobs, {"job_id": "bad-1", "prompt": "p", "image_format": "tiff"})
        big = r.blpop([KEYS.result("big-1")], timeout=10)
        deadline = time.monotonic() + 10
        while not r.exists(KEYS.result("bad-1")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < r.ttl(KEYS.result("bad-1")) <= 60
        done_ttl = r.ttl(KEYS.done("bad-1"))
        bad = r.blpop([KEYS.result("bad-1")], timeout=1)
        names = [k for k in r.scan_iter(count=1000)]
    from common.messages import FinalResult

    assert FinalResult.decode(big[1]).error_code == "invalid_request"
    assert "larger than" in FinalResult.decode(big[1]).error_message
    assert FinalResult.decode(bad[1]).error_code == "invalid_request"
    assert max(len(k) for k in names) < 200, max(len(k) for k in names)
    assert 0 < done_ttl <= 60  # the gateway's "out of flight" marker, short-lived
    assert r.xlen(KEYS.dead_letters) == 1


def test_a_burst_of_oversized_entries_is_answered_without_reaching_the_routers_memory(tmp_path):
    """32 job entries of 4 MiB (msgpack and plain fields): each is answered invalid_request under its
    own id (none is a dead letter), and the router's peak RSS stays far below what reading them whole
    takes (before the bounded read: one read batch of them all)."""
    import json
    import sys
    from pathlib import Path

    out = tmp_path / "memory.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "router_memory.py"
    subprocess.run([sys.executable, str(script), "--entries", "32", "--mib", "4", "--json", str(out)], check=True)
    figures = json.loads(out.read_text())
    assert figures["codes"] == {"invalid_request": 32, "dead letters": 0}, figures
    assert figures["rss_peak_mb"] - figures["rss_before_mb"] < 48, figures  # 32 x 4 MiB = 128 MiB

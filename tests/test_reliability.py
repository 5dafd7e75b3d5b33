"""Issue 24 (reliability round three), the service side: lost submission replies, a hung Redis at
shutdown, loopback metrics, stalled workers past the result TTL. Real redis-server, real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from common.client import Client
from common.config import Keys
from common.localstack import LocalStack, StackSpec, free_port

KEYS = Keys()


@pytest.mark.slow
def test_services_stop_within_seconds_of_sigterm_while_redis_hangs(redis_server, tmp_path):
    """Redis stops answering (SIGSTOP) under a router and a discriminator blocked in reads. Each command
    waited out socket timeout x retries (~40 s) before SIGTERM took effect; now ~5 s grace, then out."""
    spec = StackSpec(redis_url=redis_server.url, light_workers=0, heavy_workers=0)
    pid = int(redis_server.pidfile.read_text())
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # every loop is now waiting on the hung server
            start = time.monotonic()
            for proc in stack.procs.values():
                proc.send_signal(signal.SIGTERM)
            took = {}
            for name, proc in stack.procs.items():
                proc.wait(timeout=60)
                took[name] = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
    print(f"stopped after SIGTERM on a hung Redis: {took}")
    assert all(seconds < 8 for seconds in took.values()), took


@pytest.mark.slow
def test_a_standalone_service_serves_metrics_on_loopback_unless_told_otherwise(redis_server, tmp_path):
    """``diffserve router`` with a metrics port and no METRICS_ADDR listens on 127.0.0.1 only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "METRICS_ADDR"}
    env.update(REDIS_URL=redis_server.url, METRICS_PORT=str(port), PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "services.router"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline, bound = time.monotonic() + 20, set()
        while time.monotonic() < deadline and not bound:
            listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
            bound = {line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")}
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert bound == {f"127.0.0.1:{port}"}, bound


class CuttingProxy:
    """A TCP proxy in front of Redis that, the first time it sees each XADD, lets it through to Redis and
    then drops the connection instead of passing back Redis's reply: the client cannot know its entry
    was taken. The same XADD sent again goes through."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.port = upstream_port, 0
        self.seen: set[bytes] = set()
        self._server: asyncio.base_events.Server | None = None

    @property
    def cut(self) -> int:
        return len(self.seen)

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        armed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if b"XADD" in data.upper() and data not in self.seen:
                    self.seen.add(data)
                    armed.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if armed.is_set():  # Redis answered the XADD: the client never hears it
                    break
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()


@pytest.mark.slow
def test_a_submission_whose_reply_was_lost_gets_the_answer_of_the_job_that_ran(redis_server, tmp_path):
    """Five submissions, each XADD taken by Redis but its reply cut off: the client sends it again (the
    same request under the same id). Each gets its one real answer; before, 5 of 5 got duplicate_job_id."""
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.05)
    with LocalStack(spec, str(tmp_path / "logs")):

        async def scenario():
            proxy = await CuttingProxy(redis_server.port).start()
            try:
                async with Client(redis_url=f"redis://127.0.0.1:{proxy.port}/0") as client:
                    results = [
                        await client.submit(f"a lighthouse {i}", job_id=f"cut-{i}", timeout=30) for i in range(5)
                    ]
                    await asyncio.sleep(1.0)  # a second answer would be here by now
                    return results, proxy.cut, client.rejected
            finally:
                await proxy.close()

        results, cut, rejected = asyncio.run(scenario())
        entries = redis.Redis.from_url(redis_server.url).xlen(KEYS.jobs)
    assert cut == 5 and entries == 10  # every submission reached Redis twice
    assert [(r.job_id, r.status, r.error_code) for r in results] == [(f"cut-{i}", "ok", None) for i in range(5)]
    assert rejected == 0  # and no second answer


def _metric(port: int, name: str, **labels: str) -> float:
    """One sample of a service's /metrics page (0 when absent)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_a_worker_stalled_past_the_result_ttl_cannot_answer_a_job_twice(redis_server, tmp_path):
    """A light worker is frozen (SIGSTOP) mid-batch; the other takes the job over and it is answered. The
    frozen one resumes after the job's markers expired (--result-ttl-s 3) and finishes the same batch:
    its completion used to become a second answer; now the router drops it as stale and counts it."""
    env = {"DIFFSERVE_RESULT_TTL_S": "3", "DIFFSERVE_RECLAIM_IDLE_MS": "1000", "DIFFSERVE_THRESHOLD": "0"}
    spec = StackSpec(redis_url=redis_server.url, light_workers=2, heavy_workers=0, time_scale=5.0, env=env)
    r = redis.Redis.from_url(redis_server.url)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                task = asyncio.create_task(client.submit("a lighthouse", job_id="stall-1", timeout=60))
                deadline, holder = time.monotonic() + 20, None
                while holder is None and time.monotonic() < deadline:
                    held = [c for c in r.xinfo_consumers(KEYS.light_queue, "workers") if c["pending"] > 0]
                    holder = held[0]["name"].decode() if held else None
                    await asyncio.sleep(0.01)
                assert holder, "no worker took the job"
                stack.procs[holder].send_signal(signal.SIGSTOP)
                try:
                    result = await task  # answered by the other worker
                    await asyncio.sleep(4.0)  # past the result TTL: the done marker is gone
                finally:
                    stack.procs[holder].send_signal(signal.SIGCONT)
                await asyncio.sleep(4.0)  # the frozen batch finishes (2.5 s of light model) and is delivered
                return result, client.rejected

        result, rejected = asyncio.run(scenario())
        port = stack.metrics_ports["router"]
        stale = _metric(port, "diffserve_errors_total", service="router", code="stale_completion")
    assert result.status == "ok" and result.job_id == "stall-1"
    assert rejected == 0  # no second answer reached the client
    assert stale == 1  # the frozen worker's completion came, and was dropped

"""Gateway benchmark, beside the serving-plane one: what the HTTP front door adds over the
direct Python client, in one run on this machine.

``python -m loadtest.gateway_bench`` or ``diffserve loadtest --gateway-bench``.

A fresh redis-server and a local stack with profiled models at time_scale 0 (no model sleep),
one light and one heavy worker, a threshold above every confidence (every job goes through
the light model, the discriminator and the heavy model) and a gateway without API keys.  For
each way in (direct ``Client.submit``; ``POST /v1/images/generations``; the same with
``stream: true, partial_images: 1`` read to its ``completed`` event):

1. latency one request at a time (p50/p99 ms), and the gateway's added p50/p99 over direct;
2. throughput with ``--concurrency`` requests in flight for ``--seconds`` (requests/s), with the
   CPU time the gateway process and this load generator spent per request (from /proc).

The load generator (httpx) shares the machine with the stack, so on a small box requests/s is a
floor, not a capacity figure; the gateway's CPU ms per request is what it costs wherever it runs.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from common.client import Client
from common.localstack import LocalStack, StackSpec, free_port
from common.messages import Status
from common.profiles import load_prompts
from loadtest.report import cpu_seconds, percentiles
from loadtest.runner import close_client
from loadtest.serving_bench import write_bench


async def _direct(client: Client, prompt: str) -> None:
    result = await client.submit(prompt, timeout=60)
    assert result.status == Status.OK, result.error_message


async def _sync(http: httpx.AsyncClient, prompt: str) -> None:
    r = await http.post("/v1/images/generations", json={"prompt": prompt})
    r.raise_for_status()


async def _stream(http: httpx.AsyncClient, prompt: str) -> None:
    events = []
    async with http.stream(
        "POST", "/v1/images/generations", json={"prompt": prompt, "stream": True, "partial_images": 1}
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events == ["image_generation.partial_image", "image_generation.completed"], events


async def _sequential(call: Callable[[str], Awaitable[None]], prompts: list[str], n: int) -> dict[str, Any]:
    lat = []
    for i in range(n):
        start = time.perf_counter()
        await call(prompts[i % len(prompts)])
        lat.append((time.perf_counter() - start) * 1000)
    return percentiles(lat, 3)


async def _closed_loop(
    call: Callable[[str], Awaitable[None]], prompts: list[str], concurrency: int, seconds: float, gateway_pid: int
) -> dict[str, Any]:
    done, lat = 0, []
    gateway_cpu, own_cpu = cpu_seconds(gateway_pid), time.process_time()
    stop_at = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await call(prompts[i % len(prompts)])
            lat.append((time.perf_counter() - start) * 1000)
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(concurrency)))
    wall = time.perf_counter() - started

    def per_request(cpu_s: float) -> float:
        return round(cpu_s * 1000 / max(1, done), 3)

    return {
        "requests": done,
        "rps": round(done / wall, 1),
        "latency_ms": percentiles(lat, 3),
        "gateway_cpu_ms_per_request": per_request(cpu_seconds(gateway_pid) - gateway_cpu),
        "bench_cpu_ms_per_request": per_request(time.process_time() - own_cpu),
    }


async def bench(redis_url: str, gateway_url: str, gateway_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = load_prompts()[:500]
    client = Client(redis_url=redis_url)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    http = httpx.AsyncClient(base_url=gateway_url, timeout=60, limits=limits)
    ways = {
        "direct client": lambda p: _direct(client, p),
        "gateway sync": lambda p: _sync(http, p),
        "gateway stream": lambda p: _stream(http, p),
    }
    try:
        for call in ways.values():  # warm-up: connections, code paths
            await _sequential(call, prompts, 20)
        result = {}
        for name, call in ways.items():
            seq = await _sequential(call, prompts, args.requests)
            loop = await _closed_loop(call, prompts, args.concurrency, args.seconds, gateway_pid)
            result[name] = {"sequential_ms": seq, **loop}
            print(
                f"  {name}: one at a time p50 {seq['p50']} ms, p99 {seq['p99']} ms; "
                f"{args.concurrency} in flight: {loop['rps']} requests/s, gateway CPU "
                f"{loop['gateway_cpu_ms_per_request']} ms/request",
                flush=True,
            )
    finally:
        await http.aclose()
        await close_client(client)
    base = result["direct client"]["sequential_ms"]
    for name in ("gateway sync", "gateway stream"):
        seq = result[name]["sequential_ms"]
        result[name]["added_ms"] = {q: round(seq[q] - base[q], 3) for q in ("p50", "p99")}
    return result


def table(result: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Gateway benchmark ({meta['machine']}): profiled models at time_scale 0, every job through "
        f"light -> discriminator -> heavy; {meta['requests']} requests one at a time, then "
        f"{meta['concurrency']} in flight for {meta['seconds']:g} s",
        "",
        "| way in | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s | gateway CPU ms/req "
        "| load generator CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result.items():
        added = r.get("added_ms", {"p50": 0.0, "p99": 0.0})
        gateway_cpu = f"{r['gateway_cpu_ms_per_request']:.2f}" if name != "direct client" else "-"
        lines.append(
            f"| {name} | {r['sequential_ms']['p50']:.2f} | {r['sequential_ms']['p99']:.2f} "
            f"| {added['p50']:+.2f} | {added['p99']:+.2f} | {r['rps']:g} | {gateway_cpu} "
            f"| {r['bench_cpu_ms_per_request']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffserve loadtest --gateway-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=200, help="requests sent one at a time per way in")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight for the throughput step")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the throughput step per way in")
    p.add_argument("--batch", type=int, default=8, help="worker batch size (DIFFSERVE_BATCH)")
    p.add_argument("--out", default="out/gateway_bench.json", help="JSON output")
    p.add_argument("--log-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "batch": args.batch,
    }
    port = free_port()
    spec = StackSpec(
        backend="profiled",
        time_scale=0.0,
        gateway_port=port,
        env={
            "DIFFSERVE_THRESHOLD": "1.01",
            "DIFFSERVE_BATCH": str(args.batch),
            "DIFFSERVE_SLO_MS": "60000",
            "DIFFSERVE_LATE_POLICY": "heavy",
        },
    )
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="diffserve-gateway-bench-")
    print(f"gateway bench: starting a stack (logs {log_dir})", flush=True)
    with LocalStack(spec, log_dir) as stack:
        assert stack.redis_url is not None  # started: its own redis-server
        result = asyncio.run(bench(stack.redis_url, f"http://127.0.0.1:{port}", stack.procs["gateway"].pid, args))
    write_bench(args.out, result, meta, table(result, meta))


if __name__ == "__main__":
    main()

"""Serving-path benchmark: what the router -> light -> discriminator -> heavy -> router path costs
on this machine when the models take no time at all.

``python -m loadtest.serving_bench`` or ``diffserve loadtest --serving-bench``.

It starts a fresh redis-server and a local stack with profiled models at time_scale 0 (no
model sleep), one light and one heavy worker, and a discriminator threshold above every
confidence so that every job takes the whole path (router, light worker, discriminator,
heavy worker, router, client: six stream hops).  Then:

1. the floor: a bare Redis round trip, XADD on one connection -> XREADGROUP on another ->
   XACK, one message at a time, measured in the same run on the same server;
2. the per-query overhead of the path at a low rate (p50/p99 of send -> result, ms);
3. steps up the offered rate (uniform arrivals) until p99 latency passes ``--p99-limit-ms``,
   the backlog does not drain within ``--drain-s``, or the sender cannot keep the rate; the
   highest rate that passed is the sustained rate.  The whole run stays under ``--budget-s``.

``--image-kb N[,M...]``: one run per size, each on a fresh stack whose profiled workers emit one PNG
of N KiB encoded once at start (0: the 64x64 placeholder, encoded per job), so the runs compare moving
images, not encoding them. The client asks for references (``image_ref``, unless ``--no-image-ref``)
and reads each image's bytes from the image store itself (latency is send -> bytes in hand). Every
step also reports the bytes that crossed the queue Redis per answered job (its ``INFO`` counters
total_net_input_bytes + total_net_output_bytes) and, when the image store is other Redis servers, theirs.
``--blob-url``: the image store: empty (the queue Redis, the default), ``local`` or ``local:N`` (N
throwaway redis-servers started for the run, shards), ``localfs`` (a throwaway directory in ``/dev/shm``
where there is one: the ``file://`` store on tmpfs), or a URL as for ``DIFFSERVE_BLOB_URL``.

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from common.client import Client
from common.config import Keys, RedisSettings
from common.localstack import LocalStack, RedisServer, StackSpec
from common.messages import FinalResult, Status, new_job_id
from common.profiles import load_prompts
from common.streams import PIPELINE_GROUPS, backlog, connect
from loadtest.report import percentiles
from loadtest.runner import close_client, stop_task

DEFAULT_RATES = (25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2400)


async def redis_round_trip(url: str, samples: int = 1000) -> dict[str, Any]:
    """XADD (producer connection) -> XREADGROUP (consumer connection) -> XACK, one at a time."""
    settings = RedisSettings(redis_url=url)
    producer, consumer = (
        connect(settings, client_name="bench-producer"),
        connect(settings, client_name="bench-consumer"),
    )
    stream, group = "bench:rtt", "g"
    try:
        await producer.xgroup_create(stream, group, id="$", mkstream=True)
        one_way, full = [], []
        for i in range(samples + 50):
            start = time.perf_counter()
            await producer.xadd(stream, {"m": b"x" * 64})
            reply: Any = await consumer.xreadgroup(group, "c", {stream: ">"}, count=1, block=1000)
            got = time.perf_counter()
            await consumer.xack(stream, group, reply[0][1][0][0])
            done = time.perf_counter()
            if i >= 50:  # warm-up
                one_way.append((got - start) * 1000)
                full.append((done - start) * 1000)
        return {"xadd_to_read_ms": percentiles(one_way, 3), "xadd_read_ack_ms": percentiles(full, 3)}
    finally:
        await producer.delete(stream)
        await producer.aclose()
        await consumer.aclose()


async def _queue_backlog(r: aioredis.Redis) -> int:
    keys = Keys()
    return sum([await backlog(r, getattr(keys, attr), group) for attr, group in PIPELINE_GROUPS])


async def net_bytes(clients: list[aioredis.Redis]) -> int:
    """Bytes in and out of these Redis servers so far (their INFO counters)."""
    total = 0
    for r in clients:
        info: Any = await r.info("stats")
        total += int(info["total_net_input_bytes"]) + int(info["total_net_output_bytes"])
    return total


async def offered_step(
    client: Client, prompts: list[str], rate: float, seconds: float, drain_s: float, image_ref: bool = False
) -> dict[str, Any]:
    """Send ``rate`` q/s for ``seconds`` (uniform spacing), wait up to ``drain_s`` for the rest. An answer
    that refers to its image counts when the bytes have been read from the image store (and deleted)."""
    step = _Step(client, max(1, int(rate * seconds)))
    loop = asyncio.get_running_loop()
    collector = asyncio.create_task(step.collect())
    t0 = loop.time()
    for i in range(step.n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        job_id = new_job_id()
        step.sent_at[job_id] = loop.time()
        await client.enqueue(prompts[i % len(prompts)], job_id=job_id, image_ref=image_ref)
    send_s = loop.time() - t0
    try:
        await asyncio.wait_for(step.done.wait(), drain_s)
    except TimeoutError:
        pass
    await stop_task(collector)
    for task in list(step.reads):
        await stop_task(task)
    n = step.n
    return {
        "rate": rate,
        "sent": n,
        "answered": len(step.latency),
        "unanswered": n - len(step.latency),
        "errors": step.errors,
        "achieved_send_qps": round(n / send_s, 1) if send_s else None,
        "e2e_ms": percentiles(step.latency, 3),
        "router_ms": percentiles(step.router_ms, 3),
        "wall_s": round(loop.time() - t0, 2),
    }


class _Step:
    """The answers of one offered-load step of ``n`` jobs, as they come."""

    def __init__(self, client: Client, n: int):
        self.client, self.n = client, n
        self.loop = asyncio.get_running_loop()
        self.sent_at: dict[str, float] = {}
        self.latency: list[float] = []
        self.router_ms: list[float] = []
        self.errors = 0
        self.done = asyncio.Event()
        self.reads: set[asyncio.Task[None]] = set()

    def finish(self, start: float, ok: bool) -> None:
        self.latency.append((self.loop.time() - start) * 1000)
        self.errors += not ok
        if len(self.latency) >= self.n:
            self.done.set()

    async def read_image(self, res: FinalResult, start: float) -> None:
        try:
            await self.client.image(res, release=True)
        except Exception:  # counted as an error: an answer whose image cannot be read is no answer
            self.finish(start, False)
            return
        self.finish(start, True)

    async def collect(self) -> None:
        async for res in self.client.results():
            start = self.sent_at.pop(res.job_id, None)
            if start is None:
                continue
            if res.latency_ms is not None:
                self.router_ms.append(res.latency_ms)
            if res.status == Status.OK and res.image_ref is not None:
                task = asyncio.create_task(self.read_image(res, start))
                self.reads.add(task)
                task.add_done_callback(self.reads.discard)
                continue
            self.finish(start, res.status == Status.OK)


async def bench(url: str, args: argparse.Namespace, blob_url: str = "") -> dict[str, Any]:
    prompts = load_prompts()[:2000]
    started = time.monotonic()
    rtt = await redis_round_trip(url, args.rtt_samples)
    steps = []
    settings = RedisSettings(redis_url=url, blob_url=blob_url)
    client = Client(settings)
    queue = connect(settings, client_name="bench-traffic")
    blob_urls = [u for u in blob_url.split(",") if u.startswith(("redis://", "rediss://"))]
    blob_servers = [connect(RedisSettings(redis_url=u), client_name="bench-traffic") for u in blob_urls]
    try:
        await offered_step(client, prompts, 50, 0.4, 5.0, args.image_ref)  # warm-up
        for rate in args.rates:
            remaining = args.budget_s - (time.monotonic() - started)
            if remaining < args.step_s + args.drain_s:
                break
            queue_before, blobs_before = await net_bytes([queue]), await net_bytes(blob_servers)
            step = await offered_step(client, prompts, rate, args.step_s, args.drain_s, args.image_ref)
            answered = max(1, step["answered"])
            step["queue_kb_per_job"] = round((await net_bytes([queue]) - queue_before) / answered / 1000, 1)
            step["blob_kb_per_job"] = (
                round((await net_bytes(blob_servers) - blobs_before) / answered / 1000, 1) if blob_servers else None
            )
            step["backlog_after"] = await _queue_backlog(queue)
            reasons = []
            if step["unanswered"]:
                reasons.append(f"{step['unanswered']} unanswered after {args.drain_s:g} s drain")
            if step["e2e_ms"]["p99"] is not None and step["e2e_ms"]["p99"] > args.p99_limit_ms:
                reasons.append(f"p99 {step['e2e_ms']['p99']:.0f} ms > {args.p99_limit_ms:g} ms")
            if step["achieved_send_qps"] is not None and step["achieved_send_qps"] < 0.9 * rate:
                reasons.append(f"sender reached only {step['achieved_send_qps']} q/s")
            step["sustained"] = not reasons
            step["why_not"] = "; ".join(reasons)
            steps.append(step)
            print(
                f"  {rate:>6g} q/s: p50 {step['e2e_ms']['p50']} ms, p99 {step['e2e_ms']['p99']} ms, "
                f"answered {step['answered']}/{step['sent']}, queue Redis {step['queue_kb_per_job']} KB/job"
                + (f", image store {step['blob_kb_per_job']} KB/job" if blob_servers else "")
                + (f"  -> stop: {step['why_not']}" if reasons else ""),
                flush=True,
            )
            if reasons:
                break
            # let any leftover drain before the next step
            await asyncio.sleep(0.2)
    finally:
        await close_client(client)
        for r in [queue, *blob_servers]:
            await r.aclose()
    passed = [s for s in steps if s["sustained"]]
    return {
        "redis_round_trip": rtt,
        "steps": steps,
        "max_sustained_qps": max((s["rate"] for s in passed), default=0),
        "overhead_ms": steps[0]["e2e_ms"] if steps else None,
        "overhead_router_ms": steps[0]["router_ms"] if steps else None,
        "at_max_sustained_ms": (max(passed, key=lambda s: s["rate"])["e2e_ms"] if passed else None),
        "bench_s": round(time.monotonic() - started, 1),
    }


def _size(kb: int) -> str:
    return "placeholder (64x64 PNG)" if kb == 0 else f"{kb} KiB"


def table(result: dict[str, Any], meta: dict[str, Any]) -> str:
    rtt = result["redis_round_trip"]
    nan = float("nan")
    ov = result["overhead_ms"] or {}
    ov_router = result["overhead_router_ms"] or {}
    low = f"{result['steps'][0]['rate']:g}" if result["steps"] else "?"
    lines = [
        f"### Images: {_size(result['image_kb'])}",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        f"| bare Redis: XADD -> XREADGROUP (other connection) | {rtt['xadd_to_read_ms']['p50']:.3f} "
        f"| {rtt['xadd_to_read_ms']['p99']:.3f} |",
        f"| bare Redis: XADD -> XREADGROUP -> XACK | {rtt['xadd_read_ack_ms']['p50']:.3f} "
        f"| {rtt['xadd_read_ack_ms']['p99']:.3f} |",
        f"| DiffServe full path at {low} q/s (client send -> image bytes in hand) "
        f"| {ov.get('p50', nan):.2f} | {ov.get('p99', nan):.2f} |",
        f"| DiffServe full path at {low} q/s (router arrival -> answer) "
        f"| {ov_router.get('p50', nan):.2f} | {ov_router.get('p99', nan):.2f} |",
        "",
        "| offered q/s | sent | answered | p50 ms | p99 ms | queue Redis KB/job | image store KB/job | sustained |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in result["steps"]:
        blob = "-" if s["blob_kb_per_job"] is None else s["blob_kb_per_job"]
        lines.append(
            f"| {s['rate']:g} | {s['sent']} | {s['answered']} | {s['e2e_ms']['p50']} | {s['e2e_ms']['p99']} "
            f"| {s['queue_kb_per_job']} | {blob} | {'yes' if s['sustained'] else 'no: ' + s['why_not']} |"
        )
    lines += [
        "",
        f"Highest sustained rate: **{result['max_sustained_qps']:g} q/s** "
        f"(p99 <= {meta['p99_limit_ms']:g} ms, drained within {meta['drain_s']:g} s).",
    ]
    return "\n".join(lines) + "\n"


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per image size, relative to the placeholder run (the first, when there is one)."""
    base = next((r for r in runs if r["image_kb"] == 0), None)
    rows = []
    for r in runs:
        p50 = (r["overhead_ms"] or {}).get("p50")
        sustained = [s for s in r["steps"] if s["sustained"]]
        top = max(sustained, key=lambda s: s["rate"]) if sustained else None
        row: dict[str, Any] = {
            "image_kb": r["image_kb"],
            "max_sustained_qps": r["max_sustained_qps"],
            "p50_low_ms": p50,
            "queue_kb_per_job": top["queue_kb_per_job"] if top else None,
            "blob_kb_per_job": top["blob_kb_per_job"] if top else None,
        }
        if base is not None:
            base_p50 = (base["overhead_ms"] or {}).get("p50")
            row["qps_vs_placeholder"] = (
                round(r["max_sustained_qps"] / base["max_sustained_qps"], 2) if base["max_sustained_qps"] else None
            )
            row["p50_vs_placeholder"] = round(p50 / base_p50, 2) if p50 and base_p50 else None
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Serving-path benchmark ({meta['machine']}): profiled models at time_scale 0, "
        f"{meta['light_workers']} light + {meta['heavy_workers']} heavy worker(s), batch {meta['batch']}, "
        "every job through router -> light -> discriminator -> heavy -> router -> client; "
        f"image store: {meta['blob_store']}; the client "
        + ("asks for references and reads the bytes itself" if meta["image_ref"] else "gets the bytes inline"),
        "",
        "| images | sustained q/s | vs placeholder | p50 ms at the lowest rate | vs placeholder "
        "| queue Redis KB/job | image store KB/job |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        blob = "-" if r["blob_kb_per_job"] is None else r["blob_kb_per_job"]
        lines.append(
            f"| {_size(r['image_kb'])} | {r['max_sustained_qps']:g} | {r.get('qps_vs_placeholder', '-')} "
            f"| {r['p50_low_ms']} | {r.get('p50_vs_placeholder', '-')} | {r['queue_kb_per_job']} | {blob} |"
        )
    lines.append("")
    lines.append("(KB/job: bytes in + out of that Redis per answered job at the highest sustained rate.)")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffserve loadtest --serving-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="offered rates to step through (q/s)")
    p.add_argument("--step-s", type=float, default=3.0, help="seconds per rate step")
    p.add_argument("--drain-s", type=float, default=2.0, help="max wait for a step's results after its last send")
    p.add_argument("--p99-limit-ms", type=float, default=250.0, help="a step with a higher p99 is not sustained")
    p.add_argument("--budget-s", type=float, default=55.0, help="stop stepping up after this long (per image size)")
    p.add_argument("--batch", type=int, default=8, help="worker batch size (DIFFSERVE_BATCH)")
    p.add_argument("--light-workers", type=int, default=1)
    p.add_argument("--heavy-workers", type=int, default=1)
    p.add_argument("--rtt-samples", type=int, default=1000)
    p.add_argument(
        "--image-kb",
        default="0",
        help="image sizes in KiB, comma-separated, one run each (0: the placeholder; e.g. 0,512)",
    )
    p.add_argument(
        "--blob-url",
        default="",
        help="image store: empty = the queue Redis; local or local:N = N redis-servers started for the run; "
        "localfs = a directory in /dev/shm made for the run; else a DIFFSERVE_BLOB_URL (redis://, s3://, file://)",
    )
    p.add_argument(
        "--image-ref",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the client asks for references and reads the bytes itself (--no-image-ref: bytes inline in answers)",
    )
    p.add_argument("--out", default="out/serving_bench.json", help="JSON output")
    p.add_argument("--log-dir", default=None)
    return p


def write_bench(path: str, result: dict[str, Any], meta: dict[str, Any], text: str) -> None:
    """A benchmark's JSON (meta + result) and its Markdown table beside it; prints the table."""
    print(text)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **result}, indent=1))
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")


@contextlib.contextmanager
def blob_store(spec: str, log_dir: str) -> Iterator[str]:
    """``--blob-url`` as a DIFFSERVE_BLOB_URL: ``local[:N]`` starts N redis-servers for the run, ``localfs``
    makes a directory for it (on tmpfs where there is one)."""
    if spec == "localfs":
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix="bench-blobs-", dir=shm) as root:
            yield f"file://{root}"
        return
    if spec != "local" and not spec.startswith("local:"):
        yield spec
        return
    servers = [RedisServer(workdir=tempfile.mkdtemp(prefix="bench-blobs-", dir=log_dir)).start()]
    try:
        for _ in range(int(spec.partition(":")[2] or 1) - 1):
            servers.append(RedisServer(workdir=tempfile.mkdtemp(prefix="bench-blobs-", dir=log_dir)).start())
        yield ",".join(s.url for s in servers)
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    sizes = [int(x) for x in args.image_kb.split(",") if x.strip()]
    import platform

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "batch": args.batch,
        "light_workers": args.light_workers,
        "heavy_workers": args.heavy_workers,
        "p99_limit_ms": args.p99_limit_ms,
        "drain_s": args.drain_s,
        "step_s": args.step_s,
        "image_kb": sizes,
        "blob_store": args.blob_url or "the queue Redis",
        "image_ref": args.image_ref,
    }
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="diffserve-bench-")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    runs = []
    for kb in sizes:
        with blob_store(args.blob_url, log_dir) as blob_url:
            spec = StackSpec(
                backend="profiled",
                time_scale=0.0,
                light_workers=args.light_workers,
                heavy_workers=args.heavy_workers,
                env={
                    "DIFFSERVE_THRESHOLD": "1.01",
                    "DIFFSERVE_BATCH": str(args.batch),
                    "DIFFSERVE_SLO_MS": "60000",
                    "DIFFSERVE_LATE_POLICY": "heavy",
                    "DIFFSERVE_IMAGE_KB": str(kb),
                    "DIFFSERVE_BLOB_URL": blob_url,
                },
            )
            print(f"serving bench, images {_size(kb)}: starting a stack (logs {log_dir})", flush=True)
            with LocalStack(spec, str(Path(log_dir) / f"{kb}kb")) as stack:
                assert stack.redis_url is not None  # started: its own redis-server
                runs.append({"image_kb": kb, **asyncio.run(bench(stack.redis_url, args, blob_url))})
    rows = summary(runs)
    text = "\n".join([summary_table(rows, meta)] + [table(r, meta) for r in runs])
    write_bench(args.out, {"summary": rows, "runs": runs}, meta, text)


if __name__ == "__main__":
    main()

"""Chaos through the HTTP gateway: a profiled stack under ``--factor`` times its capacity while the
router, the workers, the controller, the gateway and Redis are killed in turn (services by SIGKILL, Redis
by a restart with AOF, ``appendfsync everysec``). Prints jobs sent, accepted, refused, lost, duplicated
and the share of accepted jobs answered on time::

    python -m loadtest.chaos_gateway --jobs 20000 --factor 3 --kill-every 15

Jobs go in through ``POST /v1/jobs`` (open loop, Poisson). A job is **accepted** when the gateway said
202 and the router admitted it (its answer is not ``overloaded``); it is **lost** when the gateway said
202 and no final result ever reached its reply stream (``<ns>:reply:job-<id>``, read straight from
Redis, the ground truth), **duplicated** when that stream holds more than one. A POST that fails while
the gateway is down is counted apart (the caller got no id, so nothing is owed to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import Counter
from typing import Any

import httpx
import redis.asyncio as aioredis

from common.cascades import cascade
from common.localstack import LocalStack, RedisServer, StackSpec, free_port
from common.messages import ENTRY_FIELD, FinalResult, Status, unpack
from common.profiles import load_cascade_profile, load_prompts
from loadtest.overload import capacity_qps
from loadtest.report import percentiles

CASCADE = "sdturbo-sdv15"


class Chaos:
    """Kills one process after another (a rotation over every service and Redis) from a thread."""

    def __init__(self, stack: LocalStack, server: RedisServer, every_s: float, rng: random.Random):
        self.stack, self.server, self.every_s, self.rng = stack, server, every_s, rng
        self.victims = ["router", *sorted(n for n in stack.procs if n.startswith("worker")), "controller"]
        self.victims += ["gateway", "redis"]
        self.kills: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self.stop.wait(self.every_s):
            victim = self.victims[turn % len(self.victims)]
            turn += 1
            self.kills.append(victim)
            if victim == "redis":
                self.server.restart(down_s=self.rng.uniform(0.2, 1.0))
                continue
            self.stack.kill(victim)
            time.sleep(self.rng.uniform(0.2, 1.0))
            self.stack.restart(victim)


async def _send(
    http: httpx.AsyncClient, prompt: str, accepted: list[str], failures: Counter[str], inflight: asyncio.Semaphore
) -> None:
    async with inflight:
        try:
            r = await http.post("/v1/jobs", json={"prompt": prompt})
        except httpx.HTTPError as exc:  # the gateway is down or went down mid-request: no id, nothing owed
            failures[type(exc).__name__] += 1
            return
        if r.status_code == 202:
            accepted.append(r.json()["id"])
        else:
            failures[f"http {r.status_code}"] += 1


async def _answers(r: aioredis.Redis, prefix: str, ids: list[str]) -> dict[str, list[FinalResult]]:
    """Every final result on each job's reply stream (light previews skipped)."""
    out: dict[str, list[FinalResult]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        async with r.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.xrange(f"{prefix}job-{job_id}")
            replies = await pipe.execute()
        for job_id, entries in zip(chunk, replies, strict=False):
            finals = [unpack(f[ENTRY_FIELD]) for _i, f in entries]
            out[job_id] = [FinalResult.from_dict(b) for b in finals if b.get("type") == FinalResult.TYPE]
    return out


async def _collect_forever(
    r: aioredis.Redis, prefix: str, accepted: list[str], seen: dict[str, list[FinalResult]], done: asyncio.Event
) -> None:
    """Read answers while the run goes on: a refusal's reply stream expires after --refused-ttl-s (300 s),
    long before a run of this size ends. Rides out the Redis restarts."""
    while not done.is_set():
        missing = [j for j in list(accepted) if not seen.get(j)]
        try:
            seen.update({j: a for j, a in (await _answers(r, prefix, missing)).items() if a})
        except (OSError, aioredis.RedisError):  # Redis is restarting
            pass
        try:
            await asyncio.wait_for(done.wait(), 3.0)
        except TimeoutError:
            pass


async def _load(
    stack: LocalStack, server: RedisServer, args: argparse.Namespace, rate: float, namespace: str
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prompts = [p for p in load_prompts() if p.strip()]
    accepted: list[str] = []
    failures: Counter[str] = Counter()
    inflight = asyncio.Semaphore(args.max_in_flight)
    chaos = Chaos(stack, server, args.kill_every, rng)
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.max_in_flight)
    r = aioredis.Redis.from_url(stack.redis_url or "")
    prefix = f"{namespace}:reply:"
    seen: dict[str, list[FinalResult]] = {}
    collecting = asyncio.Event()
    collector = asyncio.create_task(_collect_forever(r, prefix, accepted, seen, collecting))
    started = time.monotonic()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.spec.gateway_port}", timeout=30.0, limits=limits
    ) as http:
        chaos.thread.start()
        tasks = []
        due = time.monotonic()
        for i in range(args.jobs):
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(_send(http, prompts[i % len(prompts)], accepted, failures, inflight)))
        await asyncio.gather(*tasks)
    send_s = time.monotonic() - started
    chaos.stop.set()
    await asyncio.to_thread(chaos.thread.join)
    deadline = time.monotonic() + args.drain_s
    while time.monotonic() < deadline and any(not seen.get(j) for j in accepted):
        await asyncio.sleep(2.0)
    await asyncio.sleep(2.0)  # a second answer would have arrived by now
    collecting.set()
    await collector
    final = await _answers(r, prefix, accepted)  # refusals read earlier may have expired since
    answers = {j: max(seen.get(j, []), final[j], key=len) for j in accepted}
    await r.aclose()
    finals = [a[0] for a in answers.values() if a]
    admitted = [f for f in finals if f.error_code != "overloaded"]
    served = [f for f in admitted if f.status == Status.OK]
    on_time = sum(bool(f.slo_met) for f in served)
    latencies = [f.latency_ms / args.time_scale for f in served if f.latency_ms is not None]
    return {
        "jobs_sent": args.jobs,
        "offered_per_s": round(args.jobs / send_s, 1),
        "gateway_202": len(accepted),
        "post_failed": dict(failures),
        "refused_overloaded": len(finals) - len(admitted),
        "accepted": len(admitted),
        "accepted_errors": dict(Counter(f.error_code for f in admitted if f.status != Status.OK)),
        "lost": sum(1 for a in answers.values() if not a),
        "duplicated": sum(len(a) - 1 for a in answers.values() if len(a) > 1),
        "on_time": on_time,
        "on_time_share": round(on_time / len(admitted), 4) if admitted else None,
        "degraded": sum(f.degraded for f in served),
        "latency_ms_full_speed": percentiles(latencies, 0),
        "kills": dict(Counter(chaos.kills)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000, help="jobs to send")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=4.0, help="wall time per full-speed time")
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between kills (wall)")
    parser.add_argument("--max-in-flight", type=int, default=200, help="open HTTP requests at most")
    parser.add_argument("--drain-s", type=float, default=120.0, help="how long to wait for the last answers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", default=None, help="folder for the services' logs")
    args = parser.parse_args(argv)
    capacity = capacity_qps(load_cascade_profile(CASCADE, "a100"), "diffserve", args.workers) / args.time_scale
    rate = args.factor * capacity
    server = RedisServer(appendonly=True).start()  # appendfsync everysec: Redis's default with AOF
    spec = StackSpec(
        redis_url=server.url,
        light_workers=args.workers // 2,
        heavy_workers=args.workers - args.workers // 2,
        controller=True,
        time_scale=args.time_scale,
        gateway_port=free_port(),
        gateway_args=["--rate-limit-rpm", "0", "--max-in-flight", "0"],
        env={"DIFFSERVE_RECLAIM_IDLE_MS": "2000", "DIFFSERVE_INTERVAL_S": "2"},
    )
    print(
        f"{args.workers} workers, profiled a100 backend at time scale {args.time_scale:g} (SLO "
        f"{cascade(CASCADE).slo_ms * args.time_scale / 1000:g} s wall); capacity {capacity:.1f} jobs/s wall, "
        f"offering {rate:.1f}/s ({args.factor:g}x) through the gateway; a kill every {args.kill_every:g} s",
        flush=True,
    )
    try:
        with LocalStack(spec, args.log_dir) as stack:
            summary = asyncio.run(_load(stack, server, args, rate, spec.namespace))
    finally:
        server.stop()
    print(json.dumps(summary, indent=2))
    print(
        f"sent {summary['jobs_sent']}  gateway 202 {summary['gateway_202']}  accepted {summary['accepted']}  "
        f"refused {summary['refused_overloaded']}  lost {summary['lost']}  duplicated {summary['duplicated']}  "
        f"on time {100 * (summary['on_time_share'] or 0):.1f} %  kills {sum(summary['kills'].values())}"
    )
    return summary


if __name__ == "__main__":
    main()

"""Soak / chaos: a profiled local stack under load while random services are SIGKILLed and
restarted. Bounded in time, loopback only. Prints jobs sent / answered / lost / duplicated.

    python -m loadtest.chaos --duration 60 --rate 20 --kill-every 4

With ``--image-kb N`` the workers' images are N KiB (stored in the image store, the queue Redis by
default): the summary also counts the stored images left after the drain and those without an expiry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

from common.client import Client
from common.localstack import LocalStack, StackSpec
from common.messages import ENTRY_FIELD, FinalResult, Status
from common.profiles import load_prompts


async def _load(
    stack: LocalStack,
    prompts: list[str],
    rate: float,
    duration: float,
    kill_every: float,
    rng: random.Random,
    drain_s: float,
) -> dict[str, Any]:
    victims = [name for name in stack.procs]
    kills: list[str] = []
    async with Client(redis_url=stack.redis_url) as client:
        sent: list[str] = []
        start = time.monotonic()
        next_kill = start + kill_every
        while time.monotonic() - start < duration:
            sent.append(await client.enqueue(prompts[len(sent) % len(prompts)]))
            if time.monotonic() >= next_kill:
                victim = rng.choice(victims)
                kills.append(victim)
                await asyncio.to_thread(stack.kill, victim)
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                await asyncio.to_thread(stack.restart, victim)
                next_kill = time.monotonic() + kill_every
            await asyncio.sleep(rng.expovariate(rate))
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and await client.redis.xlen(client.reply_stream) < len(sent):
            await asyncio.sleep(0.25)
        entries: Any = await client.redis.xrange(client.reply_stream)
        await asyncio.sleep(1.0)  # the router deletes a delivered job's images right after delivering it
        left = await client.blobs.keys()
        # Every answer went out inline, so whatever is left was written by a stage killed mid-batch (its
        # retry wrote the same key) or left by a router killed between delivering and deleting: it must expire.
        ttls = [await client.redis.ttl(client.keys.blob_prefix + key) for key in left]
    results = [FinalResult.decode(fields[ENTRY_FIELD]) for _id, fields in entries]
    per_job = Counter(r.job_id for r in results)
    answered = set(per_job) & set(sent)
    return {
        "sent": len(sent),
        "answered": len(answered),
        "lost": len(set(sent) - answered),
        "duplicated": sum(n - 1 for n in per_job.values() if n > 1),
        "errors": dict(Counter(r.error_code for r in results if r.status != Status.OK)),
        "degraded": sum(r.degraded for r in results),
        "kills": dict(Counter(kills)),
        "blobs_left": len(left),
        "blobs_without_expiry": sum(ttl < 0 for ttl in ttls),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs per second (Poisson)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--drain-s", type=float, default=60.0, help="how long to wait for the last answers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--controller", action="store_true", help="also run (and kill) the controller")
    parser.add_argument("--image-kb", type=int, default=0, help="image size (0: the inline placeholder)")
    args = parser.parse_args(argv)
    spec = StackSpec(
        light_workers=args.workers // 2,
        heavy_workers=args.workers - args.workers // 2,
        time_scale=args.time_scale,
        controller=args.controller,
        env={"DIFFSERVE_RECLAIM_IDLE_MS": "2000", "DIFFSERVE_IMAGE_KB": str(args.image_kb)},
    )
    with LocalStack(spec) as stack:
        summary = asyncio.run(
            _load(
                stack, load_prompts(), args.rate, args.duration, args.kill_every, random.Random(args.seed), args.drain_s
            )
        )
    print(json.dumps(summary, indent=2))
    print(
        f"sent {summary['sent']}  answered {summary['answered']}  lost {summary['lost']}  "
        f"duplicated {summary['duplicated']}  kills {sum(summary['kills'].values())}  "
        f"images left {summary['blobs_left']} ({summary['blobs_without_expiry']} without an expiry)"
    )
    return summary


if __name__ == "__main__":
    main()

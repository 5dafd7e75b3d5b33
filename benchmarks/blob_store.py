"""What the image store costs per job of the serving bench, each backend on this machine.

A job of ``diffserve loadtest --serving-bench --image-kb N`` takes the whole path: the light worker
stores its image and the heavy worker its own (one call per batch), the router deletes the light one
(one call per batch), the client takes the heavy one (read and delete, one call per job). This does
the same calls from one process, batch after batch, and prints per job the CPU seconds of this process
(every thread), of the store's server when it has one, and the wall time. CPU time is what a busy
machine distorts least (the serving bench's p99 criterion is at the mercy of other load).

    python benchmarks/blob_store.py [--image-kb 512] [--batches 150] [--batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from common.blobs import open_store
from common.config import RedisSettings
from common.localstack import RedisServer
from loadtest.report import cpu_seconds


async def per_job(url: str, server_pid: int | None, kb: int, batches: int, batch: int) -> tuple[float, float, float]:
    """(this process's CPU ms, the server's CPU ms, wall ms) per job."""
    store = open_store(RedisSettings(blob_url=url))
    light, heavy = os.urandom(kb * 1024), os.urandom(kb * 1024)

    async def one(n: int) -> None:
        keys = [f"job-{n}-{i}" for i in range(batch)]
        lights = await store.keep([(f"{k}.light", light, "png", "") for k in keys])
        heavies = await store.keep([(f"{k}.heavy", heavy, "png", "") for k in keys])
        await store.discard([f"{k}.light" for k in keys])
        refs = [ref for ref in heavies if not isinstance(ref, bytes)]
        taken = await asyncio.gather(*(store.read([ref], take=True) for ref in refs))
        assert len(lights) == batch and all(data is not None for (data,) in taken)

    try:
        for n in range(10):  # warm-up: connections, the thread pool
            await one(n)
        cpu, server, wall = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0, time.perf_counter()
        for n in range(batches):
            await one(10 + n)
        jobs = batches * batch
        return (
            (time.process_time() - cpu) / jobs * 1000,
            ((cpu_seconds(server_pid) - server) if server_pid else 0.0) / jobs * 1000,
            (time.perf_counter() - wall) / jobs * 1000,
        )
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-kb", type=int, default=512)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    redis = RedisServer().start()
    print(f"per job, {args.image_kb} KiB images, batches of {args.batch}: CPU ms (this process, server), wall ms")
    try:
        with tempfile.TemporaryDirectory(prefix="blob-bench-", dir=shm) as root:
            for name, url, pid in (
                ("redis", redis.url, int(redis.pidfile.read_text())),
                (f"file ({'tmpfs' if shm else 'temp dir'})", f"file://{root}", None),
            ):
                mine, server, wall = asyncio.run(per_job(url, pid, args.image_kb, args.batches, args.batch))
                print(f"{name:18} cpu {mine:6.3f} + {server:6.3f} = {mine + server:6.3f}   wall {wall:6.3f}")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()

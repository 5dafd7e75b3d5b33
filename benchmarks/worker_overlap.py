"""What overlapping a batch's image encoding with the next batch gains a light worker.

A worker's batch is the model's run (GPU time, the CPU idle) and then its tail: the PNG encoding of every
image (40-57 ms a noisy 512x512 image on the H100 host, common/data/h100/README.md) and the writes. This
runs the worker's batch cycle (common/stage.run_batch against a real redis-server) with a model that
sleeps the profiled batch time in a thread, as a GPU call does, and returns noisy 512x512 images that the
worker's EncoderPool encodes to PNG: once with each tail awaited before the next batch (no overlap), once
with the tail running while the model runs the next batch (``Overlap``, what the worker does). Prints the
images a second of each and their ratio, measured in the one run.

    python benchmarks/worker_overlap.py [--batch 16] [--batches 12] [--hardware h100] [--encode-threads 4]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from PIL import Image

from common.config import Keys, RedisSettings
from common.imaging import EncoderPool
from common.localstack import RedisServer
from common.profiles import load_cascade_profile
from common.stage import Outputs, Overlap, Processed, run_batch
from common.streams import StreamConsumer, add, connect


def noisy_images(n: int, size: int = 512) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


async def images_per_s(url: str, batch: int, batches: int, model_s: float, threads: int, overlapped: bool) -> float:
    r = connect(RedisSettings(redis_url=url))
    stream = f"bench:{'overlap' if overlapped else 'serial'}"
    consumer = StreamConsumer(r, stream, "workers", "w")
    await consumer.ensure_group()
    for i in range(batch * batches):
        await add(r, stream, f"job {i}".encode())
    encoder, images = EncoderPool(threads), noisy_images(batch)

    async def process(_entries: list, jobs: list[str]) -> Processed:
        await asyncio.to_thread(time.sleep, model_s)  # the model: GPU time, the CPU free

        async def tail() -> Outputs:
            futures = encoder.submit(images[: len(jobs)], [("png", 0)] * len(jobs))
            encoded = [await asyncio.wrap_future(f) for f in futures]
            return [(f"{stream}:out", e.data or b"") for e in encoded]

        return Processed(tail=tail)

    overlap = Overlap() if overlapped else None
    start = time.perf_counter()
    done = 0
    while done < batch * batches:
        done += len(
            await run_batch(
                consumer,
                batch,
                bytes.decode,
                process,
                keys=Keys("bench"),
                service="worker",
                job_of=lambda j: j,
                overlap=overlap,
            )
        )
    if overlap is not None:
        await overlap.drain()
    seconds = time.perf_counter() - start
    encoder.close()
    await r.aclose()
    return done / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--hardware", default="h100", choices=("a100", "h100"))
    parser.add_argument("--encode-threads", type=int, default=4)
    args = parser.parse_args(argv)
    model_s = load_cascade_profile("sdturbo-sdv15", args.hardware).light.latency_ms(args.batch) / 1000
    server = RedisServer().start()
    try:
        serial = asyncio.run(images_per_s(server.url, args.batch, args.batches, model_s, args.encode_threads, False))
        overlapped = asyncio.run(images_per_s(server.url, args.batch, args.batches, model_s, args.encode_threads, True))
    finally:
        server.stop()
    model_only = args.batch / model_s
    print(
        f"light batch {args.batch}, model {model_s * 1000:.0f} ms ({args.hardware} profile): {model_only:.1f} images/s"
    )
    print(f"  encode after each batch:     {serial:.1f} images/s ({serial / model_only:.2f} of the model's)")
    print(f"  encode during the next one:  {overlapped:.1f} images/s ({overlapped / model_only:.2f} of the model's)")
    print(f"  overlap / serial: {overlapped / serial:.2f}x")


if __name__ == "__main__":
    main()

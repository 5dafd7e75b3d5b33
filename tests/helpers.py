"""Small test utilities shared by several test modules."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from common.client import Client
from common.messages import FinalResult


async def submit_all(redis_url: str, prompts: list[str], *, rate: float = 0.0, timeout: float = 120.0,
                     **kwargs) -> list[FinalResult]:
    """Submit every prompt (optionally paced at ``rate``/s) and return every result."""
    async with Client(redis_url=redis_url) as client:
        async def one(i: int, prompt: str) -> FinalResult:
            if rate:
                await asyncio.sleep(i / rate)
            return await client.submit(prompt, timeout=timeout, **kwargs)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def count_results_in_stream(redis_url: str, stream: str) -> int:
    r = aioredis.from_url(redis_url)
    try:
        return await r.xlen(stream)
    finally:
        await r.aclose()

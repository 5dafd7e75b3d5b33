"""What the opt-in end-to-end harnesses share (``make compose-test``: compose/compose_test.py, ``make
chart-smoke``: compose/helm/chart_smoke.py): each runs a real stack on loopback, sends it jobs and checks
that every one is answered exactly once with a decodable image.  ``name`` is the harness's, the prefix of
its output lines."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import cast

import redis
from PIL import Image

from common.client import Client
from common.config import Keys
from common.messages import FinalResult


def log(name: str, msg: str) -> None:
    print(f"{name}: {msg}", flush=True)


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def install_missing(name: str, needed: dict[str, str]) -> None:
    """apt-get install the package of each tool (``needed``: tool -> Debian package) not on the PATH."""
    packages = [pkg for tool, pkg in needed.items() if not shutil.which(tool)]
    if subprocess.run(["/usr/bin/python3", "-m", "pip", "--version"], capture_output=True).returncode != 0:
        packages.append("python3-pip")  # build-offline.sh resolves the wheelhouse with Debian's Python
    if not packages:
        return
    log(name, f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            raise SystemExit(
                f"{name}: {' '.join(cmd[:3])} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )


def check_result(result: FinalResult | None, job_id: str, problems: list[str]) -> bool:
    """Whether ``result`` is an answer with an image that decodes; if not, why in ``problems``."""
    if result is None:
        problems.append(f"{job_id}: no answer")
        return False
    if result.status != "ok":
        problems.append(f"{job_id}: {result.error_code} {result.error_message}")
        return False
    try:
        Image.open(io.BytesIO(result.image or b"")).load()
    except Exception as exc:  # any decoding failure is a test failure, reported with the job
        problems.append(f"{job_id}: image does not decode ({exc})")
        return False
    return True


def list_answers(r: redis.Redis, keys: Keys, job_ids: list[str], timeout: float, problems: list[str]) -> int:
    """Answers pushed to the result lists (jobs sent with plain fields, no reply stream): each exactly once."""
    answered, deadline = 0, time.monotonic() + timeout
    for job_id in job_ids:
        while r.llen(keys.result(job_id)) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        entries = cast(list[bytes], r.lrange(keys.result(job_id), 0, -1))  # the harnesses' clients leave replies raw
        if len(entries) > 1:
            problems.append(f"{job_id}: answered {len(entries)} times")
        answered += check_result(FinalResult.decode(entries[0]) if entries else None, job_id, problems)
    return answered


def pending_of(r: redis.Redis, stream: str, consumer: str) -> int:
    """Entries of ``stream`` that ``consumer`` has read and not acknowledged, over all its groups."""
    return sum(
        int(c["pending"])
        for group in r.xinfo_groups(stream)
        for c in r.xinfo_consumers(stream, group["name"])
        if c["name"].decode() == consumer
    )


def through_client(url: str, n: int, problems: list[str]) -> int:
    """``n`` prompts through the Python client (its reply streams): how many came back with a good image."""

    async def submit() -> list[FinalResult]:
        async with Client(redis_url=url) as client:
            return await client.submit_many([f"a watercolor fox {i}" for i in range(n)], timeout=120)

    results = asyncio.run(submit())
    answered = sum(check_result(res, res.job_id, problems) for res in results)
    if len({res.job_id for res in results}) != n:
        problems.append("the client got duplicate or missing job ids")
    return answered


def enqueue(url: str, n: int) -> list[str]:
    """A burst of ``n`` jobs sent through the client without waiting (answers on the result lists): their ids."""

    async def send() -> list[str]:
        async with Client(redis_url=url) as client:
            return [await client.enqueue(f"a city in the rain {i}", reply=False) for i in range(n)]

    return asyncio.run(send())


def report(name: str, started: float, summary: dict[str, str], problems: list[str], workdir: Path) -> int:
    """Prints the summary, the first problems and the verdict line; the exit status (0: no problem)."""
    ok = not problems
    log(name, "summary")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    for problem in problems[:20]:
        print(f"  FAIL {problem}")
    print(
        f"{name}: {'PASS' if ok else 'FAIL'} in {time.monotonic() - started:.0f} s "
        f"({summary.get('jobs', 'no jobs run')}; logs in {workdir})"
    )
    return 0 if ok else 1

"""Router memory with a burst of oversized job entries (issue 14.5).

    python benchmarks/router_memory.py [--entries 128] [--mib 4] [--json out.json]

Starts a local stack without workers (its own redis-server, a router, a discriminator), puts
``--entries`` job entries of ``--mib`` MiB each on the jobs stream in one pipeline (half msgpack
jobs, half plain fields), waits until the router has read and acked every one, and prints the
router's resident memory (``/proc/<pid>/status``) before, at its peak (VmHWM, which includes its
start) and after, and what the entries got: error codes, and dead letters for entries whose job id
could not be read. Every entry is over ``--max-entry-bytes`` (64 KiB), so each must be answered
``invalid_request``; the router reads entries over the limit as stubs (common/streams.py
``BOUNDED_READ``), so its memory must not grow with the burst.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Keys  # noqa: E402
from common.localstack import LocalStack, StackSpec  # noqa: E402
from common.messages import FinalResult  # noqa: E402


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _all_done(r: redis.Redis, keys: Keys, entries: int) -> bool:
    """The router has read and acked every entry (answered each, or dead-lettered it)."""
    (group,) = [g for g in r.xinfo_groups(keys.jobs) if g["name"] == b"router"]
    return group["entries-read"] >= entries and group["pending"] == 0


def measure(entries: int, mib: float, timeout_s: float = 120.0) -> dict:
    keys = Keys()
    with LocalStack(StackSpec(light_workers=0, heavy_workers=0), tempfile.mkdtemp(prefix="router-memory-")) as stack:
        r = redis.Redis.from_url(stack.redis_url, socket_timeout=None)
        pid = stack.procs["router"].pid
        time.sleep(1.0)  # settled after start
        before = _status_mb(pid, "VmRSS")
        padding = "x" * int(mib * 1024 * 1024)
        pipe = r.pipeline(transaction=False)
        for i in range(entries):
            if i % 2:
                pipe.xadd(keys.jobs, {"job_id": f"big-{i}", "prompt": padding})
            else:
                pipe.xadd(
                    keys.jobs, {"m": msgpack.packb({"v": 1, "type": "job", "job_id": f"big-{i}", "prompt": padding})}
                )
        pipe.execute()
        del padding, pipe
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not _all_done(r, keys, entries):
            time.sleep(0.1)
        codes: Counter[str] = Counter()
        for i in range(entries):
            raw = r.lpop(keys.result(f"big-{i}"))
            codes[FinalResult.decode(raw).error_code if raw else "no answer"] += 1
        codes["dead letters"] = r.xlen(keys.dead_letters)
        result = {
            "entries": entries,
            "entry_mib": mib,
            "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(_status_mb(pid, "VmHWM"), 1),
            "rss_after_mb": round(_status_mb(pid, "VmRSS"), 1),
            "codes": dict(codes),
        }
        r.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=128)
    p.add_argument("--mib", type=float, default=4.0)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    result = measure(args.entries, args.mib)
    print(
        f"{args.entries} entries of {args.mib:g} MiB: router RSS {result['rss_before_mb']} MB before, "
        f"peak {result['rss_peak_mb']} MB, {result['rss_after_mb']} MB after; answers {result['codes']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

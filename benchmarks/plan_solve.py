"""Median planner solve time (MILP build + CBC solve) for clusters of 16, 128 and 1024
workers, at a light, a medium and an overloaded demand per worker; then what the controller's replay
(common/replay.py: the threshold and heavy batch re-chosen over the recent arrivals) costs per interval
for windows of 500, 1,000 and 4,000 arrivals (its cap).

    python benchmarks/plan_solve.py [--repeats 5] [--cascade sdturbo-sdv15] [--hardware a100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.planner import OBJECTIVES, plan, warm_up  # noqa: E402
from common.profiles import CascadeProfile, load_cascade_profile  # noqa: E402
from common.replay import Candidate, Replay, search  # noqa: E402

SIZES = (16, 128, 1024)
LOAD_PER_WORKER = (0.25, 1.0, 25.0)  # queries/s per worker: plenty, tight, more than the cluster can do


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cascade", default="sdturbo-sdv15")
    p.add_argument("--hardware", default="a100")
    p.add_argument("--objective", default="quality", choices=OBJECTIVES)
    args = p.parse_args(argv)
    profile = load_cascade_profile(args.cascade, args.hardware)
    warm_up()
    print(f"{args.cascade} on {args.hardware}, objective {args.objective}, {args.repeats} repeats per point")
    print(
        f"{'workers':>8} {'demand':>8} {'t':>5} {'light':>6} {'heavy':>6} {'feasible':>8} "
        f"{'solve ms':>9} {'plan ms':>8}"
    )
    for workers in SIZES:
        all_solves = []
        for load in LOAD_PER_WORKER:
            demand = workers * load
            results = [plan(profile, demand, workers, objective=args.objective) for _ in range(args.repeats)]
            solves = [r.solve_ms for r in results]
            all_solves += solves
            r = results[-1]
            print(
                f"{workers:>8} {demand:>8g} {r.threshold:>5.2f} {r.light_workers:>6} {r.heavy_workers:>6} "
                f"{str(r.feasible):>8} {statistics.median(solves):>9.1f} "
                f"{statistics.median(x.plan_ms for x in results):>8.1f}"
            )
        print(f"S={workers}: median solve {statistics.median(all_solves):.1f} ms")
    replay_cost(profile, args.repeats)


def replay_cost(profile: CascadeProfile, repeats: int) -> None:
    """The replay as the controller runs it: three confidence draws, every threshold within 0.1 of the plan's,
    the heavy batches that fit the SLO, on a cluster whose heavy stage is the bottleneck (8 workers)."""
    print(f"{'arrivals':>8} {'plans':>6} {'search ms':>10} {'us/job/plan':>12}")
    for jobs in (500, 1000, 4000):
        arrivals = [i * 120_000.0 / jobs for i in range(jobs)]  # the default 120-s window
        base = Candidate(threshold=0.1, light_workers=2, light_batch=16, heavy_workers=6, heavy_batch=2)
        times, tried = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            replay = Replay(arrivals, profile=profile, latency_scale=1.0, slo_ms=profile.slo_ms, draws=3)
            _best, tried = search(
                replay,
                base,
                thresholds=[round(0.01 * i, 2) for i in range(21)],
                light_batches=[16],
                heavy_batches=[1, 2],
            )
            times.append((time.perf_counter() - start) * 1000)
        ms = statistics.median(times)
        print(f"{jobs:>8} {tried:>6} {ms:>10.1f} {1000 * ms / (jobs * tried * 3):>12.2f}")


if __name__ == "__main__":
    main()

"""Median planner solve time (MILP build + CBC solve) for clusters of 16, 128 and 1024
workers, at a light, a medium and an overloaded demand per worker.

    python benchmarks/plan_solve.py [--repeats 5] [--cascade sdturbo-sdv15] [--hardware a100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.planner import OBJECTIVES, plan, warm_up  # noqa: E402
from common.profiles import load_cascade_profile  # noqa: E402

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


if __name__ == "__main__":
    main()

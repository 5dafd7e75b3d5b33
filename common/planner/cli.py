"""``diffserve plan``: print the plan the solver would choose, without Redis."""

from __future__ import annotations

import argparse
import json
import sys

from common.messages import Policy
from common.planner.policies import OBJECTIVES, POLICIES, FixedPlan
from common.planner.result import PlanResult
from common.planner.solve import SOLVERS, plan
from common.profiles import QualityCurve


def _table(result: PlanResult, quality: QualityCurve | None = None) -> str:
    lat = result.latency
    q = "-" if result.estimated_quality is None else f"{result.estimated_quality:.2f}"
    if quality is not None and result.estimated_quality is not None:  # say what the number is
        q = f"{quality.metric.upper()} {q} ({'lower' if quality.lower_is_better else 'higher'} is better)"
    rows = [
        ("policy / objective", f"{result.policy} / {result.objective}"),
        ("feasible", str(result.feasible)),
        (
            "threshold",
            f"{result.threshold:.2f}"
            + (f"  (heavy fraction {result.heavy_fraction:.2f})" if result.heavy_fraction else ""),
        ),
        ("light share", f"{result.light_share:.3f}   estimated quality {q}"),
        ("light workers x batch", f"{result.light_workers} x {result.light_batch}"),
        ("heavy workers x batch", f"{result.heavy_workers} x {result.heavy_batch}"),
        ("latency light/disc/heavy", f"{lat.light_ms:.0f} / {lat.discriminator_ms:.0f} / {lat.heavy_ms:.0f} ms"),
        ("queue light/heavy", f"{lat.light_queue_ms:.0f} / {lat.heavy_queue_ms:.0f} ms"),
        ("total / SLO", f"{lat.total_ms:.0f} / {result.slo_ms:.0f} ms"),
        ("demand / workers", f"{result.demand_qps:g} qps / {result.workers}"),
        ("solve", f"{result.solve_ms:.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {n}" for n in result.notes])


def plan_main(argv: list[str] | None = None) -> None:
    """``diffserve plan``: print the plan the solver would choose, without Redis."""
    from common.cascades import CASCADES, DEFAULT_CASCADE
    from common.profiles import DEFAULT_HARDWARE, HARDWARE, load_cascade_profile

    p = argparse.ArgumentParser(prog="diffserve plan", description=plan_main.__doc__)
    p.add_argument("--demand", type=float, required=True, help="queries per second")
    p.add_argument("--workers", type=int, required=True, help="workers (GPUs)")
    p.add_argument("--cascade", default=DEFAULT_CASCADE, choices=sorted(CASCADES))
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, choices=sorted(HARDWARE))
    p.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVES,
        help="default: quality where the cascade has a quality curve, else threshold",
    )
    p.add_argument("--policy", default=Policy.DIFFSERVE, choices=POLICIES, type=Policy)
    p.add_argument("--slo-ms", type=float, default=None, help="default: the cascade's")
    p.add_argument(
        "--light-demand", type=float, default=None, help="demand the light stage is provisioned for (default: --demand)"
    )
    p.add_argument(
        "--fixed-plan",
        default=None,
        metavar="t=0.02,light=4x16,heavy=12x4",
        help="evaluate this plan as given (workers x batch) instead of solving",
    )
    p.add_argument(
        "--latency-scale",
        type=float,
        default=1.0,
        help="multiply every profiled latency (time-scaled runs; scale --slo-ms too)",
    )
    p.add_argument("--latency-file", default=None, help="own batch-latency table")
    p.add_argument("--curve-file", default=None, help="own f(t) curve")
    p.add_argument("--solver", default="milp", choices=SOLVERS)
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        profile = load_cascade_profile(
            args.cascade, args.hardware, latency_file=args.latency_file, curve_file=args.curve_file, slo_ms=args.slo_ms
        )
    except ValueError as exc:
        raise SystemExit(f"diffserve plan: {exc}") from None
    try:
        fixed = FixedPlan.parse(args.fixed_plan) if args.fixed_plan else None
    except ValueError as exc:
        raise SystemExit(f"diffserve plan: {exc}") from None
    result = plan(
        profile,
        args.demand,
        args.workers,
        policy=args.policy,
        objective=args.objective,
        slo_ms=args.slo_ms,
        latency_scale=args.latency_scale,
        light_demand_qps=args.light_demand,
        fixed=fixed,
        solver=args.solver,
    )
    if args.json:
        body = result.to_dict()
        body.pop("roles", None)
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(result, profile.quality))


if __name__ == "__main__":
    plan_main()

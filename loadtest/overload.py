"""``python -m loadtest.overload``: admission by predicted wait under overload.

For each policy it starts a local stack (own redis-server, the controller on that policy, the
profiled backend in compressed time) and offers a Poisson load of ``factor`` times the stack's
capacity, then prints per row: offered, accepted, refused (``overloaded``; and how many of the
refusals carried a retry-after hint), the share of accepted jobs that met the SLO, p50/p99 latency
of accepted jobs (client-measured, full speed) and the longest queue wait seen (the largest sampled
backlog of either queue at its stage's live rate, full-speed seconds)::

    python -m loadtest.overload --policies diffserve,clipper-heavy,proteus --factors 3,10

Capacity is the planner's maximum-throughput plan for the policy on ``--workers`` workers (demand
far above what they serve): jobs per second its stages complete at full speed.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from common.cascades import cascade
from common.planner import plan, policy_spec
from common.profiles import CascadeProfile, load_cascade_profile, load_prompts
from loadtest import runner
from loadtest.report import percentiles
from loadtest.traces import generate

POLICIES = ("diffserve", "clipper-heavy", "proteus")


def capacity_qps(profile: CascadeProfile, policy: str, workers: int) -> float:
    """Jobs/s (full speed) of the policy's maximum-throughput plan on ``workers`` workers."""
    result = plan(profile, 1e6, workers, policy=policy, current={f"w{i}": "" for i in range(workers)})
    light = result.light_workers * result.light_batch * 1000 / profile.light.latency_ms(result.light_batch)
    heavy = result.heavy_workers * result.heavy_batch * 1000 / profile.heavy.latency_ms(result.heavy_batch)
    options = policy_spec(policy).options
    return {"heavy": heavy, "split": light + heavy}.get(options, light)


def max_queue_wait_s(samples: list[dict[str, Any]], profile: CascadeProfile) -> float:
    """The longest wait the sampled backlogs mean at their stage's rate (live workers, the plan's batch)."""
    worst = 0.0
    for s in samples:
        for role in ("light", "heavy"):
            queued = s.get("backlog", {}).get(role, 0)
            if not queued:
                continue
            workers = s.get("roles", {}).get(role, 0)
            batch = max(1, s.get(f"{role}_batch", 1))
            wait_ms = queued * profile.table(role).latency_ms(batch) / (workers * batch) if workers else math.inf
            worst = max(worst, wait_ms / 1000)
    return worst


def run_row(
    policy: str,
    factor: float,
    *,
    workers: int = 2,
    time_scale: float = 0.5,
    duration_s: float = 30.0,
    seed: int = 0,
    controller_interval_s: float = 1.0,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """One stack, one overload run; the row's figures (latencies and waits at full speed)."""
    profile = load_cascade_profile("sdturbo-sdv15", "a100")
    slo_ms = cascade("sdturbo-sdv15").slo_ms
    capacity = capacity_qps(profile, policy, workers)
    prompts = load_prompts()
    trace = generate("poisson", rate=factor * capacity, duration_s=duration_s, n_prompts=len(prompts), seed=seed)
    spec = runner.stack_spec(
        policy=policy,
        workers=workers,
        backend="profiled",
        cascade="sdturbo-sdv15",
        hardware="a100",
        time_scale=time_scale,
        slo_ms=slo_ms,
        controller_interval_s=controller_interval_s,
    )
    run = runner.run_policy(
        spec,
        trace,
        prompts,
        log_dir=log_dir or tempfile.mkdtemp(prefix=f"overload-{policy}-"),
        progress=False,
        drain_timeout_s=60.0,
    )
    answered = [(j, j.result, j.received_s) for j in run.jobs if j.result is not None and j.received_s is not None]
    answered = [(j, r, t) for j, r, t in answered if not j.blank_prompt]
    refused = [r for _j, r, _t in answered if r.error_code == "overloaded"]
    accepted = [(j, r, t) for j, r, t in answered if r.error_code != "overloaded"]
    met = [r for _j, r, _t in accepted if r.status == "ok" and r.slo_met]
    latencies = [(t - j.sent_s) * 1000 / time_scale for j, _r, t in accepted]
    lat = percentiles(latencies, 0)
    return {
        "policy": policy,
        "factor": factor,
        "capacity_qps": round(capacity, 2),
        "offered": sum(not j.blank_prompt for j in run.jobs),
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_with_retry_after": sum(bool(r.retry_after_ms) for r in refused),
        "lost": sum(j.result is None for j in run.jobs),
        "slo_met_share": len(met) / len(accepted) if accepted else None,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_queue_wait_s": round(max_queue_wait_s(run.plan_samples, profile), 2),
        "slo_ms": slo_ms,
    }


HEADER = (
    f"{'policy':<14}{'load':>6}{'cap q/s':>9}{'offered':>9}{'accepted':>10}{'refused':>9}{'w/ hint':>9}"
    f"{'SLO met':>9}{'p50 ms':>9}{'p99 ms':>9}{'max wait s':>12}"
)


def format_row(row: dict[str, Any]) -> str:
    share = "-" if row["slo_met_share"] is None else f"{100 * row['slo_met_share']:.1f}%"
    return (
        f"{row['policy']:<14}{row['factor']:>5g}x{row['capacity_qps']:>9.1f}{row['offered']:>9}{row['accepted']:>10}"
        f"{row['refused']:>9}{row['refused_with_retry_after']:>9}{share:>9}{row['p50_ms'] or 0:>9.0f}"
        f"{row['p99_ms'] or 0:>9.0f}{row['max_queue_wait_s']:>12.2f}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m loadtest.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--factors", default="3,10", help="offered load as multiples of capacity")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--time-scale", type=float, default=0.5, help="wall time per full-speed time")
    p.add_argument("--duration", type=float, default=30.0, help="trace length, full-speed seconds")
    p.add_argument("--controller-interval-s", type=float, default=1.0, help="re-plan interval, wall seconds")
    p.add_argument("--out", default=None, help="folder for the services' logs")
    args = p.parse_args(argv)
    rows = []
    print(
        f"{args.workers} workers, profiled backend (a100), time scale {args.time_scale:g}, "
        f"{args.duration:g} s of Poisson load per row; latencies and waits at full speed",
        flush=True,
    )
    print(HEADER, flush=True)
    for policy in [x.strip() for x in args.policies.split(",") if x.strip()]:
        for factor in [float(x) for x in args.factors.split(",") if x.strip()]:
            log_dir = str(Path(args.out) / f"{policy}-{factor:g}x") if args.out else None
            row = run_row(
                policy,
                factor,
                workers=args.workers,
                time_scale=args.time_scale,
                duration_s=args.duration,
                log_dir=log_dir,
            )
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


if __name__ == "__main__":
    main()

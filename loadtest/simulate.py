"""``diffserve simulate``: the whole cascade in virtual time, so a 6-minute trace on 16 workers
replays in seconds, with the very decision code of the live services.

What is simulated (discrete events, full-speed milliseconds): arrivals from any trace the load
tester accepts; the router (admission, and the direct routing of split policies); shared light,
discriminator and heavy queues pulled in batches of up to the plan's size by whichever worker is
free; the profiled batch latencies; the discriminator's confidences (the profiled backend's own
draw, or a recorded confidence file by line); role switches with the profiled model load times
(from host memory: workers stage the other role's model there at start); and the controller every
interval, with its watch on the light queue between intervals (a burst moves heavy workers to the
light stage at once).

What is imported, not copied: the control law (common/control.py) over the planner
(common/planner.py), the routing and deadline rules (common/routing.py), the profiled
discriminator's confidence function and load times (common/backends/profiled.py) and the load
tester's report and plots (loadtest/report.py, loadtest/plots.py).

``--time-scale X`` models a live stack run at time scale X (what ``diffserve loadtest
--time-scale X`` measures): that stack's wall-clock constants (the 0.1 s plan refresh of every
service, each service's ~1.5 ms of CPU per batch) are 1/X times longer in full-speed time.

Three uses beyond comparing policies:

- ``--search-static``: the best fixed plan in hindsight (grid over threshold x light workers x
  batch sizes, the rest of the workers heavy): best estimated quality with < 1 % SLO misses;
- capacity planning: ``--workers 8,12,16,24`` gives one row per cluster size;
- ``--seeds 1,2,3``: every row again on other draws of the trace (arrivals and prompts), and the mean
  (seeds.md, seeds.json).  The fixed plan picked in hindsight on ``--seed`` is scored on the other draws
  as it is: held out, it is what a plan chosen on past load gets, not the luckiest of a few hundred
  plans on the very draw it is scored on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.backends.profiled import load_confidence_overrides
from common.cascades import CASCADES, DEFAULT_CASCADE
from common.control import ControlSettings, static_plan
from common.planner import POLICIES, FixedPlan, Policy, warm_up
from common.profiles import DEFAULT_HARDWARE, HARDWARE, CascadeProfile, load_cascade_profile, load_prompts
from loadtest.report import summarize
from loadtest.simulation import SimConfig, simulate
from loadtest.static_search import search_static
from loadtest.traces import Trace


def build_parser() -> argparse.ArgumentParser:
    from loadtest.cli import add_trace_arguments

    p = argparse.ArgumentParser(
        prog="diffserve simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_trace_arguments(p)
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--policies", default="diffserve", help=f"comma-separated policies, one run each ({', '.join(POLICIES)})"
    )
    c.add_argument("--workers", default="16", help="workers; a comma-separated list gives one row per cluster size")
    c.add_argument("--light-workers", type=int, default=None, help="light workers at the start (default: half)")
    c.add_argument("--cascade", default=DEFAULT_CASCADE, choices=sorted(CASCADES))
    c.add_argument("--hardware", default=DEFAULT_HARDWARE, choices=sorted(HARDWARE))
    c.add_argument("--slo-ms", type=float, default=None, help="SLO (default: the cascade's)")
    c.add_argument(
        "--confidence-file",
        default=None,
        help="`prompt_index,confidence` lines: the discriminator's confidence per prompt line",
    )
    c.add_argument(
        "--static-plan",
        default=None,
        metavar="t=0.02,light=4x16,heavy=12x4",
        help="the static policy's fixed plan; default: the solver's plan for the trace's mean demand",
    )
    c.add_argument(
        "--controller-interval-s", type=float, default=SimConfig.interval_s, help="re-plan interval (full-speed s)"
    )
    c.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="model a live stack run at this time scale (its wall-clock constants, e.g. the 0.1 s "
        "plan refresh, are 1/X longer at full speed); 1 = a real deployment",
    )
    c.add_argument(
        "--search-static",
        action="store_true",
        help="also find the best fixed plan in hindsight (grid over threshold x light workers x batch "
        "sizes; best estimated quality with < 1 %% SLO misses) and add it as 'static-hindsight'",
    )
    c.add_argument(
        "--seeds",
        default=None,
        metavar="1,2,3",
        help="also run every row on these trace seeds (synthetic traces) and report each row's mean over "
        "--seed and them (seeds.md, seeds.json); static-hindsight keeps the plan it picked on --seed",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out/simulate", help="output folder (report.json, summary.md, plots)")
    o.add_argument("--no-plots", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    from loadtest import report as report_mod
    from loadtest.cli import load_trace
    from loadtest.traces import write_trace

    args = build_parser().parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    try:
        sizes = [int(x) for x in args.workers.split(",") if x.strip()]
        fixed = FixedPlan.parse(args.static_plan) if args.static_plan else None
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else []
    except ValueError as exc:
        raise SystemExit(f"diffserve simulate: {exc}") from None
    if seeds and args.trace_file:
        raise SystemExit("diffserve simulate: --seeds draws synthetic traces; a --trace-file has no seed")
    profile = load_cascade_profile(args.cascade, args.hardware)
    slo_ms = args.slo_ms or profile.slo_ms
    prompts = load_prompts(args.prompts)
    trace = load_trace(args, len(prompts))
    overrides = load_confidence_overrides(args.confidence_file) if args.confidence_file else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_trace(trace, out / "trace.csv")
    warm_up()
    print(
        f"trace {trace.name}: {len(trace)} queries over {trace.duration_s:g} s (mean {trace.mean_rate:.1f} q/s); "
        f"SLO {slo_ms:g} ms; workers {args.workers}; policies {', '.join(policies)}",
        flush=True,
    )
    run = Run(args=args, profile=profile, trace=trace, prompts=prompts, slo_ms=slo_ms, overrides=overrides, out=out)
    entries = []
    picked: dict[int, tuple[str, str]] = {}  # size -> the static-hindsight row's name and plan
    for size in sizes:
        named = len(sizes) > 1
        entries += [run.policy(Policy(policy), size, fixed, named) for policy in policies]
        if args.search_static:
            entries.append(run.static_search(size, named))
            picked[size] = (entries[-1]["policy"], entries[-1]["static_plan"])
    meta = {
        "trace": trace.name,
        "trace_params": trace.params,
        "sent": len(trace),
        "duration_s": trace.duration_s,
        "backend": "profiled",
        "simulated": True,
        "cascade": args.cascade,
        "hardware": args.hardware,
        "workers": args.workers,
        "time_scale": args.time_scale,
        "slo_ms": slo_ms,
        "seed": args.seed,
        "prompts": args.prompts,
        "confidence_file": args.confidence_file,
        "policies": policies,
        "controller_interval_s": args.controller_interval_s,
        "units": "virtual full-speed time (simulation)",
    }
    report_mod.publish(out, entries, meta, plots=not args.no_plots)
    if seeds:
        other_seeds(run, entries, seeds, sizes, policies, fixed, picked)


def other_seeds(
    first: Run,
    entries: list[dict[str, Any]],
    seeds: list[int],
    sizes: list[int],
    policies: list[str],
    fixed: FixedPlan | None,
    picked: dict[int, tuple[str, str]],
) -> None:
    """Every row of ``entries`` (run on ``first``'s trace) again on each of ``seeds``' draws of the trace, the
    fixed plans picked in hindsight (``picked``: size -> row name, plan) kept as they are; writes seeds.json
    and seeds.md and prints the table."""
    from loadtest.cli import load_trace

    args = first.args
    named = len(sizes) > 1
    scores: dict[str, dict[int, dict[str, float]]] = {e["policy"]: {args.seed: _score(e)} for e in entries}
    for seed in seeds:
        if seed == args.seed:
            continue
        trace = load_trace(argparse.Namespace(**{**vars(args), "seed": seed}), len(first.prompts))
        run = dataclasses.replace(first, trace=trace, seed=seed)
        for size in sizes:
            rows = [run.policy(Policy(policy), size, fixed, named) for policy in policies]
            if size in picked:
                rows.append(run.fixed(picked[size][1], size, picked[size][0]))
            for e in rows:
                scores[e["policy"]][seed] = _score(e)
    order = [args.seed] + [s for s in seeds if s != args.seed]
    summary = {
        "seeds": order,
        "picked_on_seed": args.seed,
        "static_plans": {name: plan for name, plan in picked.values()},
        "rows": {
            name: {
                "per_seed": {str(s): per[s] for s in order},
                "mean_estimate": _mean([per[s]["estimate"] for s in order]),
                "mean_slo_violation_ratio": _mean([per[s]["slo_violation_ratio"] for s in order]),
            }
            for name, per in scores.items()
        },
    }
    (first.out / "seeds.json").write_text(json.dumps(summary, indent=1))
    head = "| row | " + " | ".join(f"seed {s}" for s in order) + " | mean | SLO miss (mean) |"
    lines = [head, "|---|" + "---:|" * (len(order) + 2)]
    for name, row in summary["rows"].items():
        cells = [f"{row['per_seed'][str(s)]['estimate']:.3f}" for s in order]
        mean = row["mean_estimate"]
        miss = row["mean_slo_violation_ratio"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {100 * miss:.2f} % |")
    table = "\n".join(lines)
    note = f"FID est. per trace seed; static-hindsight rows keep the plan picked on seed {args.seed}."
    (first.out / "seeds.md").write_text(f"{table}\n\n{note}\n")
    print(f"\n{table}\n\n{note}", flush=True)


def _score(entry: dict[str, Any]) -> dict[str, float]:
    return {"estimate": entry["quality"].get("estimate"), "slo_violation_ratio": entry["slo_violation_ratio"]}


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4)


@dataclass(frozen=True, kw_only=True)
class Run:
    """One ``diffserve simulate`` invocation: what every simulated run of it shares."""

    args: argparse.Namespace
    profile: CascadeProfile
    trace: Trace
    prompts: list[str]
    slo_ms: float
    overrides: dict[int, float] | None
    out: Path
    seed: int | None = None  # another trace seed than --seed (--seeds): its runs are printed with it

    def policy(self, policy: Policy, size: int, fixed: FixedPlan | None, named: bool) -> dict[str, Any]:
        """One policy on ``size`` workers; static's fixed plan is the one given, else the solver's for the
        trace's mean demand."""
        started = time.perf_counter()
        static = fixed or static_plan(self.profile, self.trace.mean_rate, size, ControlSettings(slo_ms=self.slo_ms))
        cfg = SimConfig(
            policy=policy,
            workers=size,
            slo_ms=self.slo_ms,
            light_workers=self.args.light_workers,
            interval_s=self.args.controller_interval_s,
            time_scale=self.args.time_scale,
            fixed_plan=static,
        )
        name = f"{policy} ({size} workers)" if named else policy
        e = self._entry(cfg, name)
        print(
            f"  {self._on_seed()}{name}: SLO miss {100 * e['slo_violation_ratio']:.2f} %, "
            f"p99 {e['latency_ms']['p99']} ms, heavy share {e['heavy_share']}, "
            f"FID est. {e['quality'].get('estimate')}, degraded {e['degraded']} "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        return e

    def static_search(self, size: int, named: bool) -> dict[str, Any]:
        """The best fixed plan in hindsight on ``size`` workers (loadtest/static_search.py), run."""
        started = time.perf_counter()
        rows = search_static(
            self.profile,
            self.trace,
            self.prompts,
            workers=size,
            slo_ms=self.slo_ms,
            time_scale=self.args.time_scale,
            overrides=self.overrides,
        )
        (self.out / f"static_search_{size}.json").write_text(json.dumps(rows, indent=1))
        name = f"static-hindsight ({size} workers)" if named else "static-hindsight"
        e = self._entry(self._fixed_config(rows[0]["plan"], size), name)
        e["static_plan"] = rows[0]["plan"]
        print(
            f"  {name}: best of {len(rows)} fixed plans {rows[0]['plan']}: SLO miss "
            f"{100 * rows[0]['slo_violation_ratio']:.2f} %, FID est. {rows[0]['fid']} "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        return e

    def fixed(self, plan: str, size: int, name: str) -> dict[str, Any]:
        """``plan`` (a fixed plan's text) run as it is on ``size`` workers, reported as ``name``."""
        e = self._entry(self._fixed_config(plan, size), name)
        print(f"  {self._on_seed()}{name}: {plan}, FID est. {e['quality'].get('estimate')}", flush=True)
        return e

    def _fixed_config(self, plan: str, size: int) -> SimConfig:
        return SimConfig(
            policy=Policy.STATIC,
            workers=size,
            slo_ms=self.slo_ms,
            light_workers=self.args.light_workers,
            time_scale=self.args.time_scale,
            fixed_plan=FixedPlan.parse(plan),
        )

    def _on_seed(self) -> str:
        return "" if self.seed is None else f"seed {self.seed}: "

    def _entry(self, cfg: SimConfig, name: str) -> dict[str, Any]:
        seed = self.args.seed if self.seed is None else self.seed
        run = simulate(self.profile, self.trace, self.prompts, cfg, overrides=self.overrides, seed=seed)
        entry = summarize(
            run, slo_ms=self.slo_ms, backend="profiled", curve=self.profile.quality, confidence_curve=self.profile.curve
        )
        entry["policy"] = name
        return entry


if __name__ == "__main__":
    main(sys.argv[1:])

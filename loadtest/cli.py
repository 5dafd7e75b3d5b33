"""``diffserve loadtest`` / ``python -m loadtest``: replay a trace against DiffServe and report.

Without ``--redis-url`` it starts the whole local stack (a fresh redis-server, router,
discriminator, workers and controller) once per policy in ``--policies`` and replays the
same trace against each, so one command gives a side-by-side comparison::

    diffserve loadtest --trace bursty --duration 120 --time-scale 0.25 --workers 16 \\
        --policies diffserve,diffserve-threshold,static,proteus,clipper-light,clipper-heavy \\
        --backend profiled --out out/compare

With ``--redis-url`` it drives an already-running deployment once (no stack started).
``--policies none`` runs the stack with fixed roles (half light, half heavy) and no controller.
``--serving-bench`` runs :mod:`loadtest.serving_bench` instead (its own flags follow);
``--gateway-bench`` runs :mod:`loadtest.gateway_bench` (the HTTP gateway over the direct client),
``--gateway-abuse`` :mod:`loadtest.gateway_abuse` (its memory and fairness under abuse).

Outputs in ``--out``: report.json, summary.md, the plots (PNG), trace.csv, jobs/<policy>.csv (one line
per job) and logs/<policy>/ (service logs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import stackfile
from common.backends import BackendSettings, load_profile
from common.config import RedisSettings, WorkerRegistrySettings
from common.control import ControlSettings, static_plan
from common.planner import POLICIES
from common.profiles import PROMPTS_FILE, load_prompts
from loadtest import report as report_mod
from loadtest.traces import DEFAULT_RATE, TRACES, Trace, generate, read_trace, write_trace

if TYPE_CHECKING:
    from loadtest.runner import RunRecord

LOCAL_STACK = "local"  # --redis-url without a value: the stack `diffserve up` recorded
STACK_BACKEND_OPTIONS = ("backend", "cascade", "hardware", "model_dir")


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    """The trace flags ``diffserve loadtest`` and ``diffserve simulate`` share."""
    t = p.add_argument_group("trace")
    t.add_argument("--trace", choices=TRACES, default="poisson", help="synthetic trace kind (default poisson)")
    t.add_argument(
        "--rate",
        type=float,
        default=None,
        help="q/s at full speed: the constant rate (poisson) or the peak (step, ramp, bursty); "
        f"defaults {DEFAULT_RATE}",
    )
    t.add_argument(
        "--low-rate", type=float, default=None, help="low rate of step/ramp/bursty (default: rate/4, rate/8, rate/8)"
    )
    t.add_argument("--duration", type=float, default=60.0, help="trace length in full-speed seconds")
    t.add_argument("--trace-file", default=None, help="replay this file of `arrival_ms,prompt_index` lines")
    t.add_argument(
        "--prompts", default=str(PROMPTS_FILE), help="prompt file, one per line (default: 5000 DiffusionDB prompts)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace and prompt draw")


def load_trace(args: argparse.Namespace, n_prompts: int) -> Trace:
    if args.trace_file:
        return read_trace(args.trace_file, n_prompts)
    return generate(
        args.trace,
        rate=args.rate,
        duration_s=args.duration,
        low_rate=args.low_rate,
        n_prompts=n_prompts,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffserve loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_trace_arguments(p)
    s = p.add_argument_group("stack")
    s.add_argument(
        "--policies",
        default="diffserve",
        help="comma-separated controller policies, one run each "
        f"({', '.join(POLICIES)}; none: fixed roles, no controller)",
    )
    s.add_argument("--workers", type=int, default=8, help="workers of each run (the controller splits them)")
    s.add_argument("--light-workers", type=int, default=None, help="initial light workers (default: half)")
    # The services' own options (env and default as theirs): the stack runs with what they say.
    BackendSettings.add_arguments(s, only=STACK_BACKEND_OPTIONS)
    s.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="replay X times real time: arrivals, profiled latencies and the SLO are all multiplied "
        "by X (0.05 = 20x faster); reported latencies are converted back to full speed",
    )
    s.add_argument("--slo-ms", type=float, default=None, help="SLO at full speed (default: the cascade's)")
    s.add_argument(
        "--static-plan",
        default=None,
        metavar="t=0.02,light=4x16,heavy=12x4",
        help="the static policy's fixed plan (workers x batch); default: the solver's plan for the trace's mean demand",
    )
    s.add_argument(
        "--confidence-file", default=None, help="`prompt_index,confidence` lines the profiled discriminator replays"
    )
    s.add_argument(
        "--controller-interval-s",
        type=float,
        default=None,
        help="controller re-plan interval in wall seconds (passed as --interval-s; default: the "
        "controller's 10 s x time scale, at least 0.25 s, when time-scaled)",
    )
    s.add_argument(
        "--sample-interval-s",
        type=float,
        default=None,
        help="plan sampling interval in wall seconds (default 0.5 x time scale, 0.1..0.5)",
    )
    s.add_argument(
        "--redis-url",
        nargs="?",
        const=LOCAL_STACK,
        default=None,
        help="drive this running deployment instead (one run, no stack started; REDIS_USERNAME, REDIS_PASSWORD, "
        "REDIS_TLS_* as for the services); alone, the stack `diffserve up` recorded. Its live workers are "
        "counted (--workers is ignored)",
    )
    RedisSettings.add_arguments(s, only=("namespace",))
    o = p.add_argument_group("run and output")
    o.add_argument("--out", default="out/loadtest", help="output folder")
    o.add_argument(
        "--drain-timeout-s",
        type=float,
        default=120.0,
        help="wall seconds to wait for outstanding results after the last send",
    )
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _policies(args: argparse.Namespace) -> list[str]:
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICIES + ("none",)]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICIES)}, none")
    if args.redis_url:
        return policies[:1] or ["unknown"]
    if any(x != "none" for x in policies) and importlib.util.find_spec("services.controller") is None:
        raise SystemExit("services/controller.py is not available: use --policies none (fixed roles)")
    return policies


async def _live_workers(settings: RedisSettings) -> int:
    """The deployment's live workers; exits with one line when no router serves it (or no Redis is there)."""
    from common.client import Client, preflight
    from common.plan_store import live_roles

    async with Client(settings) as client:
        problem = await preflight(client, settings.redis_url)
        if problem:
            raise SystemExit(f"diffserve loadtest: {problem}")
        return len(
            await live_roles(client.redis, client.keys, WorkerRegistrySettings.from_namespace().worker_timeout_s)
        )


SUB_TOOLS = {"--serving-bench": "serving_bench", "--gateway-abuse": "gateway_abuse", "--gateway-bench": "gateway_bench"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, module in SUB_TOOLS.items():
        if flag in argv:  # a tool of its own, with its own flags
            argv.remove(flag)
            importlib.import_module(f"loadtest.{module}").main(argv)
            return
    args = build_parser().parse_args(argv)
    backend = BackendSettings.from_namespace(args)
    for name in STACK_BACKEND_OPTIONS:  # resolved (flag, env, default) as the services resolve them
        setattr(args, name, getattr(backend, name))
    args.namespace = RedisSettings.from_namespace(args).namespace
    if args.time_scale <= 0:
        raise SystemExit("--time-scale must be > 0")
    deployment = _deployment(args)
    if deployment is not None:
        args.workers = asyncio.run(_live_workers(deployment))  # the stack's, not the flag's
    policies = _policies(args)
    from common.cascades import cascade

    slo_ms = args.slo_ms or cascade(args.cascade).slo_ms
    prompts = load_prompts(args.prompts)
    trace = load_trace(args, len(prompts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_trace(trace, out / "trace.csv")
    profile = load_profile(backend)
    print(
        f"trace {trace.name}: {len(trace)} queries over {trace.duration_s:g} s (mean {trace.mean_rate:.1f} q/s) "
        f"at time scale {args.time_scale:g} -> ~{trace.duration_s * args.time_scale:.1f} s wall per run; "
        f"SLO {slo_ms:g} ms (wall {slo_ms * args.time_scale:g} ms); policies: {', '.join(policies)}",
        flush=True,
    )
    # static's fixed plan: the one given, else the solver's for the trace's mean demand (the simulator's too)
    static = args.static_plan or str(
        static_plan(profile, trace.mean_rate, args.workers, ControlSettings(slo_ms=slo_ms))
    )
    entries = []
    for policy in policies:
        started = time.perf_counter()
        run = _run(args, policy, deployment, trace, prompts, slo_ms=slo_ms, static=static, out=out)
        entry = report_mod.summarize(
            run, slo_ms=slo_ms, backend=args.backend, curve=profile.quality, confidence_curve=profile.curve
        )
        report_mod.write_jobs_csv(run, out / "jobs" / f"{policy}.csv")
        entries.append(entry)
        q = entry["quality"].get("estimate")
        print(
            f"  {policy}: SLO miss {100 * entry['slo_violation_ratio']:.1f} %, p99 {entry['latency_ms']['p99']} ms, "
            f"heavy share {entry['heavy_share']}, quality {q}, lost {entry['lost']}, dup {entry['duplicates']} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    meta = {
        "trace": trace.name,
        "trace_params": trace.params,
        "sent": len(trace),
        "duration_s": trace.duration_s,
        "backend": args.backend,
        "cascade": args.cascade,
        "hardware": profile.hardware,
        "workers": args.workers,
        "time_scale": args.time_scale,
        "slo_ms": slo_ms,
        "seed": args.seed,
        "prompts": args.prompts,
        "confidence_file": args.confidence_file,
        "redis_url": bool(args.redis_url),
        "controller_interval_s": args.controller_interval_s,
        "policies": policies,
        "units": "latencies and times at full speed (wall / time_scale)",
    }
    report_mod.publish(out, entries, meta, plots=not args.no_plots)


def _deployment(args: argparse.Namespace) -> RedisSettings | None:
    """The running deployment ``--redis-url`` names (None: start a stack per policy). It is reached like the
    services reach it: user, password and TLS from REDIS_USERNAME, REDIS_PASSWORD and REDIS_TLS_*."""
    if not args.redis_url:
        return None
    deployment = RedisSettings.from_namespace(None, local_stack=args.redis_url == LOCAL_STACK)
    if args.redis_url != LOCAL_STACK:
        return dataclasses.replace(deployment, redis_url=args.redis_url, namespace=args.namespace)
    if stackfile.find() is None:
        raise SystemExit(f"diffserve loadtest: --redis-url alone needs a running `diffserve up` ({stackfile.path()})")
    return deployment


def _run(
    args: argparse.Namespace,
    policy: str,
    deployment: RedisSettings | None,
    trace: Trace,
    prompts: list[str],
    *,
    slo_ms: float,
    static: str,
    out: Path,
) -> RunRecord:
    """One policy's run: against the deployment, else on a stack of its own."""
    from loadtest import runner

    if deployment is not None:
        return asyncio.run(
            runner.replay(
                deployment,
                trace,
                prompts,
                time_scale=args.time_scale,
                policy=policy,
                progress=not args.no_progress,
                drain_timeout_s=args.drain_timeout_s,
                sample_interval_s=args.sample_interval_s or runner.default_sample_interval_s(args.time_scale),
            )
        )
    spec = runner.stack_spec(
        policy=policy,
        workers=args.workers,
        backend=args.backend,
        cascade=args.cascade,
        hardware=args.hardware,
        time_scale=args.time_scale,
        slo_ms=slo_ms,
        static_plan=static,
        confidence_file=os.path.abspath(args.confidence_file) if args.confidence_file else None,
        controller_interval_s=args.controller_interval_s,
        model_dir=args.model_dir,
        light_workers=args.light_workers,
    )
    spec.namespace = args.namespace
    return runner.run_policy(
        spec,
        trace,
        prompts,
        log_dir=str(out / "logs" / policy),
        progress=not args.no_progress,
        drain_timeout_s=args.drain_timeout_s,
        sample_interval_s=args.sample_interval_s,
    )


if __name__ == "__main__":
    main()

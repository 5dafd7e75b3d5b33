"""The virtual-time simulator (``diffserve simulate``): it replays traces with the services' own
decision code, finds the best fixed plan in hindsight, gives one row per cluster size, and routes
each query as the live profiled stack does."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from common.planner import FixedPlan, quality_threshold
from common.profiles import load_cascade_profile, load_prompts
from loadtest.report import summarize
from loadtest.simulation import SimConfig, simulate
from loadtest.static_search import search_static
from loadtest.traces import Trace, generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile():
    return load_cascade_profile("sdturbo-sdv15", "a100")


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


def _entry(run, profile):
    return summarize(run, slo_ms=5000, curve=profile.quality, confidence_curve=profile.curve)


def test_every_query_answered_once_and_policies_differ(profile, prompts):
    trace = generate("bursty", duration_s=120, n_prompts=len(prompts), seed=3)
    entries = {}
    for policy in ("diffserve", "clipper-light", "clipper-heavy", "proteus"):
        run = simulate(profile, trace, prompts, SimConfig(policy=policy, workers=16, slo_ms=5000))
        assert run.drained and all(j.result is not None for j in run.jobs)
        entries[policy] = e = _entry(run, profile)
        assert e["lost"] == 0 and e["sent"] == len(trace)
        assert e["timeline"]["plan"] and "roles" in e["timeline"]["plan"][-1]
    assert entries["clipper-light"]["heavy_share"] == 0 and entries["clipper-heavy"]["heavy_share"] == 1
    assert entries["clipper-light"]["quality"]["estimate"] == pytest.approx(22.77)
    # the cascade keeps its SLO under bursts; heavy-only cannot
    assert entries["diffserve"]["slo_violation_ratio"] < 0.01 < entries["clipper-heavy"]["slo_violation_ratio"]
    assert entries["diffserve"]["quality"]["estimate"] < entries["clipper-light"]["quality"]["estimate"]
    # proteus answers a random split: its estimate pays for the hard prompts it leaves light
    proteus = entries["proteus"]["quality"]
    assert proteus["estimate"] > proteus["paper_estimate"]


def test_a_fixed_plan_is_kept_and_roles_follow_it(profile, prompts):
    trace = generate("poisson", rate=6, duration_s=60, n_prompts=len(prompts), seed=1)
    fixed = FixedPlan.parse("t=0.1,light=3x8,heavy=5x2")
    run = simulate(profile, trace, prompts, SimConfig(policy="static", workers=8, slo_ms=5000, fixed_plan=fixed))
    samples = run.plan_samples[5:]
    assert {(s["threshold"], s["light_workers"], s["heavy_workers"]) for s in samples} == {(0.1, 3, 5)}
    assert samples[-1]["roles"] == {"light": 3, "heavy": 5}


def test_search_static_ranks_plans(profile, prompts):
    trace = generate("poisson", rate=4, duration_s=40, n_prompts=len(prompts), seed=2)
    rows = search_static(
        profile,
        trace,
        prompts,
        workers=6,
        slo_ms=5000,
        light_batches=(4,),
        heavy_batches=(2,),
        max_threshold=0.3,
        refine=1,
    )
    assert rows and all(r["slo_violation_ratio"] is not None for r in rows)
    best = rows[0]
    assert best["slo_violation_ratio"] < 0.01
    ok = [r for r in rows if r["slo_violation_ratio"] < 0.01]
    assert best["fid"] == min(r["fid"] for r in ok)
    assert any(round(r["threshold"] * 100) % 5 for r in rows)  # the refine pass tried thresholds between


def _simulate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``diffserve simulate ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "diffserve", "simulate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=timeout,
    )


def test_cli_one_row_per_cluster_size(tmp_path):
    out = tmp_path / "sim"
    args = ["--trace", "bursty", "--duration", "60", "--workers", "4,8,16", "--policies", "diffserve", "--no-plots"]
    proc = _simulate(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    names = list(report["policies"])
    assert names == ["diffserve (4 workers)", "diffserve (8 workers)", "diffserve (16 workers)"]
    misses = [report["policies"][n]["slo_violation_ratio"] for n in names]
    assert misses[0] >= misses[1] >= misses[2]
    for e in report["policies"].values():
        assert {"slo_violation_ratio", "latency_ms", "heavy_share", "quality", "degraded", "timeline"} <= set(e)
    help_text = _simulate("--help", timeout=60).stdout
    for flag in ("--search-static", "--workers", "--policies", "--trace-file", "--static-plan", "--time-scale"):
        assert flag in help_text


def test_seeds_score_every_row_on_other_draws_and_keep_the_plan_picked_on_the_first(tmp_path):
    out = tmp_path / "sim"
    args = ["--trace", "bursty", "--duration", "60", "--workers", "4", "--policies", "diffserve", "--no-plots"]
    args += ["--out", str(out)]
    proc = _simulate(*args, "--search-static", "--seeds", "1,2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1, 2] and seeds["picked_on_seed"] == 0
    plan = report["policies"]["static-hindsight"]["static_plan"]
    assert seeds["static_plans"] == {"static-hindsight": plan}
    assert f"seed 2: static-hindsight: {plan}" in proc.stdout  # the plan picked on seed 0, run as it is
    for name in ("diffserve", "static-hindsight"):
        row = seeds["rows"][name]
        per = [row["per_seed"][s]["estimate"] for s in ("0", "1", "2")]
        assert per[0] == report["policies"][name]["quality"]["estimate"]  # --seed's row is the report's
        assert len(set(per)) == 3  # other draws of the trace, other scores
        assert row["mean_estimate"] == pytest.approx(sum(per) / 3, abs=1e-4)
    assert "| diffserve |" in (out / "seeds.md").read_text()
    refused = _simulate(*args, "--trace-file", str(out / "trace.csv"), "--seeds", "1", timeout=60)
    assert refused.returncode != 0 and "--trace-file has no seed" in refused.stderr


@pytest.mark.slow
def test_simulator_routes_each_query_as_the_live_stack(profile, prompts, tmp_path):
    """A small fixed trace with recorded confidences, a fixed plan, light load: the simulator and a
    live profiled stack answer every query with the same model."""
    from loadtest.runner import run_policy, stack_spec

    indices = list(range(0, 60, 2))
    # one query every 1.5 s: the heavy worker (2.16 s per batch of 2) is never the bottleneck, so no
    # query's route depends on timing
    trace = Trace([i * 1500.0 for i in range(len(indices))], indices, "fixed", len(indices) * 1.5 + 1)
    confidences = {i: (0.05 if i % 3 else 0.8) + i / 1000 for i in indices}  # a third confident
    conf_file = tmp_path / "conf.csv"
    conf_file.write_text("prompt_index,confidence\n" + "".join(f"{i},{c}\n" for i, c in confidences.items()))
    plan = "t=0.3,light=1x4,heavy=1x2"
    from common.backends.profiled import load_confidence_overrides

    sim = simulate(
        profile,
        trace,
        prompts,
        SimConfig(policy="static", workers=2, slo_ms=5000, fixed_plan=FixedPlan.parse(plan), time_scale=0.5),
        overrides=load_confidence_overrides(str(conf_file)),
    )
    spec = stack_spec(
        policy="static",
        workers=2,
        backend="profiled",
        cascade="sdturbo-sdv15",
        hardware="a100",
        time_scale=0.5,
        slo_ms=5000,
        confidence_file=str(conf_file),
        static_plan=plan,
    )
    live = run_policy(spec, trace, prompts, log_dir=str(tmp_path / "logs"), progress=False, drain_timeout_s=60)
    by_sim = {j.prompt_index: j.result.answered_by for j in sim.jobs}
    by_live = {j.prompt_index: j.result.answered_by for j in live.jobs}
    assert by_live == by_sim
    assert set(by_sim.values()) == {"light", "heavy"}
    assert all(not j.result.degraded for j in live.jobs)
    expected = {i: "light" if c >= 0.3 else "heavy" for i, c in confidences.items()}
    assert by_sim == expected


def _burst_trace(base_qps: float, n_prompts: int, *, before_s=240.0, burst_s=4.0, after_s=100.0, factor=10.0, seed=1):
    """Poisson at ``base_qps``, then ``factor`` times that for ``burst_s``, then the base again."""
    rng = random.Random(seed)
    arrivals, t, end = [], 0.0, before_s + burst_s + after_s
    while True:
        t += rng.expovariate(base_qps * factor if before_s <= t < before_s + burst_s else base_qps)
        if t >= end:
            break
        arrivals.append(round(t * 1000, 3))
    return Trace(arrivals, [rng.randrange(1, n_prompts) for _ in arrivals], "burst", end)


@pytest.mark.parametrize("workers", [4, 8, 16])
def test_a_burst_costs_seconds_not_minutes(profile, prompts, workers):
    """A 10x burst of 4 s: 60 s after its end the threshold is back within 0.02 of where it was before
    (the median of the minute before), and the plan's demand is back at the base rate (no phantom)."""
    base = workers / 2
    trace = _burst_trace(base, len(prompts))
    run = simulate(profile, trace, prompts, SimConfig(policy="diffserve", workers=workers, slo_ms=5000))
    samples = run.plan_samples
    before = statistics.median(s["threshold"] for s in samples if 180 <= s["t_s"] < 240)
    after = [s for s in samples if 244 + 55 <= s["t_s"] <= 244 + 65]
    assert after and all(abs(s["threshold"] - before) <= 0.02 + 1e-9 for s in after), (
        before,
        [(s["t_s"], s["threshold"]) for s in after],
    )
    assert all(s["demand_qps"] <= 1.5 * base for s in after), [(s["t_s"], s["demand_qps"]) for s in after]


def _step_trace(low_qps: float, high_qps: float, n_prompts: int, up_s: float, down_s: float, end_s: float, seed=1):
    """Poisson at ``low_qps``, ``high_qps`` from ``up_s`` to ``down_s``, then ``low_qps`` again."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(high_qps if up_s <= t < down_s else low_qps)
        if t >= end_s:
            break
        arrivals.append(round(t * 1000, 3))
    return Trace(arrivals, [rng.randrange(1, n_prompts) for _ in arrivals], "step", end_s)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_step_moves_the_threshold_within_seconds_not_at_the_next_ticks(profile, prompts, seed):
    """16 workers, 6 q/s then 24 q/s from 63 s to 123 s (ticks every 10 s: at 70 and 130 s).  Within seconds
    of the step up the threshold is below the cascade's (the heavy stage is sent more than it runs; below it
    the heavy batch fill is on), before the next tick; within 3 s of the step down it is back at the cascade's
    threshold and stays there, where the ticks' replay of the busy minute would hold it low for half a minute."""
    trace = _step_trace(6.0, 24.0, len(prompts), up_s=63.0, down_s=123.0, end_s=170.0, seed=seed)
    run = simulate(profile, trace, prompts, SimConfig(policy="diffserve", workers=16, slo_ms=5000))
    target = quality_threshold(profile)
    threshold = {s["t_s"]: s["threshold"] for s in run.plan_samples}
    assert all(threshold[t] == target for t in range(50, 63)), threshold
    assert any(threshold[t] < target for t in range(64, 70)), threshold
    assert all(threshold[t] == target for t in range(126, 160)), threshold
    assert _entry(run, profile)["slo_violation_ratio"] == 0.0


def test_a_burst_gets_a_second_light_worker_within_seconds_and_gives_it_back(profile, prompts):
    """4 workers at 3 q/s: one light worker and three heavy.  A 10x burst of 8 s that one light worker
    cannot absorb gets a second one within 5 s of its start (between the controller's 10-s ticks), every
    query is answered within the SLO, and the worker is back on the heavy model within 40 s of the end."""
    trace = _burst_trace(3.0, len(prompts), before_s=60.0, burst_s=8.0, after_s=90.0)
    run = simulate(profile, trace, prompts, SimConfig(policy="diffserve", workers=4, slo_ms=5000))
    light = {s["t_s"]: s["roles"]["light"] for s in run.plan_samples}
    assert all(n == 1 for t, n in light.items() if 20 <= t < 60), light
    assert any(n == 2 for t, n in light.items() if 60 <= t <= 65), light
    assert all(n == 1 for t, n in light.items() if 68 + 40 <= t <= 150), light
    assert _entry(run, profile)["slo_violation_ratio"] == 0.0


def test_a_short_heavy_stage_runs_the_hardest_prompts(profile, prompts):
    """The exchange (common/routing.exchange_for): with more escalations than two heavy workers can carry, the
    prompts answered by the heavy model are harder (less confident) than the escalated ones answered light
    by the deadline rule, by far: not whichever came first."""
    trace = generate("bursty", duration_s=120, n_prompts=len(prompts), seed=3)
    fixed = FixedPlan.parse("t=0.21,light=2x16,heavy=2x2")
    run = simulate(profile, trace, prompts, SimConfig(policy="static", workers=4, slo_ms=5000, fixed_plan=fixed))
    results = [j.result for j in run.jobs if j.result is not None and j.result.confidence is not None]
    heavy = [r.confidence for r in results if r.answered_by == "heavy"]
    deadline = [r.confidence for r in results if r.light_reason == "deadline"]
    assert len(heavy) > 50 and len(deadline) > 50
    assert statistics.median(heavy) < 0.5 * statistics.median(deadline)


def test_a_short_heavy_stage_fills_its_batches_and_answers_more(profile, prompts):
    """The heavy batch fill (common/routing.heavy_fill_ms): with the threshold below the cascade's target, heavy
    workers that wait a moment for a second job run fewer batches of one, so the same two heavy workers
    answer more prompts, within the SLO."""
    trace = generate("step", duration_s=150, n_prompts=len(prompts), seed=3)
    fixed = FixedPlan.parse("t=0.1,light=2x8,heavy=2x2")
    heavy = {}
    for fill_ms in (0.0, 400.0):
        cfg = SimConfig(policy="static", workers=4, slo_ms=5000, fixed_plan=fixed, control={"heavy_fill_ms": fill_ms})
        run = simulate(profile, trace, prompts, cfg)
        assert _entry(run, profile)["slo_violation_ratio"] == 0.0
        heavy[fill_ms] = sum(j.result is not None and j.result.answered_by == "heavy" for j in run.jobs)
    assert heavy[400.0] > 1.05 * heavy[0.0]  # 265 against 242 as measured

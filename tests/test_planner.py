"""The MILP planner against an exhaustive enumeration of the same grid, the objectives,
the policies, role assignment and the ``diffserve plan`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import planner as P
from common.planner.allocation import heavy_limited
from common.profiles import load_cascade_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdturbo():
    return load_cascade_profile("sdturbo-sdv15", "a100")


def _key(problem, found):
    if found is None:
        return None
    choice, ev = found
    return ev.key(problem, problem.options[choice.option], choice.x1)


def _same_optimum(problem):
    milp = P.solve_milp(problem)
    brute = P.brute_force(problem, exhaustive=True)
    km, kb = _key(problem, milp), _key(problem, brute)
    assert (km is None) == (kb is None), (km, kb)
    if km is None:
        return None
    # same option (threshold) rank, role changes and light workers; latency equal up to the solver's tolerance
    assert km[:3] == kb[:3], (km, kb)
    assert km[3] == pytest.approx(kb[3], abs=1e-3)
    assert problem.options[milp[0].option].value == problem.options[brute[0].option].value
    assert P.evaluate(problem, milp[0]).feasible
    return milp


@pytest.mark.parametrize("objective", ["threshold", "quality"])
@pytest.mark.parametrize("workers", [1, 2, 5, 9])
def test_milp_matches_brute_force(sdturbo, objective, workers):
    for demand in (0.0, 0.4, 2.0, 6.0, 15.0, 60.0, 400.0):
        _same_optimum(P.build_problem(sdturbo, demand, workers, objective=objective))


def test_milp_matches_brute_force_with_roles_queues_and_policies(sdturbo):
    current = {"a": "light", "b": "heavy", "c": "heavy", "d": "light", "e": ""}
    queues = P.QueueStats(light_backlog=4, heavy_backlog=3)
    for policy in P.POLICIES:
        for demand in (0.5, 3.0, 8.0, 40.0):
            for keep in (False, True):
                problem = P.build_problem(
                    sdturbo,
                    demand,
                    5,
                    policy=policy,
                    current=current,
                    queues=queues,
                    keep_roles=keep,
                    light_demand_qps=demand * 2,
                    threshold_window=(0.1, 0.3),
                )
                _same_optimum(problem)


def test_other_cascades_and_hardware():
    for name, hw in (("sdxlltn-sdxl", "h100"), ("sdxs-sdv15", "a100"), ("sdturbo-sdv15", "h100")):
        profile = load_cascade_profile(name, hw)
        for demand in (0.5, 3.0, 12.0):
            _same_optimum(P.build_problem(profile, demand, 6, objective="threshold"))


def test_infeasible_demand_gives_max_throughput_plan(sdturbo):
    problem = P.build_problem(sdturbo, 1000.0, 8)
    assert P.solve_milp(problem) is None
    assert P.brute_force(problem) is None
    result = P.plan(sdturbo, 1000.0, 8)
    assert not result.feasible
    assert result.threshold == 0.0 and result.light_workers == 8 and result.heavy_workers == 0
    # the highest-throughput light batch whose light path (batch, discriminator, half a batch's wait) fits
    fits = [
        b
        for b in (1, 2, 4, 8, 16, 32)
        if (1 + P.WAIT_BATCHES) * sdturbo.light.latency_ms(b) + sdturbo.discriminator.latency_ms(b) <= sdturbo.slo_ms
    ]
    assert result.light_batch == max(fits, key=sdturbo.light.throughput_qps)
    assert result.notes


def _check_feasible_against_tables(profile, result, demand, light_demand=None, headroom=P.DEFAULT_HEADROOM):
    """Recompute capacity and latency from the profile tables, independently of the planner."""
    f = profile.curve.f(result.threshold)
    light_cap = result.light_workers * profile.light.throughput_qps(result.light_batch)
    assert light_cap * headroom >= max(demand, light_demand or 0) * (1 - 1e-6)
    heavy_load = demand * f
    if heavy_load > 0:
        heavy_cap = result.heavy_workers * profile.heavy.throughput_qps(result.heavy_batch)
        assert heavy_cap * headroom >= heavy_load * (1 - 1e-6)
    k = P.WAIT_BATCHES
    latency = (1 + k) * profile.light.latency_ms(result.light_batch) + profile.discriminator.latency_ms(
        result.light_batch
    )
    if heavy_load > 0:
        latency += (1 + k) * profile.heavy.latency_ms(result.heavy_batch)
    assert latency <= profile.slo_ms * (1 + 1e-6)
    assert result.latency.total_ms == pytest.approx(latency, rel=1e-6)
    assert result.light_workers + result.heavy_workers == result.workers


@pytest.mark.parametrize("demand,workers", [(1.0, 4), (5.0, 8), (12.0, 16), (20.0, 16), (30.0, 32), (60.0, 128)])
def test_plan_feasible_against_tables(sdturbo, demand, workers):
    for objective in ("quality", "threshold"):
        result = P.plan(sdturbo, demand, workers, objective=objective)
        assert result.feasible
        _check_feasible_against_tables(sdturbo, result, demand)
        peak = P.plan(sdturbo, demand, workers, objective=objective, light_demand_qps=demand * 3)
        _check_feasible_against_tables(sdturbo, peak, demand, light_demand=demand * 3)


def test_quality_objective_prefers_best_fid_when_capacity_is_plentiful(sdturbo):
    result = P.plan(sdturbo, 2.0, 16, objective="quality")
    # the best FID of sdturbo-sdv15 is at 40% light: f(0.21) = 0.60 gives 39.6% light
    assert result.threshold == pytest.approx(0.21)
    assert abs(result.light_share - 0.4) < 0.01
    assert result.estimated_quality == pytest.approx(
        min(sdturbo.quality.score(1 - sdturbo.curve.f(t)) for t in P.THRESHOLD_GRID)
    )
    assert result.objective == "quality" and result.objective_value == result.estimated_quality
    # the threshold objective goes for the largest t instead
    assert P.plan(sdturbo, 2.0, 16, objective="threshold").threshold == 1.0


def test_quality_objective_falls_back_to_largest_feasible_threshold_under_load(sdturbo):
    workers = 16
    demand = 40.0
    feasible = [
        o.value
        for o in P.build_problem(sdturbo, demand, workers).options
        if P.brute_force(P.build_problem(sdturbo, demand, workers, threshold_grid=[o.value]), exhaustive=False)
        is not None
    ]
    assert feasible and max(feasible) < 0.2  # the quality optimum is out of reach
    result = P.plan(sdturbo, demand, workers, objective="quality")
    assert result.feasible and result.threshold == pytest.approx(max(feasible))
    assert P.plan(sdturbo, demand, workers, objective="threshold").threshold == pytest.approx(max(feasible))


def test_threshold_objective_is_max_t(sdturbo):
    for demand, workers in ((3.0, 8), (10.0, 16), (25.0, 32)):
        result = P.plan(sdturbo, demand, workers, objective="threshold")
        best = max(
            t
            for t in P.THRESHOLD_GRID
            if P.brute_force(P.build_problem(sdturbo, demand, workers, threshold_grid=[t]), exhaustive=False)
        )
        assert result.threshold == pytest.approx(best)


def test_all_workers_get_a_role_and_spares_go_to_the_busier_stage(sdturbo):
    result = P.plan(sdturbo, 20.0, 40, objective="quality")
    assert result.light_workers + result.heavy_workers == 40
    assert result.heavy_workers - result.min_heavy_workers > result.light_workers - result.min_light_workers


def test_spare_workers_go_heavy_when_the_heavy_stage_limits_quality(sdturbo):
    """24 q/s on 4 workers: the light stage needs two, and two heavy workers cannot carry even t = 0.01
    (36 % of prompts score below 0.05), so the solver plans t = 0.  The spares go to the heavy stage, not to
    the busier light stage: the controller's replay and the deadline rule's exchange give them the hardest
    prompts.  Where the heavy stage does not limit quality, the busier stage still gets them."""
    limited = P.plan(sdturbo, 24.0, 4)
    assert limited.threshold == 0.0 and limited.min_light_workers == 2
    assert (limited.light_workers, limited.heavy_workers) == (2, 2)
    problem = P.build_problem(sdturbo, 24.0, 4)
    t0 = next(o for o in problem.options if o.value == 0.0)
    assert heavy_limited(problem, t0)
    best = min(problem.options, key=lambda o: o.rank)
    assert not heavy_limited(problem, best)


def test_a_backlog_is_capacity_to_drain_not_latency(sdturbo):
    """A heavy backlog asks for the capacity to drain it within drain_s; it adds no queue wait to the
    latency budget (the old Little's-law term made every t > 0 infeasible after a busy interval)."""
    calm = P.plan(sdturbo, 10.0, 16, objective="threshold")
    busy = P.plan(sdturbo, 10.0, 16, objective="threshold", queues=P.QueueStats(heavy_backlog=60), drain_s=20.0)
    assert busy.latency.total_ms == pytest.approx(calm.latency.total_ms) or busy.heavy_batch != calm.heavy_batch
    assert busy.latency.heavy_queue_ms == pytest.approx(P.WAIT_BATCHES * busy.latency.heavy_ms)
    f = sdturbo.curve.f(busy.threshold)
    cap = busy.heavy_workers * sdturbo.heavy.throughput_qps(busy.heavy_batch)
    assert cap * P.DEFAULT_HEADROOM >= 10.0 * f + 60 / 20.0 - 1e-6
    assert 0 < busy.threshold <= calm.threshold


def test_threshold_window_bounds_the_move(sdturbo):
    free = P.plan(sdturbo, 30.0, 16)
    held = P.plan(sdturbo, 30.0, 16, threshold_window=(0.16, 0.26))
    assert free.threshold < 0.16  # the free plan wants a lower t at this demand
    assert held.threshold == pytest.approx(0.16)  # smoothing: only to the window's edge
    assert held.notes and "window" in held.notes[0]
    inside = P.plan(sdturbo, 4.0, 16, threshold_window=(0.0, 0.1))
    assert inside.threshold == pytest.approx(0.1) and not inside.notes


def test_latency_scale_and_slo_scale_together(sdturbo):
    base = P.plan(sdturbo, 10.0, 16)
    fast = P.plan(sdturbo, 100.0, 16, latency_scale=0.1, slo_ms=sdturbo.slo_ms * 0.1)
    assert (fast.threshold, fast.light_workers, fast.heavy_workers) == (
        base.threshold,
        base.light_workers,
        base.heavy_workers,
    )
    assert fast.latency.total_ms == pytest.approx(base.latency.total_ms * 0.1, rel=1e-6)


def test_policies(sdturbo):
    light = P.plan(sdturbo, 10.0, 8, policy="clipper-light")
    assert light.threshold == 0.0 and light.light_workers == 8 and light.heavy_workers == 0
    heavy = P.plan(sdturbo, 2.0, 8, policy="clipper-heavy")
    assert heavy.heavy_workers == 8 and heavy.light_workers == 0 and heavy.heavy_fraction == 1.0
    fixed = P.FixedPlan.parse("t=0.02,light=4x16,heavy=12x4")
    static = P.plan(sdturbo, 30.0, 16, policy="static", fixed=fixed)
    assert (static.threshold, static.light_workers, static.light_batch, static.heavy_workers, static.heavy_batch) == (
        0.02,
        4,
        16,
        12,
        4,
    )
    assert str(fixed) == "t=0.02,light=4x16,heavy=12x4"
    with pytest.raises(ValueError):
        P.FixedPlan.parse("t=0.02,light=4,heavy=12x4")
    proteus = P.plan(sdturbo, 12.0, 8, policy="proteus")
    assert proteus.threshold == 0.0 and 0 < proteus.heavy_fraction < 1
    # the largest fraction capacity allows: one grid step more is not feasible
    more = P.build_problem(sdturbo, 12.0, 8, policy="proteus", threshold_grid=[round(proteus.heavy_fraction + 0.01, 2)])
    assert P.brute_force(more, exhaustive=False) is None
    assert P.plan(sdturbo, 6.0, 8, policy="diffserve-threshold").objective == "threshold"


def test_every_policy_has_a_spec_and_names_stay_plain_strings():
    assert set(P.POLICY_TABLE) == set(P.Policy) and P.POLICIES == tuple(P.Policy)
    assert P.policy_spec("clipper-heavy") is P.POLICY_TABLE[P.Policy.CLIPPER_HEAVY]
    assert json.dumps(list(P.POLICIES))[:14] == '["diffserve", '  # reports and CLI choices see the names
    with pytest.raises(ValueError, match="unknown policy 'clipper'"):
        P.policy_spec("clipper")


def test_aimd_batching(sdturbo):
    grow = P.plan(sdturbo, 10.0, 16, policy="aimd", aimd=P.AimdState(2, 1, slo_miss=False))
    assert (grow.light_batch, grow.heavy_batch) in {(4, 2), (4, 1), (2, 2), (2, 1)}
    assert grow.feasible and grow.latency.total_ms <= sdturbo.slo_ms
    shrink = P.plan(sdturbo, 10.0, 16, policy="aimd", aimd=P.AimdState(8, 4, slo_miss=True))
    assert (shrink.light_batch, shrink.heavy_batch) == (4, 2)


def test_no_workers(sdturbo):
    result = P.plan(sdturbo, 5.0, 0)
    assert not result.feasible and result.light_workers == result.heavy_workers == 0


def test_assign_roles_minimal_changes():
    current = {"a": "light", "b": "light", "c": "heavy", "d": "heavy", "e": "heavy"}
    roles = P.assign_roles(current, 3, 2)
    assert sorted(roles.values()).count("light") == 3
    assert P.count_changes(current, roles) == 1
    assert P.assign_roles(current, 2, 3) == current
    # unknown workers take the roles first, then the quickest to switch
    current = {"a": "light", "b": "", "c": "heavy", "d": "heavy"}
    roles = P.assign_roles(current, 2, 2)
    assert roles["b"] == "light" and P.count_changes(current, roles) == 0
    roles = P.assign_roles({"a": "heavy", "b": "heavy", "c": "heavy"}, 1, 2, ready_s={"a": 9, "b": 1, "c": 5})
    assert roles == {"a": "heavy", "b": "light", "c": "heavy"}


def test_plan_prefers_fewer_role_changes(sdturbo):
    current = {f"w{i}": ("light" if i < 6 else "heavy") for i in range(16)}
    result = P.plan(sdturbo, 20.0, 16, current=current)
    needed = max(0, result.min_light_workers - 6) + max(0, result.min_heavy_workers - 10)
    assert result.role_changes >= needed
    assert set(result.roles) == set(current)
    assert result.light_workers + result.heavy_workers == 16
    assert list(result.roles.values()).count("light") == result.light_workers
    for demand in (0.5, 3.0, 8.0, 20.0, 40.0):
        for cur in (
            current,
            {f"w{i}": "light" for i in range(16)},
            {f"w{i}": "" for i in range(16)},
            {f"w{i}": ("heavy" if i < 3 else "") for i in range(16)},
        ):
            r = P.plan(sdturbo, demand, 16, current=cur)
            assert r.light_workers + r.heavy_workers == 16, (demand, cur)
            assert r.light_workers >= r.min_light_workers and r.heavy_workers >= r.min_heavy_workers
            assert list(r.roles.values()).count("heavy") == r.heavy_workers
    kept = P.plan(sdturbo, 20.0, 16, current=current, keep_roles=True)
    assert kept.role_changes == 0 and kept.light_workers == 6 and kept.heavy_workers == 10


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    exe = Path(sys.executable).with_name("diffserve")
    cmd = [str(exe), "plan", *args] if exe.exists() else [sys.executable, "-m", "diffserve", "plan", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_plan_command_prints_json():
    proc = _run_cli("--demand", "20", "--workers", "16", "--cascade", "sdturbo-sdv15", "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    for key in (
        "threshold",
        "light_batch",
        "heavy_batch",
        "light_workers",
        "heavy_workers",
        "latency",
        "solve_ms",
        "objective",
        "estimated_quality",
        "feasible",
    ):
        assert key in body
    assert set(body["latency"]) >= {
        "light_ms",
        "discriminator_ms",
        "heavy_ms",
        "light_queue_ms",
        "heavy_queue_ms",
        "total_ms",
    }
    assert body["feasible"] and body["light_workers"] + body["heavy_workers"] == 16
    assert body["objective"] == "quality"
    proc = _run_cli(
        "--demand",
        "20",
        "--workers",
        "16",
        "--hardware",
        "h100",
        "--objective",
        "threshold",
        "--policy",
        "diffserve",
        "--slo-ms",
        "4000",
    )
    assert proc.returncode == 0, proc.stderr
    assert "threshold" in proc.stdout and "4000" in proc.stdout


def test_a_queue_with_jobs_keeps_a_worker(sdturbo):
    """A plan that sends the heavy stage nothing new (t=0) still leaves one heavy worker while
    the heavy queue holds jobs, so they are not stranded; the same for the fallback."""
    queues = P.QueueStats(heavy_backlog=5)
    busy = P.plan(sdturbo, 120.0, 8, queues=queues)
    assert busy.threshold == 0.0 and busy.heavy_workers == 1 and busy.light_workers == 7
    overload = P.plan(sdturbo, 1000.0, 8, queues=queues)
    assert not overload.feasible and overload.heavy_workers == 1
    assert P.plan(sdturbo, 130.0, 8).heavy_workers == 0  # without a backlog, every worker for the light stage
    heavy_only = P.plan(sdturbo, 1.0, 4, policy="clipper-heavy", queues=P.QueueStats(light_backlog=3))
    assert heavy_only.light_workers == 1 and heavy_only.heavy_workers == 3
    _same_optimum(P.build_problem(sdturbo, 120.0, 8, queues=queues))

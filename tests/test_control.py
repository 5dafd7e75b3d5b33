"""The control law (common/control.py) as a table: situation -> what the controller decides
and why.  The live-stack tests only check the wiring."""

from __future__ import annotations

import pytest

from common.control import (
    DEFAULT_SWITCH_S,
    ControlLoop,
    ControlReason,
    ControlSettings,
    Watch,
    WorkerView,
    switch_estimates,
)
from common.demand import RateEstimator, RecurringPeak
from common.planner import FixedPlan, QueueStats
from common.profiles import load_cascade_profile
from common.replay import ArrivalHistory


@pytest.fixture(scope="module")
def profile():
    return load_cascade_profile("sdturbo-sdv15", "a100")


def _workers(light: int, heavy: int, switch_s: float = 0.4) -> list[WorkerView]:
    roles = ["light"] * light + ["heavy"] * heavy
    return [WorkerView(f"w{i:02d}", role, switch_s) for i, role in enumerate(roles)]


def _loop(profile, **kw) -> ControlLoop:
    return ControlLoop(profile, ControlSettings(slo_ms=5000.0, **kw))


def _stored(loop, workers, demand, queues=None):
    """The plan a controller in this situation would have stored (its first plan)."""
    result, _ = loop.decide(None, demand, workers, queues or QueueStats())
    return result.to_message(1, result.roles)


def test_first_plan_is_applied_at_once(profile):
    loop = _loop(profile)
    result, reason = loop.decide(None, 8.0, _workers(8, 8), QueueStats())
    assert reason.reason == ControlReason.FIRST_PLAN and str(reason) == "first plan"
    assert result.light_workers == 2 and result.heavy_workers == 14  # light is cheap: two carry 8 q/s and more
    assert list(result.roles.values()).count("heavy") == 14


def test_hysteresis_table(profile):
    """Each row: roles now, demand -> the reason the controller gives and whether roles move."""
    rows = [
        # roles already what the plan wants: nothing moves
        ((2, 14), 8.0, "no role change", False),
        # one worker off the plan's split: within the margin, kept
        ((3, 13), 8.0, "within margins: roles kept", False),
        # far off the plan (8 light for 8 q/s): proposed once, confirmed only by a second tick
        ((8, 8), 8.0, "change proposed: confirming next interval", False),
        # the current roles cannot carry the demand (all heavy, no light worker): moves at once
        ((0, 16), 8.0, "current allocation cannot serve demand", True),
    ]
    for (light, heavy), demand, reason, moves in rows:
        loop = _loop(profile)
        workers = _workers(light, heavy)
        stored = _stored(_loop(profile), workers, demand)
        stored.roles = {w.worker_id: w.role for w in workers}  # the roles in force are the current ones
        result, why = loop.decide(stored, demand, workers, QueueStats())
        assert str(why) == reason, (light, heavy, demand, why)
        assert (result.role_changes > 0) is moves, (light, heavy, result.role_changes)


def test_a_move_is_confirmed_by_a_second_tick_and_taken_in_steps(profile):
    loop = _loop(profile, max_switch_fraction=0.25)
    workers = _workers(8, 8)
    stored = _stored(_loop(profile), workers, 8.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    first, why = loop.decide(stored, 8.0, workers, QueueStats())
    assert why.reason == ControlReason.PROPOSED and first.role_changes == 0
    second, why = loop.decide(stored, 8.0, workers, QueueStats())
    assert str(why).startswith("plan moved beyond margins (confirmed)")
    assert 0 < second.role_changes <= 4  # a quarter of 16 per tick


@pytest.mark.parametrize("level", ["steady", "fell"])
def test_a_move_that_follows_a_level_shift_needs_no_confirming_tick(profile, level):
    """Four workers planned for 24 q/s (two light) when the load falls to 6 q/s: the move to one light worker
    waits for a second tick while the ticks before were at 6 q/s too, and goes on at once once the medians of
    the ticks (level_shift) say the load fell from another level."""
    loop = _loop(profile)
    rates = [6.0] * 10 + ([24.0] * 10 if level == "fell" else [6.0] * 10) + [6.0] * 4
    for i, rate in enumerate(rates):
        loop.peak.update(rate, at=10.0 * (i + 1), seconds=10.0)
    assert (loop.level_shift() is not None) is (level == "fell")
    workers = _workers(2, 2)
    stored = _stored(_loop(profile), workers, 24.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    result, why = loop.decide(stored, 6.0, workers, QueueStats())
    if level == "steady":
        assert why.reason == ControlReason.PROPOSED and result.role_changes == 0
    else:
        assert why.reason == ControlReason.LEVEL_SHIFT and result.role_changes == 1
        assert (result.light_workers, result.heavy_workers) == (1, 3)


def test_the_next_tick_confirms_a_role_move_after_a_nudge_moved_the_threshold(profile):
    """Four workers planned for 24 q/s (two light) at a steady 6 q/s: the first tick proposes one light worker
    fewer with the threshold up; a nudge between the ticks moves the plan's threshold, so the second tick's
    threshold direction differs, but its role move is the same, and it is confirmed."""
    loop = _loop(profile)
    for i in range(24):
        loop.peak.update(6.0, at=10.0 * (i + 1), seconds=10.0)
    assert loop.level_shift() is None
    workers = _workers(2, 2)
    stored = _stored(_loop(profile), workers, 24.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    first, why = loop.decide(stored, 6.0, workers, QueueStats())
    assert why.reason == ControlReason.PROPOSED and first.role_changes == 0
    proposed = loop.proposal
    stored.threshold = 0.19  # a heavy-pressure nudge between the ticks
    second, why = loop.decide(stored, 6.0, workers, QueueStats())
    assert loop.proposal is not None and loop.proposal[0] == proposed[0] == -1
    assert loop.proposal[1] != proposed[1]  # the threshold's direction changed with the plan in force
    assert why.reason == ControlReason.CONFIRMED and second.role_changes == 1
    assert (second.light_workers, second.heavy_workers) == (1, 3)


def test_slow_switchers_keep_their_roles(profile):
    loop = _loop(profile, interval_s=10.0)
    workers = _workers(8, 8, switch_s=30.0)
    stored = _stored(_loop(profile), workers, 8.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    _result, why = loop.decide(stored, 8.0, workers, QueueStats())
    assert why.reason == ControlReason.SLOW_SWITCH


@pytest.mark.parametrize("demand", [4.0, 12.0, 20.0, 32.0, 60.0])
def test_threshold_moves_at_most_one_step_per_tick(profile, demand):
    loop = _loop(profile, max_threshold_step=0.05)
    workers = _workers(2, 14)
    stored = _stored(_loop(profile), workers, 6.0)
    result, _ = loop.decide(stored, demand, workers, QueueStats())
    assert abs(result.threshold - stored.threshold) <= 0.05 + 1e-9


def test_threshold_converges_under_a_sustained_rise(profile):
    """Demand rises and stays: the threshold steps down tick by tick and then holds."""
    loop = _loop(profile, max_threshold_step=0.05)
    workers = _workers(2, 14)
    stored = _stored(_loop(profile), workers, 6.0)
    seen = [stored.threshold]
    for version in range(2, 12):
        result, _ = loop.decide(stored, 28.0, workers, QueueStats())
        stored = result.to_message(version, result.roles)
        seen.append(stored.threshold)
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert all(abs(s) <= 0.05 + 1e-9 for s in steps)
    assert seen[-1] < seen[0] and seen[-1] == seen[-2] == seen[-3]  # moved, then settled
    assert seen[-1] > 0.0  # never all-light while the heavy stage can take some


def test_backlog_is_work_to_drain_not_a_reason_for_all_light(profile):
    """A heavy backlog after a busy interval keeps t > 0 (the old bang-bang flipped it to 0)."""
    loop = _loop(profile)
    workers = _workers(2, 14)
    stored = _stored(_loop(profile), workers, 8.0)
    result, _ = loop.decide(stored, 8.0, workers, QueueStats(heavy_backlog=30))
    assert result.threshold >= stored.threshold - 0.05 and result.threshold > 0


def test_fixed_plan_never_changes(profile):
    fixed = FixedPlan.parse("t=0.02,light=4x16,heavy=12x4")
    loop = _loop(profile, policy="static", fixed_plan=fixed)
    workers = _workers(8, 8)
    stored = None
    for version, demand in enumerate((2.0, 30.0, 8.0), 1):
        result, _ = loop.decide(stored, demand, workers, QueueStats(heavy_backlog=50))
        assert (
            result.threshold,
            result.light_workers,
            result.light_batch,
            result.heavy_workers,
            result.heavy_batch,
        ) == (0.02, 4, 16, 12, 4)
        stored = result.to_message(version, result.roles)


def test_static_without_a_plan_freezes_the_first_one(profile):
    loop = _loop(profile, policy="static", static_demand=8.0)
    workers = _workers(8, 8)
    first, _ = loop.decide(None, 0.0, workers, QueueStats())
    later, _ = loop.decide(first.to_message(1, first.roles), 30.0, workers, QueueStats())
    assert (later.threshold, later.light_workers, later.heavy_workers) == (
        first.threshold,
        first.light_workers,
        first.heavy_workers,
    )
    assert loop.fixed is not None and str(loop.fixed).startswith(f"t={first.threshold:g}")


def test_demand_falls_slowly_until_three_quiet_ticks_say_the_burst_is_over():
    rate = RateEstimator(alpha=0.5, alpha_down=0.2, settle=3)
    counts = [0, 100, 300, 300]  # 10 q/s, 20 q/s, then nothing
    for t, count in enumerate(counts):
        rate.update(count, 10.0 * t)
    assert rate.smoothed == pytest.approx(12.0)  # 15 q/s believed to fall by a fifth only
    rate.update(330, 40.0)  # 3 q/s
    assert rate.smoothed > 3.0  # the last three ticks still include the 20 q/s one
    rate.update(330, 50.0)
    assert rate.smoothed == pytest.approx(3.0)  # three ticks at or below 3 q/s: the burst has ended
    for t in (60.0, 70.0, 80.0):
        rate.update(330, t)
    assert rate.smoothed == 0.0 and rate.forecast() == 0.0  # an idle cluster reports no demand


def test_the_controller_believes_a_fall_after_two_quiet_ticks(profile):
    """The demand the controller plans for after a step from 24 to 6 q/s: the first quiet tick is believed
    by a fifth only, the second in full (a burst or a busy level is over; the burst watch brings light
    workers back within seconds if it was not)."""
    loop = _loop(profile)
    count = 0
    for tick in range(1, 7):
        count += 240
        loop.observe(count, 10.0 * tick)
    count += 60
    assert loop.observe(count, 70.0) > 18.0
    count += 60
    assert loop.observe(count, 80.0) == pytest.approx(6.0)


def test_recurring_peak_counts_bursts_that_recur_not_a_one_off():
    one_off = RecurringPeak(window_s=300.0, share=0.1)
    recurring = RecurringPeak(window_s=300.0, share=0.1)
    for tick in range(30):  # 300 s of 10-s ticks at 4 q/s
        at = 10.0 * (tick + 1)
        one_off.update(40.0 if tick == 20 else 4.0, at, 10.0)  # one 10-s burst
        recurring.update(32.0 if tick % 6 == 0 else 4.0, at, 10.0)  # a burst every minute
    assert one_off.value == 4.0  # 10 s of 300 is under the 10 % share
    assert recurring.value == 32.0  # 50 s of 300
    early = RecurringPeak(window_s=300.0, share=0.1)
    early.update(4.0, 10.0, 10.0)
    early.update(30.0, 20.0, 10.0)
    assert early.value == 30.0  # with 20 s of history, one burst tick is half of it


def test_static_plan_is_solved_for_the_cluster_it_runs_on(profile):
    """Workers still registering at the first tick: the frozen plan follows the cluster once it is there."""
    loop = _loop(profile, policy="static", static_demand=8.0)
    early, _ = loop.decide(None, 0.0, _workers(1, 1), QueueStats())
    assert early.light_workers + early.heavy_workers == 2
    full, _ = loop.decide(early.to_message(1, early.roles), 0.0, _workers(8, 8), QueueStats())
    assert full.light_workers + full.heavy_workers == 16 and full.heavy_workers >= 12
    again, _ = loop.decide(full.to_message(2, full.roles), 30.0, _workers(8, 8), QueueStats())
    assert (again.threshold, again.light_workers) == (full.threshold, full.light_workers)


def test_until_the_replay_can_judge_the_preferred_threshold_is_kept(profile):
    """The first seconds of traffic on four workers: the solver fits t to what two heavy workers can run, but
    with under ``hindsight_min_s`` of history the plan keeps the cascade's preferred threshold (the exchange
    rations the rest); with enough history the replay decides, and it goes below the preferred one here."""
    workers = _workers(2, 2)
    history = ArrivalHistory(bucket_ms=100.0)
    for i in range(100):  # 10 q/s for 10 s
        history.add(i * 100.0)
    loop = _loop(profile)
    solver, _ = loop.decide(None, 10.0, workers, QueueStats())
    assert solver.threshold < 0.21 and solver.target_threshold == 0.21
    early, why = _loop(profile).decide(None, 10.0, workers, QueueStats(), history=history, now_ms=10_000.0)
    assert early.threshold == 0.21 and early.light_share == pytest.approx(1 - profile.curve.f(0.21))
    assert "too little history to replay" in why.detail
    for i in range(100, 400):  # 30 s of it: the replay judges
        history.add(i * 100.0)
    later, why = _loop(profile).decide(None, 10.0, workers, QueueStats(), history=history, now_ms=40_000.0)
    assert "hindsight over" in why.detail and later.threshold < 0.21
    # with the replay off (--hindsight-s 0) the solver's t stands from the start
    off, _ = _loop(profile, hindsight_s=0.0).decide(None, 10.0, workers, QueueStats(), history=history, now_ms=1e4)
    assert off.threshold == solver.threshold


def test_a_burst_moves_the_fewest_heavy_workers_to_light_between_ticks(profile):
    """Between bursts one light worker carries the load and the other three run the heavy model; a burst
    that one light worker cannot absorb (by its arrival rate or by the wait in its queue) moves one heavy
    worker to the light stage at once, without the confirming tick a role change otherwise waits for."""
    loop = _loop(profile)
    workers = _workers(1, 3)
    stored = _stored(_loop(profile), workers, 6.0)
    assert (stored.light_workers, stored.heavy_workers) == (1, 3)
    stored.roles = {w.worker_id: w.role for w in workers}
    assert not loop.light_pressure(stored, light_backlog=4, rate_qps=6.0)
    assert loop.light_pressure(stored, light_backlog=4, rate_qps=30.0)  # above what one light worker runs
    assert loop.light_pressure(stored, light_backlog=80, rate_qps=6.0)  # a queue waited on for seconds
    assert loop.burst(stored, 6.0, workers, QueueStats(light_backlog=4)) is None  # the roles carry it
    result, why = loop.burst(stored, 30.0, workers, QueueStats(light_backlog=40))
    assert why.reason == ControlReason.BURST and "burst" in result.reason
    assert (result.light_workers, result.heavy_workers) == (2, 2) and result.feasible
    moved = [w for w in workers if result.roles[w.worker_id] != w.role]
    assert len(moved) == 1 and moved[0].role == "heavy"
    assert loop.proposal is None  # the hysteresis of the next tick is untouched


def test_the_workers_a_burst_moved_go_back_in_one_step(profile):
    """A burst takes two heavy workers to the light stage of a 4-worker cluster (one light worker -> three); once
    it is over, the confirmed move back gives both back at the same tick, where a move the ticks planned
    themselves goes a quarter of the workers (here one) a tick."""
    loop = _loop(profile)
    workers = _workers(1, 3)
    stored = _stored(_loop(profile), workers, 6.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    result, why = loop.burst(stored, 40.0, workers, QueueStats(light_backlog=40))
    assert why.reason == ControlReason.BURST and (result.light_workers, result.heavy_workers) == (3, 1)
    workers = [WorkerView(w.worker_id, result.roles[w.worker_id], w.switch_s) for w in workers]
    stored = result.to_message(2, result.roles)
    _first, why = loop.decide(stored, 6.0, workers, QueueStats())
    assert why.reason == ControlReason.PROPOSED
    second, why = loop.decide(stored, 6.0, workers, QueueStats())
    assert why.reason == ControlReason.CONFIRMED, why
    assert (second.light_workers, second.heavy_workers, second.role_changes) == (1, 3, 2)


def test_a_burst_moves_the_heavy_worker_that_can_serve_light_first(profile):
    """A heavy worker switches once its batch ends: the burst takes the one whose batch ends first, even
    when another has a faster switch on record (1.5 s of batch + 0.4 s of load > 0.2 s + 0.8 s)."""
    loop = _loop(profile)
    workers = _workers(1, 3)
    stored = _stored(_loop(profile), workers, 6.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    heavy = [w for w in workers if w.role == "heavy"]
    heavy[0].busy_s, heavy[1].busy_s, heavy[2].busy_s = 1.5, 0.2, 2.0
    heavy[1].switch_s = 0.8
    result, _why = loop.burst(stored, 30.0, workers, QueueStats(light_backlog=40))
    assert [w.worker_id for w in heavy if result.roles[w.worker_id] == "light"] == [heavy[1].worker_id]


def test_a_worker_that_has_not_switched_is_assumed_to_switch_like_its_peers():
    """Its own measurement where it has one, else the median of the others', else the default."""
    assert switch_estimates({"a": 0.4, "b": 0.0, "c": 0.6, "d": 2.8}, DEFAULT_SWITCH_S) == {
        "a": 0.4,
        "b": 0.6,
        "c": 0.6,
        "d": 2.8,
    }
    assert switch_estimates({"a": 0.0, "b": 0.0}, DEFAULT_SWITCH_S) == {"a": DEFAULT_SWITCH_S, "b": DEFAULT_SWITCH_S}


def test_a_burst_takes_an_idle_heavy_worker_though_it_never_switched(profile):
    """The one heavy worker that switched before (0.4 s on record) runs a batch for 1.5 s more; the others never
    switched, one of them idle: with their switch taken as their peer's, the burst takes the idle one (with the
    5-s default it took the busy one, whose record looked faster)."""
    loop = _loop(profile)
    measured = {"w0": 0.4, "w1": 0.4, "w2": 0.0, "w3": 0.0}  # w0: light; w1 switched to heavy once
    switch_s = switch_estimates(measured, DEFAULT_SWITCH_S)
    busy_s = {"w1": 1.5, "w2": 2.0, "w3": 0.0}
    workers = [WorkerView(w, "light" if w == "w0" else "heavy", switch_s[w], busy_s.get(w, 0.0)) for w in measured]
    stored = _stored(_loop(profile), workers, 6.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    result, _why = loop.burst(stored, 30.0, workers, QueueStats(light_backlog=40))
    assert sorted(w for w, r in result.roles.items() if r == "light") == ["w0", "w3"]


def test_a_fixed_plan_does_not_react_to_a_burst(profile):
    loop = _loop(profile, policy="static", static_demand=6.0)
    workers = _workers(2, 2)
    stored = _stored(loop, workers, 6.0)
    assert not loop.light_pressure(stored, light_backlog=200, rate_qps=60.0)
    loop.demand.rate = 6.0
    assert loop.watch(stored, 60.0, 200, 200, now_s=10.0) is None


def test_between_ticks_the_threshold_steps_down_for_a_short_heavy_stage_and_back_up_when_it_has_room(profile):
    """At the cascade's threshold, a load that sends the heavy stage more than it runs (by the arrival rate and
    by the queue) gets the threshold a step down at once, which turns the heavy batch fill on; once the load
    falls and the heavy stage would run half empty at the cascade's threshold, it goes back up, the fill off.
    Roles and batches stay the plan's; one nudge per burst window."""
    workers = _workers(2, 14)
    stored = _stored(_loop(profile), workers, 6.0)
    stored.roles = {w.worker_id: w.role for w in workers}
    target = stored.target_threshold
    assert stored.threshold == target and stored.heavy_batch == 2 and stored.heavy_fill_ms == 0.0
    loop = _loop(profile)
    loop.demand.rate = 6.0  # the last tick measured 6 q/s
    assert loop.watch(stored, 24.0, 0, 20, now_s=0.0) is None  # the rate alone: 20 waiting is no queue for 14
    assert loop.watch(stored, 6.0, 0, 40, now_s=0.0) is None  # a queue without the rate behind it
    seen = loop.watch(stored, 24.0, 0, 40, now_s=1.0)
    assert seen == Watch.HEAVY_PRESSURE
    assert loop.watch(stored, 24.0, 0, 40, now_s=2.0) is None  # one nudge per burst window (2 s)
    result, why = loop.between_ticks(seen, stored, 24.0, workers, QueueStats(heavy_backlog=40))
    assert why.reason == ControlReason.HEAVY_PRESSURE and "heavy pressure" in result.reason
    lowered = result.to_message(2, result.roles)
    assert lowered.threshold == pytest.approx(target - 0.02) and lowered.heavy_fill_ms > 0
    assert lowered.roles == stored.roles and (lowered.light_batch, lowered.heavy_batch) == (
        stored.light_batch,
        stored.heavy_batch,
    )
    assert loop.watch(lowered, 24.0, 0, 40, now_s=4.0) is None  # below the target: the tick's replay judges
    assert loop.watch(lowered, 6.0, 0, 40, now_s=6.0) is None  # the load fell, but jobs still wait
    assert loop.watch(lowered, 12.0, 0, 5, now_s=8.0) is None  # at the target 12 q/s would fill over half
    seen = loop.watch(lowered, 6.0, 0, 5, now_s=10.0)
    assert seen == Watch.HEAVY_ROOM
    result, why = loop.between_ticks(seen, lowered, 6.0, workers, QueueStats(heavy_backlog=5))
    raised = result.to_message(3, result.roles)
    assert why.reason == ControlReason.HEAVY_ROOM
    assert raised.threshold == pytest.approx(target) and raised.heavy_fill_ms == 0.0


@pytest.mark.parametrize("before,after", [(6.0, 24.0), (24.0, 6.0)], ids=["step-up", "step-down"])
def test_a_level_shift_dates_from_the_first_tick_at_the_new_level(profile, before, after):
    """The replay re-levels the history before a shift to the new level; the shift began with the first tick at
    the new level, though it is only judged once four ticks say so. Dated four ticks back, the ticks in between
    would be re-leveled twice: at 4x, a phantom burst of 96 q/s the replay makes every plan miss."""
    loop = ControlLoop(profile, ControlSettings(slo_ms=5000))
    rates = [before] * 8 + [after] * 6
    for i, rate in enumerate(rates):
        loop.peak.update(rate, at=10.0 * (i + 1), seconds=10.0)
    shift = loop.level_shift()
    assert shift is not None
    ratio, age_s = shift
    assert ratio == pytest.approx(after / before)
    assert age_s == pytest.approx(60.0)  # six ticks of 10 s at the new level, not the last four


def test_from_ten_workers_two_light_workers_wait_for_the_next_burst(profile):
    """Where a one-worker move is inside the role hysteresis (10 % of the workers, rounded down: ten and more),
    the controller keeps a second light worker even when one carries the load; below that, one."""
    for workers, light in ((8, 1), (9, 1), (10, 2), (16, 2)):
        loop = ControlLoop(profile, ControlSettings(slo_ms=5000))
        result = loop.solve(2.0, {f"w{i}": "" for i in range(workers)}, QueueStats(), None)
        assert result.light_workers == light, workers

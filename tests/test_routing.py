"""The data plane's decision tables (common/routing.py): the deadline rule and the routing
decisions, one row per case, edge rows included."""

from __future__ import annotations

import math

import pytest

from common.routing import (
    Decision,
    Stage,
    cascade_decision,
    decision_order,
    degrades_late,
    direct_decision,
    finishes_in_time,
    joining_ms,
    queue_wait_ms,
)

# (backlog, workers, batch, batch_ms) -> expected wait before a job joining now starts
WAITS = [
    (0, 4, 2, 2000.0, 0.0),  # no queue
    (8, 4, 2, 2000.0, 2000.0),  # one full round of every worker ahead
    (3, 4, 2, 2000.0, 750.0),  # part of a round
    (40, 4, 2, 2000.0, 10000.0),  # a long queue
    (5, 1, 1, 100.0, 500.0),
    (-3, 2, 1, 100.0, 0.0),  # a negative backlog reading counts as none
    (5, 0, 2, 2000.0, math.inf),  # no heavy worker: never on time
    (5, 2, 2, 0.0, 0.0),  # a stage that takes no time (a profile of zeros)
]


@pytest.mark.parametrize("backlog,workers,batch,batch_ms,wait", WAITS)
def test_queue_wait(backlog, workers, batch, batch_ms, wait):
    assert queue_wait_ms(backlog, workers, batch, batch_ms) == pytest.approx(wait)


# (backlog, workers, joining ms) -> wait; batches of 10 jobs in 1000 ms (10 jobs/s a worker)
JOINING_WAITS = [
    (40, 1, (), 4000.0),
    (40, 1, (1000.0,), 2500.0),  # 10 served alone, the other 30 by two workers: 1.5 s more
    (40, 1, (5000.0,), 4000.0),  # it joins after the queue ahead has drained: no help
    (40, 1, (1000.0, 2000.0), 2000.0 + 1000.0 / 3),  # 10, then 20 by two, the last 10 by three
    (40, 0, (1000.0,), 5000.0),  # nobody serves until the first joins
    (0, 0, (1000.0,), 1000.0),
    (0, 0, (), math.inf),
]


def test_a_stage_that_takes_no_time_waits_only_for_its_first_worker():
    assert queue_wait_ms(40, 1, 10, 0.0, (1000.0,)) == 0.0
    assert queue_wait_ms(40, 0, 10, 0.0, (1000.0, 2000.0)) == 1000.0


def test_the_workers_joining_a_stage_are_those_the_plan_moves_there_with_a_measured_switch():
    planned = {"a": "light", "b": "light", "c": "light", "d": "heavy"}
    workers = [
        ("a", "heavy", 0.4, 10_800.0),  # running a heavy batch until 800 ms from now, then 400 ms to load
        ("b", "heavy", 0.0, 0.0),  # never switched: its load time is unknown, not counted
        ("c", "light", 0.4, 0.0),  # already serves light: one of the stage's workers
        ("d", "heavy", 0.4, 0.0),  # the plan keeps it heavy
        ("e", "heavy", 0.4, 0.0),  # not in the plan
    ]
    assert joining_ms("light", planned, workers, now_ms=10_000.0) == pytest.approx((1200.0,))
    assert joining_ms("light", planned, [("a", "heavy", 0.4, 9_000.0)], now_ms=10_000.0) == pytest.approx((400.0,))


@pytest.mark.parametrize("backlog,workers,joining,wait", JOINING_WAITS)
def test_queue_wait_counts_workers_joining_the_stage(backlog, workers, joining, wait):
    assert queue_wait_ms(backlog, workers, 10, 1000.0, joining) == pytest.approx(wait)


# (now, deadline, queue wait, batch time) -> on time?
DEADLINES = [
    (0.0, 5000.0, 0.0, 2000.0, True),  # on time, no queue
    (0.0, 5000.0, 3000.0, 2000.0, True),  # exactly at the deadline counts as on time
    (0.0, 5000.0, 3000.1, 2000.0, False),  # a long queue makes it late
    (4000.0, 5000.0, 0.0, 2000.0, False),  # late even with no queue: too little time left
    (6000.0, 5000.0, 0.0, 0.0, False),  # deadline already passed
    (0.0, 5000.0, math.inf, 2000.0, False),  # no heavy workers
]


@pytest.mark.parametrize("now,deadline,wait,batch_ms,expected", DEADLINES)
def test_deadline_rule(now, deadline, wait, batch_ms, expected):
    assert finishes_in_time(now, deadline, wait, batch_ms) is expected


def test_heavy_stage_counts_its_own_admissions():
    stage = Stage(workers=2, batch=2, batch_ms=1000.0)
    # deadline 2.5 s: room for jobs that start within 1.5 s, i.e. the first 6 (3 per 1.5 rounds of 4)
    admitted = 0
    for _ in range(10):
        if stage.on_time(0.0, 2500.0):
            stage.admit()
            admitted += 1
    assert admitted == 7  # waits 0, 250, ..., 1500 ms are on time; 1750 is not
    assert stage.backlog == 7


# (confidence, threshold, discriminator routes, degrade late, fallback, on time) -> decision
CASCADE = [
    (0.9, 0.5, True, True, False, True, Decision.LIGHT),  # confident: light
    (0.5, 0.5, True, True, False, True, Decision.LIGHT),  # exactly at the threshold: light
    (0.1, 0.5, True, True, False, True, Decision.HEAVY),  # unsure and the heavy model makes it
    (0.1, 0.5, True, True, False, False, Decision.LATE),  # unsure but it would be late: degraded light
    (0.1, 0.5, True, False, False, False, Decision.HEAVY),  # late, but this policy keeps late jobs heavy
    (0.1, 0.5, False, True, False, True, Decision.LIGHT),  # the discriminator does not route (proteus)
    (0.9, 0.5, True, True, True, True, Decision.LATE),  # came back from heavy: its light image, degraded
    (0.1, 0.0, True, True, False, True, Decision.LIGHT),  # t = 0: everything light
    (0.99, 1.01, True, True, False, True, Decision.HEAVY),  # t above every confidence: everything heavy
]


@pytest.mark.parametrize("confidence,threshold,routes,degrade,fallback,on_time,expected", CASCADE)
def test_cascade_decision(confidence, threshold, routes, degrade, fallback, on_time, expected):
    assert (
        cascade_decision(
            confidence, threshold, discriminator_routes=routes, degrade_late=degrade, fallback=fallback, on_time=on_time
        )
        == expected
    )


# (draw, heavy fraction, degrade late, on time) -> decision
DIRECT = [
    (0.2, 0.5, True, True, Decision.HEAVY),
    (0.7, 0.5, True, True, Decision.LIGHT),
    (0.5, 0.5, True, True, Decision.LIGHT),  # draw == fraction: not below it
    (0.2, 0.5, True, False, Decision.LATE),  # would be late: the light model answers it
    (0.2, 0.5, False, False, Decision.HEAVY),  # clipper-heavy keeps it heavy
    (0.99, 1.0, True, True, Decision.HEAVY),  # every job straight to heavy
    (0.0, 0.0, True, True, Decision.LIGHT),  # none
]


@pytest.mark.parametrize("draw,fraction,degrade,on_time,expected", DIRECT)
def test_direct_decision(draw, fraction, degrade, on_time, expected):
    assert direct_decision(draw, fraction, degrade_late=degrade, on_time=on_time) == expected


@pytest.mark.parametrize(
    "late_policy,plan_says,expected",
    [("plan", True, True), ("plan", False, False), ("light", False, True), ("heavy", True, False)],
)
def test_late_policy_override(late_policy, plan_says, expected):
    assert degrades_late(late_policy, plan_says) is expected


def test_decision_order_hardest_first():
    assert decision_order([0.3, 0.05, 0.9, 0.05]) == [1, 3, 0, 2]
    assert decision_order([]) == []

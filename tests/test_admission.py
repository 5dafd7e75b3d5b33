"""Admission by predicted wait (common/admission.py): one row per case, edge rows included."""

from __future__ import annotations

import pytest

from common.admission import NO_WORKERS_RETRY_MS, admit
from common.messages import Plan
from common.routing import Decision, Stage

CASCADE = Plan(policy="diffserve")  # degrade_late, the discriminator routes, t = 0.5
STRICT = Plan(policy="strict-cascade", degrade_late=False)  # the same, but late heavy jobs stay heavy
STRICT_T0 = Plan(policy="strict-cascade", degrade_late=False, threshold=0.0)
NO_ROUTING = Plan(policy="no-routing", degrade_late=False, discriminator_routes=False)
CLIPPER_HEAVY = Plan(policy="clipper-heavy", heavy_fraction=1.0, degrade_late=False, discriminator_routes=False)
PROTEUS = Plan(policy="proteus", heavy_fraction=0.3, discriminator_routes=False)

L = (2, 4, 200.0)  # light: 2 workers x batch 4 in 200 ms, so each job queued ahead adds 25 ms
H = (2, 2, 2160.0)  # heavy: 2 workers x batch 2 in 2160 ms, 540 ms a job ahead
H1 = (1, 1, 1780.0)  # heavy: one worker, batch 1
CAP = 1000
LIGHT, HEAVY, LATE, NO_WORKERS = Decision.LIGHT, Decision.HEAVY, Decision.LATE, NO_WORKERS_RETRY_MS

# (case, plan, route, deadline, light (workers, batch, ms), light backlog, heavy ..., heavy backlog,
#  discriminator ms) -> (admitted, retry_after_ms)
# fmt: off
ROWS = [
    ("cascade, nothing queued", CASCADE, LIGHT, 5000, L, 0, H, 0, 20.0, True, None),
    ("cascade, a queue that fits", CASCADE, LIGHT, 5000, L, 100, H, 0, 20.0, True, None),
    ("cascade, finishing exactly at the deadline", CASCADE, LIGHT, 5000, L, 192, H, 0, 0.0, True, None),
    ("cascade, one job more: refused", CASCADE, LIGHT, 5000, L, 193, H, 0, 0.0, False, 25),
    ("cascade, the discriminator's time counts", CASCADE, LIGHT, 5000, L, 192, H, 0, 20.0, False, 20),
    ("cascade degrades late: a full heavy queue does not matter", CASCADE, LIGHT, 5000, L, 0, H, 999, 20, True, None),
    ("no degrading: light then heavy fits", STRICT, LIGHT, 5000, L, 0, H1, 1, 20.0, True, None),
    ("no degrading: the heavy queue after light does not fit", STRICT, LIGHT, 5000, L, 0, H1, 2, 20, False, 560),
    ("no degrading, t = 0: nothing goes heavy", STRICT_T0, LIGHT, 5000, L, 0, H1, 99, 20.0, True, None),
    ("no degrading, no routing: nothing goes heavy", NO_ROUTING, LIGHT, 5000, L, 0, H1, 99, 20, True, None),
    ("clipper-heavy: the heavy queue fits", CLIPPER_HEAVY, HEAVY, 5000, L, 0, H, 5, 20.0, True, None),
    ("clipper-heavy: it does not", CLIPPER_HEAVY, HEAVY, 5000, L, 0, H, 6, 20.0, False, 400),
    ("straight to heavy: the light cap does not apply", CLIPPER_HEAVY, HEAVY, 5000, L, CAP, H, 0, 20, True, None),
    ("proteus: a direct job that fits heavy", PROTEUS, HEAVY, 5000, L, 999, H, 5, 20.0, True, None),
    ("proteus: the heavy share's fallback needs the light stage", PROTEUS, LATE, 5000, L, 193, H, 9, 0, False, 25),
    ("proteus: fallback that fits", PROTEUS, LATE, 5000, L, 10, H, 99, 20.0, True, None),
    ("proteus: a fallback never needs heavy", PROTEUS, LATE, 5000, L, 0, H, 10**6, 20.0, True, None),
    ("light cap reached", CASCADE, LIGHT, 600000, L, CAP, H, 0, 20.0, False, 25),
    ("light cap, three past it", CASCADE, LIGHT, 600000, L, CAP + 2, H, 0, 20.0, False, 75),
    ("one below the light cap", CASCADE, LIGHT, 600000, L, CAP - 1, H, 0, 20.0, True, None),
    ("no live light worker", CASCADE, LIGHT, 5000, (0, 4, 200.0), 0, H, 0, 20, False, NO_WORKERS),
    ("no live heavy worker", CLIPPER_HEAVY, HEAVY, 5000, L, 0, (0, 2, 2160.0), 0, 20, False, NO_WORKERS),
    ("a deadline shorter than a batch, stage idle: best effort", CASCADE, LIGHT, 100, L, 0, H, 0, 20, True, None),
    ("a deadline shorter than a batch, a job ahead", CASCADE, LIGHT, 100, L, 1, H, 0, 20.0, False, 25),
    ("heavy too slow for the SLO, idle: best effort", CLIPPER_HEAVY, HEAVY, 1000, L, 0, H, 0, 20, True, None),
    ("a fraction of a ms over: the hint is at least 1 ms", CASCADE, LIGHT, 4999.5, L, 192, H, 0, 0, False, 1),
]
# fmt: on


@pytest.mark.parametrize(
    "plan,route,deadline,light,light_backlog,heavy,heavy_backlog,disc_ms,admitted,retry_after",
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_admission(plan, route, deadline, light, light_backlog, heavy, heavy_backlog, disc_ms, admitted, retry_after):
    verdict = admit(
        plan,
        route,
        0.0,
        deadline,
        light=Stage(*light, backlog=light_backlog),
        heavy=Stage(*heavy, backlog=heavy_backlog),
        discriminator_ms=disc_ms,
        max_light_backlog=CAP,
    )
    assert verdict.admitted is admitted, verdict
    assert verdict.retry_after_ms == (None if retry_after is None else pytest.approx(retry_after))
    assert bool(verdict.reason) is not admitted


@pytest.mark.parametrize("joining_ms,admitted", [((), False), ((1000.0,), True), ((4000.0,), False)])
def test_a_worker_joining_the_light_stage_counts_from_when_it_serves(joining_ms, admitted):
    """One light worker (4 jobs per 200 ms) with 150 jobs ahead: 7.5 s of wait alone, refused for a 5-s deadline;
    with a heavy worker the plan moved that serves light in 1 s, 20 jobs drain alone and 130 by two (3.25 s
    more), so the job fits; one that serves only in 4 s helps too little."""
    light = Stage(1, 4, 200.0, backlog=150, joining_ms=joining_ms)
    verdict = admit(
        CASCADE, LIGHT, 0.0, 5000.0, light=light, heavy=Stage(*H), discriminator_ms=20.0, max_light_backlog=CAP
    )
    assert verdict.admitted is admitted, verdict


def test_admissions_within_one_batch_count_against_the_next():
    """What the router does with one read batch: every admitted job joins the stage it was
    admitted to, so the same measurement cannot let in more than fits."""
    light, heavy = Stage(*L), Stage(*H)
    verdicts = []
    for _ in range(300):
        verdict = admit(
            CASCADE, Decision.LIGHT, 0.0, 5000.0, light=light, heavy=heavy, discriminator_ms=0.0, max_light_backlog=CAP
        )
        if verdict.admitted:
            light.admit()
        verdicts.append(verdict.admitted)
    assert verdicts == [True] * 193 + [False] * 107  # waits 0, 25, ..., 4800 ms fit a 200 ms batch in 5 s


def test_a_source_over_its_share_gets_only_part_of_the_slack_and_of_the_cap():
    """budget 0.75: the light queue may hold 0.75 of the 4800 ms slack (144 jobs at 25 ms), and of the cap."""

    def admitted(backlog: int, budget: float, deadline: float = 5000.0) -> bool:
        light = Stage(*L, backlog=backlog)
        return admit(
            CASCADE, LIGHT, 0.0, deadline, light=light, heavy=Stage(*H), discriminator_ms=0.0,
            max_light_backlog=CAP, budget=budget,
        ).admitted  # fmt: skip

    assert [admitted(b, 0.75) for b in (143, 144, 145)] == [True, True, False]
    assert [admitted(b, 1.0) for b in (144, 192, 193)] == [True, True, False]  # the full slack as before
    assert admitted(749, 0.75, 10**7) and not admitted(750, 0.75, 10**7)  # 0.75 of the cap of 1000
    assert admitted(0, 0.75, 100)  # too tight a deadline even when idle: best effort as before


def test_fair_share_marks_the_source_with_more_than_its_share_of_recent_admissions():
    from common.admission import FairShare

    fair = FairShare(window_s=5.0)
    for t in range(10):
        fair.arrived("flood", t / 10)
        fair.admitted("flood", t / 10)
    assert not fair.over_share("flood", 1.0, fair.active(1.0))  # alone: everything is its share
    fair.arrived("quiet", 1.0)
    fair.admitted("quiet", 1.0)
    active = fair.active(1.0)
    assert active == 2 and fair.over_share("flood", 1.0, active) and not fair.over_share("quiet", 1.0, active)
    assert fair.active(20.0) == 0  # both quiet for longer than the window: forgotten


def test_the_router_closes_a_tenants_newest_connections_beyond_the_cap():
    from services.router import over_connection_cap

    listing = "\n".join(
        [f"id={i} addr=127.0.0.1:{i} name= user=hog cmd=ping" for i in range(10, 15)]
        + ["id=3 addr=127.0.0.1:3 name=router:router user=default cmd=xreadgroup", "id=4 user=other cmd=ping"]
    )
    assert over_connection_cap(listing, {"hog", "other"}, 2) == ["14", "13", "12"]
    assert over_connection_cap(listing, {"other"}, 2) == []


@pytest.mark.parametrize("late_policy,queued", [("plan", "light"), ("heavy", None)])
def test_the_router_applies_late_policy_like_the_other_stages(redis_server, late_policy, queued):
    """DIFFSERVE_LATE_POLICY reaches the router's direct routing and admission too: a job a split plan sends
    straight to a heavy stage that cannot take it in time goes to the light model under ``plan`` (the plan
    degrades late jobs), and stays heavy (here: refused, no heavy worker) under ``heavy``."""
    import asyncio

    from common.messages import FinalResult, Role
    from common.plan_store import store_plan
    from common.service import Service, now_ms
    from services.router import RouterConfig
    from services.router.app import Router

    cfg = RouterConfig(redis_url=redis_server.url, late_policy=late_policy, instance_id="r")

    async def go() -> tuple[int, int, FinalResult | None]:
        svc = Service("router", cfg)
        try:
            await svc.wait_for_redis()
            keys, r = svc.keys, svc.redis
            await r.zadd(keys.workers, {"w0": now_ms()})  # one live light worker, no heavy one
            await r.hset(keys.worker_info("w0"), mapping={"role": Role.LIGHT})
            await store_plan(r, keys, Plan(version=1, policy="proteus", heavy_fraction=1.0, degrade_late=True))
            await r.xadd(keys.jobs, {"job_id": "j1", "prompt": "a lighthouse at dusk"})
            await Router(svc).admission.admit_batch()
            answer = await r.lpop(keys.result("j1"))
            result = FinalResult.decode(answer) if isinstance(answer, bytes) else None
            return await r.xlen(keys.light_queue), await r.xlen(keys.heavy_queue), result
        finally:
            await svc.redis.aclose()

    light, heavy, result = asyncio.run(go())
    if queued == "light":
        assert (light, heavy, result) == (1, 0, None)
    else:
        assert (light, heavy) == (0, 0) and result is not None and result.error_code == "overloaded"
        assert "no live heavy worker" in (result.error_message or "")

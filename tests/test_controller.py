"""The controller against a real redis-server: fake worker heartbeats, jobs XADDed at a
known rate, and the plan it writes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from common import metrics
from common.config import Keys
from common.demand import RateEstimator
from common.localstack import RedisServer
from common.messages import Plan
from common.plan_store import load_plan
from common.service import Service, now_ms
from services.controller import ControllerConfig, serve

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def _namespace() -> str:
    return "t" + uuid.uuid4().hex[:8]


async def _heartbeats(
    r: aioredis.Redis, keys: Keys, roles: dict[str, str], stop: asyncio.Event, alive: set[str] | None = None
) -> None:
    """What live workers write: a zset score and an info hash, every 0.2 s."""
    while not stop.is_set():
        for w, role in roles.items():
            if alive is not None and w not in alive:
                continue
            await r.zadd(keys.workers, {w: now_ms()})
            await r.hset(keys.worker_info(w), mapping={"role": role, "switch_s": 0.05, "heartbeat_ms": now_ms()})
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def _produce(r: aioredis.Redis, keys: Keys, rate: float, seconds: float) -> float:
    """XADD jobs at ``rate`` per second for ``seconds``; returns the rate achieved."""
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:
            await r.xadd(keys.jobs, {"job_id": f"j{n}", "prompt": "a cat"})
            n += 1
        await asyncio.sleep(0.01)
    return n / (time.monotonic() - start)


class InProcess:
    """The controller's serve() in this event loop, stopped like SIGTERM would."""

    def __init__(self, url: str, namespace: str, **overrides):
        cfg = dict(
            redis_url=url,
            namespace=namespace,
            interval_s=0.5,
            worker_timeout_s=1.0,
            instance_id="controller-test",
            backend="profiled",
        )
        cfg.update(overrides)
        self.svc = Service("controller", ControllerConfig(**cfg))
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        await self.svc.wait_for_redis()
        self.task = asyncio.create_task(serve(self.svc))
        return self

    async def __aexit__(self, *exc):
        self.svc.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.svc.redis.aclose()


def test_rate_estimator_smooths_and_looks_ahead():
    est = RateEstimator(alpha=0.5)
    est.update(0, 0.0)
    assert est.forecast() == 0.0
    for i in range(1, 11):
        est.update(10 * i, float(i))  # 10/s
    assert est.smoothed == pytest.approx(10.0, rel=0.01)
    assert est.forecast() == pytest.approx(10.0, rel=0.01)
    est.update(10 * 10 + 30, 11.0)  # a jump to 30/s: the trend is extrapolated one interval
    assert est.smoothed == pytest.approx(20.0, rel=0.01)
    assert est.forecast() > est.smoothed
    est.update(5, 12.0)  # the stream was recreated: its counter restarted, the 5 jobs are new ones
    assert est.raw == pytest.approx(5.0)  # (``smoothed`` clamps at 0, so it could not show a negative rate)


def test_a_stream_the_controller_may_not_read_is_an_error_not_zero_demand(redis_server):
    """Only a missing stream counts as no arrivals: a Redis user without permission on the jobs stream
    gets NOPERM from the demand measurement (not a demand of 0, which would plan the cluster for idle)."""
    from redis.exceptions import NoPermissionError

    from services.controller import Controller

    ns = _namespace()
    redis_server.cli("ACL", "SETUSER", "narrow", "on", ">pw", f"~{ns}:in:*", "+@all")
    cfg = ControllerConfig(
        redis_url=redis_server.url, redis_username="narrow", redis_password="pw", namespace=ns, backend="profiled"
    )

    async def go() -> int:
        svc = Service("controller", cfg)
        try:
            controller = Controller(svc)
            with pytest.raises(NoPermissionError):
                await controller.entries_added(svc.keys.jobs)
            return await controller.entries_added(svc.keys.tenant_in("nobody-yet"))  # allowed, not created
        finally:
            await svc.redis.aclose()

    assert asyncio.run(go()) == 0


@pytest.mark.slow
def test_controller_plans_for_live_workers_and_tracks_demand(redis_url):
    ns = _namespace()
    keys = Keys(ns)
    roles = {"w0": "light", "w1": "light", "w2": "heavy", "w3": "heavy"}

    async def scenario():
        r = aioredis.from_url(redis_url)
        stop = asyncio.Event()
        alive = set(roles)
        beats = asyncio.create_task(_heartbeats(r, keys, roles, stop, alive))
        try:
            async with InProcess(redis_url, ns):
                achieved = await _produce(r, keys, 8.0, 5.0)
                plan = await load_plan(r, keys)
                assert plan is not None and plan.version >= 5
                assert set(plan.roles) == set(roles)
                assert plan.light_workers + plan.heavy_workers == 4
                assert set(plan.roles.values()) <= {"light", "heavy"}
                assert plan.demand_qps == pytest.approx(achieved, rel=0.35)
                assert metrics.registry("controller").get_sample_value("diffserve_demand_qps") == pytest.approx(
                    plan.demand_qps, rel=0.5
                )
                assert metrics.registry("controller").get_sample_value("diffserve_plan_infeasible") == 0
                # steady demand: roles do not flip from tick to tick
                before = plan
                await _produce(r, keys, 8.0, 2.0)
                after = await load_plan(r, keys)
                assert after.version > before.version
                assert after.roles == before.roles
                # a worker stops its heartbeat: it leaves the plan after the timeout
                alive.discard("w3")
                await _produce(r, keys, 8.0, 2.5)
                plan = await load_plan(r, keys)
                assert set(plan.roles) == {"w0", "w1", "w2"}
                assert plan.light_workers + plan.heavy_workers == 3
        finally:
            stop.set()
            await beats
            await r.aclose()

    asyncio.run(scenario())


@pytest.mark.slow
def test_infeasible_demand_and_time_scale(redis_url):
    """One worker, 30 jobs/s: more than one SD-Turbo worker can do at profiled speed (about
    21/s), but fine when the profiled backend runs 10x faster (time_scale 0.1)."""

    async def scenario(time_scale: float) -> Plan:
        ns = _namespace()
        keys = Keys(ns)
        r = aioredis.from_url(redis_url)
        stop = asyncio.Event()
        beats = asyncio.create_task(_heartbeats(r, keys, {"w0": "light"}, stop))
        try:
            async with InProcess(redis_url, ns, time_scale=time_scale):
                await _produce(r, keys, 30.0, 3.5)
                plan = await load_plan(r, keys)
                infeasible = metrics.registry("controller").get_sample_value("diffserve_plan_infeasible")
        finally:
            stop.set()
            await beats
            await r.aclose()
        assert plan.roles == {"w0": "light"}
        assert plan.demand_qps > 20
        assert infeasible == (0 if plan.feasible else 1)
        return plan

    slow = asyncio.run(scenario(1.0))
    assert not slow.feasible and slow.threshold == 0.0
    fast = asyncio.run(scenario(0.1))
    assert fast.feasible


@pytest.mark.slow
def test_controller_process_stops_and_plan_stays(redis_url):
    ns = _namespace()
    keys = Keys(ns)
    r = redis.Redis.from_url(redis_url)
    for w, role in (("a", "light"), ("b", "heavy")):
        r.zadd(keys.workers, {w: now_ms() + 3_600_000})  # heartbeats "from the future" keep them live
        r.hset(keys.worker_info(w), mapping={"role": role, "switch_s": 0.1})
    env = {**os.environ, "REDIS_URL": redis_url, "DIFFSERVE_NAMESPACE": ns, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.controller",
            "--interval-s",
            "0.3",
            "--policy",
            "diffserve",
            "--instance-id",
            "ctl",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        plan = None
        while time.monotonic() < deadline:
            raw = r.get(keys.plan)
            plan = Plan.decode(raw) if raw else None
            if plan is not None and plan.version >= 3:
                break
            time.sleep(0.1)
        assert plan is not None and plan.version >= 3, "no plan written"
        assert set(plan.roles) == {"a", "b"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    log = out.decode(errors="replace")
    assert '"msg": "ready"' in log and '"msg": "new plan"' in log
    stored = r.get(keys.plan)
    time.sleep(1.0)
    assert r.get(keys.plan) == stored  # the last plan stays in force without a controller
    last = Plan.decode(stored)
    assert last.version >= plan.version and set(last.roles) == {"a", "b"}
    r.close()


def test_every_stage_counts_the_same_live_workers(redis_server):
    """One alive window (WorkerRegistrySettings.worker_timeout_s, the same option in every service) and one
    registry reader: the controller's plan, the router's and discriminator's view of a stage and the
    gateway's readiness count the same workers."""
    from common.messages import Role
    from common.plan_store import StageWatcher, live_ids, live_roles
    from services.controller import Controller
    from services.gateway.config import GatewayConfig
    from services.router import RouterConfig

    cfg = ControllerConfig(redis_url=redis_server.url, namespace=_namespace(), backend="profiled")
    windows = {c.__name__: c(redis_url=redis_server.url).worker_timeout_s for c in (RouterConfig, GatewayConfig)}
    assert windows == {"RouterConfig": cfg.worker_timeout_s, "GatewayConfig": cfg.worker_timeout_s}

    async def go() -> tuple[set[str], list[str], dict[str, str], set[str], int]:
        svc = Service("controller", cfg)
        keys, r = svc.keys, svc.redis
        try:
            now = now_ms()
            ages_s = {"fresh": 1.0, "stale": cfg.worker_timeout_s + 2.0}  # the gateway used to count 10 s
            for worker, age in ages_s.items():
                await r.zadd(keys.workers, {worker: now - age * 1000})
                await r.hset(keys.worker_info(worker), mapping={"role": "light", "switch_s": 0.5})
            await r.hset(keys.worker_info("fresh"), "busy_until_ms", now + 1500)  # its batch ends in 1.5 s
            controller = Controller(svc)
            views = await controller.live_workers(None)
            assert 1.3 < views[0].busy_s <= 1.5 and views[0].switch_s == 0.5
            watcher = StageWatcher(r, keys, cfg.worker_timeout_s)
            stage = await watcher.stage(Role.LIGHT, Plan(), lambda n: 100.0)
            # a plan that moves it to the heavy stage: the router's admission counts it there from when its batch
            # has ended and it has loaded the other model (its last switch, 0.5 s)
            moved = Plan(roles={"fresh": "heavy"})
            joining = (await watcher.stage(Role.HEAVY, moved, lambda n: 100.0, joining=True)).joining_ms
            assert len(joining) == 1 and 1800.0 < joining[0] <= 2000.0, joining
            assert (await watcher.stage(Role.HEAVY, moved, lambda n: 100.0)).joining_ms == ()
            return (
                await controller.live_ids(),
                [v.worker_id for v in views],
                await live_roles(r, keys, cfg.worker_timeout_s),
                await live_ids(r, keys, cfg.worker_timeout_s),
                stage.workers,
            )
        finally:
            await r.aclose()

    ids, views, roles, gateway_ids, stage_workers = asyncio.run(go())
    assert ids == {"fresh"} and views == ["fresh"] and roles == {"fresh": "light"}
    assert gateway_ids == ids and stage_workers == 1

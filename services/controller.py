"""Controller: every ``--interval-s`` it measures demand, live workers and queues, lets the
control law (common/control.py, over the planner in common/planner.py) decide the plan and
writes it where every service reads it (common/plan_store.py).

Measurements, each tick:

1. demand: the jobs stream's ``entries-added`` counter (XINFO STREAM; trimming does not change it);
2. live workers: members of the ``workers`` zset whose heartbeat (score, ms) is younger than
   ``--worker-timeout-s``; each worker's info hash gives its role and measured switch time;
3. queues: the backlog of the light, discriminator and heavy queues (undelivered + pending).

The plan is stored with the stored version + 1 (so a restarted controller continues the
sequence); metrics are exported and a line is logged when the plan changed.

Units: with the profiled backend every model latency is multiplied by ``--time-scale`` and
load tests scale the SLO the same way, so the controller plans with latencies x time_scale and
SLO = ``--slo-ms`` (wall-clock, like the router's deadlines; default the cascade's x time_scale).
Demand is measured in real (wall-clock) queries/s, which in a time-scaled run are already "fast"
units, so everything the planner sees is in the same clock.  Other backends plan with the profile
as is (time_scale 1).  ``Plan.demand_qps`` holds the measured (real-time) demand.

AIMD batching (``--policy aimd``) reads SLO outcomes from the ``stats`` hash (fields
``slo_miss`` and ``slo_hit``, counters) that the router maintains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.exceptions import ResponseError

from common import metrics
from common.backends import BackendSettings, SloSettings, effective_slo_ms, latency_scale, load_profile
from common.config import ServiceConfig, WorkerRegistrySettings, option
from common.control import (
    DEFAULT_SWITCH_S,
    WATCH_S,
    ControlLoop,
    ControlReason,
    ControlSettings,
    Watch,
    Why,
    WorkerView,
    switch_estimates,
)
from common.messages import Objective, Plan, Policy
from common.plan_store import live_ids, live_workers, load_arrivals, load_confidences, load_plan, store_plan
from common.planner import (
    OBJECTIVES,
    POLICIES,
    ROLES,
    AimdState,
    FixedPlan,
    PlanResult,
    QueueStats,
    count_changes,
    warm_up,
)
from common.scaling import workers_wanted
from common.service import Service, now_ms, run
from common.streams import backlog, missing, run_forever
from common.tenants import tenant_names

DEFAULT = ControlSettings(slo_ms=0.0)  # the control law's defaults (its knobs' one declaration)
MIN_INTERVAL_S = 0.25
SETTLE_S = 0.5


@dataclass(kw_only=True)
class ControllerConfig(ServiceConfig, BackendSettings, SloSettings, WorkerRegistrySettings):
    """diffserve controller: re-plans threshold, batch sizes and worker roles."""

    interval_s: float | None = option(
        None,
        f"seconds between plans (default: {DEFAULT.interval_s:g} s of full-speed time, so "
        f"{DEFAULT.interval_s:g} x time_scale on the profiled backend, at least {MIN_INTERVAL_S} s)",
        env="DIFFSERVE_INTERVAL_S",
    )
    policy: str = option(DEFAULT.policy, "serving policy", env="DIFFSERVE_POLICY", choices=POLICIES)
    objective: str = option(
        "auto",
        "quality (best estimated FID) or threshold (max t, the paper); auto: "
        "quality where the cascade has a quality curve",
        env="DIFFSERVE_OBJECTIVE",
        choices=("auto",) + OBJECTIVES,
    )
    static_plan: str | None = option(
        None,
        "the static policy's fixed plan, e.g. t=0.02,light=4x16,heavy=12x4 "
        "(workers x batch); default: the solver's plan for --static-demand",
        env="DIFFSERVE_STATIC_PLAN",
    )
    static_demand: float | None = option(
        None,
        "demand (q/s, wall clock) the static plan is solved for (default: the first demand measured)",
        env="DIFFSERVE_STATIC_DEMAND",
    )
    ewma_alpha: float = option(
        DEFAULT.ewma_alpha,
        "weight of the newest rate sample in the demand estimate while it rises",
        env="DIFFSERVE_EWMA_ALPHA",
    )
    ewma_alpha_down: float = option(
        DEFAULT.ewma_alpha_down,
        "... and while it falls: slow decay, so a bursty load is not planned for its lulls",
        env="DIFFSERVE_EWMA_ALPHA_DOWN",
    )
    peak_window_s: float = option(
        DEFAULT.peak_window_s,
        "the light stage is provisioned for at least the demand this many full-speed seconds of history "
        "exceeded for --peak-share of the time (a burst above it moves heavy workers to the light stage "
        "between ticks)",
        env="DIFFSERVE_PEAK_WINDOW_S",
    )
    peak_share: float = option(DEFAULT.peak_share, "see --peak-window-s", env="DIFFSERVE_PEAK_SHARE")
    hindsight_s: float = option(
        DEFAULT.hindsight_s,
        "replay this many full-speed seconds of recent arrivals under candidate plans to choose the "
        "threshold and batch sizes (0: the solver's alone)",
        env="DIFFSERVE_HINDSIGHT_S",
    )
    max_threshold_step: float = option(
        DEFAULT.max_threshold_step,
        "largest change of the threshold from one plan to the next, unless nothing that close is feasible",
        env="DIFFSERVE_MAX_THRESHOLD_STEP",
    )
    max_threshold_rise: float = option(
        DEFAULT.max_threshold_rise,
        "largest rise of the threshold from one plan to the next while nothing waits for a heavy worker (a "
        "threshold above what the heavy stage can carry costs light answers for easier prompts only: the exchange)",
        env="DIFFSERVE_MAX_THRESHOLD_RISE",
    )
    headroom: float = option(
        DEFAULT.headroom,
        "plan every stage at most this busy (the profiled latencies are means)",
        env="DIFFSERVE_HEADROOM",
    )
    threshold_margin: float = option(
        DEFAULT.threshold_margin,
        "keep the current roles unless the new plan's threshold differs by more than this",
        env="DIFFSERVE_THRESHOLD_MARGIN",
    )
    worker_margin_share: float = option(
        DEFAULT.worker_margin_share,
        "... or its light/heavy split by more than this share of the workers, rounded down (0 below 10 workers)",
        env="DIFFSERVE_WORKER_MARGIN_SHARE",
    )
    default_switch_s: float = option(
        DEFAULT_SWITCH_S,
        "role-switch time assumed for a worker that has not switched yet while no worker has (unscaled; "
        "else its peers' median)",
        env="DIFFSERVE_DEFAULT_SWITCH_S",
    )
    max_switch_fraction: float = option(
        DEFAULT.max_switch_fraction,
        "at most this share of the workers change role per tick unless the current allocation cannot serve demand",
        env="DIFFSERVE_MAX_SWITCH_FRACTION",
    )
    spare_util: float = option(
        DEFAULT.spare_util,
        "spare workers go to the busiest stage while its utilisation is above this",
        env="DIFFSERVE_SPARE_UTIL",
    )
    heavy_fill_ms: float = option(
        DEFAULT.heavy_fill_ms,
        "while the plan's threshold is below the cascade's target (the heavy stage limits quality), a heavy worker "
        "that read fewer jobs than its batch waits up to this long for more (full-speed ms; 0: never)",
        env="DIFFSERVE_HEAVY_FILL_MS",
    )
    share_window_s: float = option(
        DEFAULT.share_window_s,
        "the discriminator holds the light share of the plan's threshold over this many seconds of its decisions "
        "(full-speed s; 0: the threshold as it is)",
        env="DIFFSERVE_SHARE_WINDOW_S",
    )


def control_settings(cfg: ControllerConfig, slo_ms: float, scale: float, interval_s: float) -> ControlSettings:
    return ControlSettings(
        policy=Policy(cfg.policy),
        objective=None if cfg.objective == "auto" else Objective(cfg.objective),
        slo_ms=slo_ms,
        latency_scale=scale,
        interval_s=interval_s,
        batch_grid=tuple(sorted(cfg.batch_grid)),
        ewma_alpha=cfg.ewma_alpha,
        ewma_alpha_down=cfg.ewma_alpha_down,
        peak_window_s=cfg.peak_window_s * scale,
        peak_share=cfg.peak_share,
        hindsight_s=cfg.hindsight_s * scale,
        hindsight_min_s=ControlSettings.hindsight_min_s * scale,
        hindsight_halflife_s=ControlSettings.hindsight_halflife_s * scale,
        traffic_settle_s=ControlSettings.traffic_settle_s * scale,
        burst_window_s=ControlSettings.burst_window_s * scale,
        max_threshold_step=cfg.max_threshold_step,
        max_threshold_rise=cfg.max_threshold_rise,
        threshold_margin=cfg.threshold_margin,
        worker_margin_share=cfg.worker_margin_share,
        max_switch_fraction=cfg.max_switch_fraction,
        spare_util=cfg.spare_util,
        heavy_fill_ms=cfg.heavy_fill_ms * scale,
        share_window_s=cfg.share_window_s * scale,
        headroom=cfg.headroom,
        fixed_plan=FixedPlan.parse(cfg.static_plan) if cfg.static_plan else None,
        static_demand=cfg.static_demand,
    )


class Controller:
    def __init__(self, svc: Service[ControllerConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.log = svc.log
        self.profile = load_profile(self.cfg)
        self.scale = latency_scale(self.cfg)
        self.slo_ms = effective_slo_ms(self.cfg, self.cfg.slo_ms)
        self.interval_s = self.cfg.interval_s or max(MIN_INTERVAL_S, DEFAULT.interval_s * self.scale)
        self.loop = ControlLoop(self.profile, control_settings(self.cfg, self.slo_ms, self.scale, self.interval_s))
        self.slo_counts: tuple[int, int] | None = None
        self.last: Plan | None = None
        self.last_result: PlanResult | None = None
        self.ticks = 0
        self.demand = 0.0
        self.planned_for: set[str] = set()  # the workers the last plan was made for
        # How often the worker set is looked at between ticks, and how long a changed set must hold
        # still before it is re-planned (workers starting together register within moments).
        self.watch_s = min(WATCH_S, self.interval_s / 4)
        self.settle_s = min(SETTLE_S, self.interval_s / 4)
        self._added: dict[str, int] = {}  # entries-added per submission stream at the last look
        self._arrivals = 0
        self.bursts = 0  # burst plans stored
        self.planning = asyncio.Lock()  # a tick's plan and a burst's are stored one at a time

    # ---------- measurements ----------
    async def arrivals(self) -> int:
        """Jobs added to the shared stream and to every tenant's, as one counter that only grows: a
        removed tenant stops counting (it is not subtracted), a restarted stream counts from 0 again."""
        streams = [self.keys.jobs, *(self.keys.tenant_in(t) for t in sorted(await tenant_names(self.r, self.keys)))]
        for stream in streams:
            count, last = await self.entries_added(stream), self._added.get(stream)
            if last is not None:
                self._arrivals += count - last if count >= last else count
            elif self.ticks:  # a stream new since the last look (a new tenant): all of it is new
                self._arrivals += count
            self._added[stream] = count
        for gone in self._added.keys() - set(streams):
            del self._added[gone]
        return self._arrivals

    async def entries_added(self, stream: str) -> int:
        try:
            info = await self.r.xinfo_stream(stream)
        except ResponseError as exc:
            if missing(exc):  # no such stream yet; anything else (NOPERM, a wrong type) must surface
                return 0
            raise
        added = info.get("entries-added")
        return int(added if added is not None else info.get("length", 0))

    async def live_workers(self, stored: Plan | None) -> list[WorkerView]:
        """The live workers (common/plan_store.py), each with its planned role where the stored plan has one."""
        planned = stored.roles if stored is not None else {}
        now = now_ms()
        records = await live_workers(self.r, self.keys, self.cfg.worker_timeout_s)
        switch_s = switch_estimates({w.worker_id: w.switch_s for w in records}, self.cfg.default_switch_s * self.scale)
        out = []
        for w in records:
            role = planned.get(w.worker_id) if planned.get(w.worker_id) in ROLES else w.role
            out.append(
                WorkerView(
                    w.worker_id,
                    role if role in ROLES else "",
                    switch_s[w.worker_id],
                    busy_s=max(0.0, w.busy_until_ms - now) / 1000.0,
                )
            )
        return out

    async def queue_stats(self) -> QueueStats:
        return QueueStats(
            light_backlog=await backlog(self.r, self.keys.light_queue, "workers"),
            discriminator_backlog=await backlog(self.r, self.keys.light_results, "discriminator"),
            heavy_backlog=await backlog(self.r, self.keys.heavy_queue, "workers"),
        )

    async def slo_missed(self) -> bool:
        """Whether SLO misses were counted since the last tick (``stats`` hash, when maintained)."""
        raw = await self.r.hmget(self.keys.stats, ["slo_miss", "slo_hit"])
        try:
            counts = (int(raw[0] or 0), int(raw[1] or 0))
        except (TypeError, ValueError):
            return False
        before, self.slo_counts = self.slo_counts, counts
        return before is not None and counts[0] > before[0]

    async def tick(self, *, observe: bool = True) -> Plan | None:
        """Measure, decide and store a plan; ``observe`` False re-plans with the demand already measured
        (the worker set changed between ticks).  No plan is stored while no worker is live: the last
        one stays in force (or, before any, the services' default plan)."""
        stored = await load_plan(self.r, self.keys)
        if observe:
            if self.ticks == 0 and stored is not None and stored.demand_qps > 0:
                self.loop.demand.rate = stored.demand_qps  # a restarted controller starts from the last estimate
            self.demand = self.loop.observe(await self.arrivals(), time.monotonic())
            self.ticks += 1
        workers = await self.live_workers(stored)
        self.planned_for = {w.worker_id for w in workers}
        if not workers:
            metrics.WORKERS.labels("light").set(0)
            metrics.WORKERS.labels("heavy").set(0)
            if self.last is not None or self.ticks == 1:
                self.log.warning("no live workers: no plan made", extra={"demand_qps": round(self.demand, 3)})
            self.last = None
            return None
        queues = await self.queue_stats()
        aimd = None
        if self.loop.spec.aimd:
            miss = await self.slo_missed()
            aimd = AimdState(stored.light_batch, stored.heavy_batch, miss) if stored else AimdState(1, 1, miss)
        now = now_ms()
        span_ms = self.loop.cfg.hindsight_s * 1000.0
        history = await load_arrivals(self.r, self.keys, now - span_ms, now) if span_ms > 0 else None
        confidences = await load_confidences(self.r, self.keys) if span_ms > 0 else None
        bursts = self.bursts
        result, why = self.loop.propose(stored, self.demand, workers, queues, aimd)
        # the replay takes up to a second of CPU: in a thread, so that a burst meanwhile is planned for
        why = await asyncio.to_thread(self.loop.refine, result, why, stored, history, now, confidences)
        async with self.planning:
            if self.bursts != bursts:  # its roles are from before the burst; the next tick sees it
                self.log.info("tick overtaken by a burst plan: not stored", extra={"demand_qps": round(self.demand, 3)})
                return self.last
            message = await self.publish(stored, result, why, workers)
        # The autoscaler's signal: how many workers the plan for this demand wants (common/scaling.py).
        peak = max(self.demand, self.loop.peak.value)
        wanted = workers_wanted(self.profile, self.loop.cfg, self.demand, light_demand_qps=peak, queues=queues)
        metrics.WORKERS_WANTED.set(wanted.workers)
        for at, quality in (("live", result.estimated_quality), ("wanted", wanted.estimated_quality)):
            if quality is not None:
                metrics.ESTIMATED_QUALITY.labels(at).set(quality)
        return message

    async def watch(self) -> Plan | None:
        """Between ticks: what the plan in force does not carry at the arrival rate of the last burst window
        (ControlLoop.watch: a burst the light stage cannot absorb, a heavy stage sent more than it runs or with
        room to spare) is planned for at once (ControlLoop.between_ticks)."""
        if self.last is None or self.loop.idle:
            return None
        now, window_ms = now_ms(), self.loop.cfg.burst_window_s * 1000.0
        rate = (await load_arrivals(self.r, self.keys, now - window_ms, now)).rate_qps(now, window_ms)
        light_backlog = await backlog(self.r, self.keys.light_queue, "workers")
        heavy_backlog = await backlog(self.r, self.keys.heavy_queue, "workers")
        seen = self.loop.watch(self.last, rate, light_backlog, heavy_backlog, time.monotonic())
        if seen is None:
            return None
        async with self.planning:
            stored = await load_plan(self.r, self.keys)
            if stored is None:
                return None
            workers = await self.live_workers(stored)
            planned = self.loop.between_ticks(seen, stored, rate, workers, await self.queue_stats())
            if planned is None:
                if seen == Watch.BURST:  # the light queue grew, but the solver says the roles in force carry it
                    self.log.info(
                        "burst: roles kept", extra={"arrival_qps": round(rate, 3), "light_backlog": light_backlog}
                    )
                return None
            self.log.info(f"{seen}: re-planning", extra={"arrival_qps": round(rate, 3), "light_backlog": light_backlog})
            if seen == Watch.BURST:
                self.bursts += 1
                metrics.BURST_PLANS.inc()
            else:
                metrics.THRESHOLD_NUDGES.labels("down" if seen == Watch.HEAVY_PRESSURE else "up").inc()
            return await self.publish(stored, *planned, workers)

    async def publish(self, stored: Plan | None, result: PlanResult, why: Why, workers: list[WorkerView]) -> Plan:
        """Store ``result`` as the next plan version (made for the demand measured at the last tick)."""
        version = (stored.version if stored is not None else 0) + 1
        message = result.to_message(version, result.roles, now_ms())
        message.demand_qps = self.demand
        await store_plan(self.r, self.keys, message)
        self.export(result, self.demand)
        self.report(stored, message, result, why, workers)
        self.last, self.last_result = message, result
        return message

    def export(self, result: PlanResult, demand: float) -> None:
        metrics.THRESHOLD.set(result.threshold)
        metrics.WORKERS.labels("light").set(result.light_workers)
        metrics.WORKERS.labels("heavy").set(result.heavy_workers)
        metrics.DEMAND.set(demand)
        metrics.PLAN_INFEASIBLE.set(0 if result.feasible else 1)
        metrics.SOLVE_TIME.observe(result.solve_ms / 1000.0)

    def report(
        self, stored: Plan | None, message: Plan, result: PlanResult, why: Why, workers: list[WorkerView]
    ) -> None:
        changed = stored is None or any(
            getattr(stored, f) != getattr(message, f)
            for f in ("policy", "threshold", "light_batch", "heavy_batch", "heavy_fraction", "roles", "feasible")
        )
        if not result.feasible and (stored is None or stored.feasible or changed):
            self.log.warning(
                "demand exceeds capacity: maximum-throughput plan",
                extra={"demand_qps": round(message.demand_qps, 3), "workers": len(workers), "slo_ms": result.slo_ms},
            )
        # A role change the free plan wanted, kept back (logged while the plan is otherwise unchanged), or
        # proposed and awaiting confirmation.
        if why.reason.deferred and (not changed or why.reason == ControlReason.PROPOSED):
            self.log.info(
                "role change deferred",
                extra={"version": message.version, "reason": str(why), "demand_qps": round(message.demand_qps, 3)},
            )
        if changed:
            current = {w.worker_id: w.role for w in workers}
            self.log.info(
                "new plan",
                extra={
                    "version": message.version,
                    "policy": message.policy,
                    "objective": result.objective,
                    "threshold": message.threshold,
                    "heavy_fraction": message.heavy_fraction,
                    "light_batch": message.light_batch,
                    "heavy_batch": message.heavy_batch,
                    "light_workers": message.light_workers,
                    "heavy_workers": message.heavy_workers,
                    "role_changes": count_changes(current, message.roles),
                    "demand_qps": round(message.demand_qps, 3),
                    "light_demand_qps": round(result.light_demand_qps, 3),
                    "feasible": message.feasible,
                    "estimated_quality": message.estimated_quality,
                    "predicted_ms": round(result.latency.total_ms, 1),
                    "slo_ms": result.slo_ms,
                    "solve_ms": round(result.solve_ms, 2),
                    "reason": str(why),
                },
            )

    async def live_ids(self) -> set[str]:
        return await live_ids(self.r, self.keys, self.cfg.worker_timeout_s)

    async def step(self) -> None:
        """One interval: a tick, then watching the worker set until the next one; a set that changed
        (a worker joined, left or died) and then held still for ``settle_s`` is re-planned at once."""
        if self.ticks == 0:
            await self.wait_for_workers()
        started, ticked_ms = time.monotonic(), now_ms()
        tick = asyncio.create_task(self.tick())
        while not (await asyncio.wait({tick}, timeout=self.watch_s))[0]:
            await self.watch()  # while the tick replays the recent arrivals
        tick.result()
        changed_at: float | None = None
        traffic_at: float | None = None
        while not self.svc.stop.is_set():
            left = self.interval_s - (time.monotonic() - started)
            if left <= 0:
                return
            await self.svc.sleep(min(left, self.watch_s))
            if self.loop.idle:  # traffic after an idle tick is planned for soon after it starts
                if traffic_at is None and (await load_arrivals(self.r, self.keys, ticked_ms, now_ms())).counts:
                    traffic_at = time.monotonic()
                if traffic_at is not None and time.monotonic() - traffic_at >= self.loop.cfg.traffic_settle_s:
                    self.log.info("traffic after an idle spell: re-planning")
                    return  # the next step ticks now
            else:
                await self.watch()
            ids = await self.live_ids()
            if ids == self.planned_for:
                changed_at = None
            elif changed_at is None:
                changed_at = time.monotonic()
            elif time.monotonic() - changed_at >= self.settle_s:
                self.log.info("workers changed: re-planning", extra={"workers": len(ids)})
                await self.tick(observe=False)
                changed_at = None

    async def wait_for_workers(self) -> None:
        """Before the first plan: until some worker is live and the set held still for ``settle_s``, so
        the first plan is made for the workers that registered, not for the first one."""
        seen: set[str] = set()
        since = time.monotonic()
        while not self.svc.stop.is_set():
            ids = await self.live_ids()
            if ids != seen:
                seen, since = ids, time.monotonic()
            elif ids and time.monotonic() - since >= self.settle_s:
                return
            await self.svc.sleep(self.watch_s)


async def serve(svc: Service[ControllerConfig]) -> None:
    logging.getLogger("mip").setLevel(logging.WARNING)  # its import announces itself at INFO
    controller = Controller(svc)
    await asyncio.to_thread(warm_up)  # CBC's first solve is slow; keep it out of the first tick
    svc.ready()
    await run_forever("plan", controller.step, svc.stop)


def main(argv: list[str] | None = None) -> None:
    run("controller", ControllerConfig.from_args(argv, prog="diffserve controller"), serve)


if __name__ == "__main__":
    main()

"""Controller: every ``--interval-s`` it measures demand, live workers and queues, solves the
plan (services/planner.py) and writes it where every service reads it (common/plan_store.py).

Each tick:

1. demand D: the jobs stream's ``entries-added`` counter (XINFO STREAM; trimming does not
   change it) differenced between ticks, smoothed with an EWMA that follows a rise quickly and
   a fall slowly; when the smoothed rate is rising, the trend is extrapolated over one more
   interval (look-ahead);
2. live workers S: members of the ``workers`` zset whose heartbeat (score, ms) is younger
   than ``--worker-timeout-s``; each worker's info hash gives its role and measured switch time;
3. queues: backlog of the light, discriminator and heavy queues (undelivered + pending) and
   their arrival rates (``entries-added`` deltas), which the planner turns into queue waits;
4. solve twice: freely, and keeping every worker's current role; the free plan's role
   changes are applied only when they matter (hysteresis, below);
5. store the plan with the stored version + 1 (so a restarted controller continues the
   sequence), export metrics and log a line when the plan changed.

Hysteresis: the allocation changes when the current one cannot serve the new demand
(the keep-roles plan is infeasible but the free one is not), or when the free plan's
threshold (heavy fraction) differs from the keep-roles plan's by more than
``--threshold-margin`` or its light/heavy split by more than ``--worker-margin`` workers, and
then only if the workers to switch reload their model (measured ``switch_s``) well within an
interval and two consecutive ticks propose the same move (noise damping); such a move is
then taken in steps of at most ``--max-switch-fraction`` of the workers per tick, so a burst
does not swing the whole cluster from one model to the other and back.  Switching workers serve nothing while they load: the work they would have done in
that time is added to the backlog of the stage they join and the plan is solved again with it,
so a slow switch is paid for in the plan.

Units: with the profiled backend every model latency is multiplied by ``--time-scale`` and
load tests scale the SLO the same way, so the controller plans with latencies x time_scale and
SLO = ``--slo-ms`` (wall-clock, like the router's deadlines; default the cascade's x time_scale).  Demand and queue rates are
measured in real (wall-clock) queries/s, which in a time-scaled run are already "fast" units,
so everything the planner sees is in the same clock.  Other backends plan with the profile as
is (time_scale 1).  ``Plan.demand_qps`` holds the measured (real-time) demand.

AIMD batching (``--policy aimd``) reads SLO outcomes from the ``stats`` hash (fields
``slo_miss`` and ``slo_hit``, counters) when some service maintains them; without them it
only ever increases batch sizes while the predicted latency fits the SLO.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

from redis.exceptions import ResponseError

from common import metrics
from common.backends import BackendSettings, latency_scale, load_profile
from common.config import ServiceConfig, option
from common.messages import Plan
from common.plan_store import load_plan, store_plan
from common.service import Service, now_ms, run
from common.streams import backlog, run_forever
from services.planner import (OBJECTIVES, POLICIES, ROLES, AimdState, PlanResult, QueueStats, count_changes, plan,
                              warm_up)


DEFAULT_INTERVAL_S = 10.0  # full-speed seconds between plans
MIN_INTERVAL_S = 0.25


@dataclass
class ControllerConfig(ServiceConfig, BackendSettings):
    """diffserve controller: re-plans threshold, batch sizes and worker roles."""

    interval_s: float | None = option(None, "seconds between plans (default: 10 s of full-speed time, so "
                                      "10 x time_scale on the profiled backend, at least 0.25 s)",
                                      env="DIFFSERVE_INTERVAL_S")
    policy: str = option("diffserve", "serving policy", env="DIFFSERVE_POLICY", choices=POLICIES)
    objective: str = option("auto", "quality (best estimated FID) or threshold (max t, the paper); auto: "
                            "quality where the cascade has a quality curve", env="DIFFSERVE_OBJECTIVE",
                            choices=("auto",) + OBJECTIVES)
    static_threshold: float = option(0.5, "threshold of the static policy", env="DIFFSERVE_STATIC_THRESHOLD")
    slo_ms: float | None = option(None, "SLO in wall-clock ms, as the router stamps deadlines (default: the "
                                  "cascade's, x time_scale on the profiled backend)", env="DIFFSERVE_SLO_MS")
    worker_timeout_s: float = option(5.0, "a worker without a heartbeat for this long is not counted",
                                     env="DIFFSERVE_WORKER_TIMEOUT_S")
    ewma_alpha: float = option(0.5, "weight of the newest rate sample in the demand estimate while it rises",
                               env="DIFFSERVE_EWMA_ALPHA")
    ewma_alpha_down: float = option(0.2, "... and while it falls: slow decay, so a bursty load is not "
                                    "planned for its lulls", env="DIFFSERVE_EWMA_ALPHA_DOWN")
    threshold_margin: float = option(0.05, "keep the current roles unless the new plan's threshold differs "
                                     "by more than this", env="DIFFSERVE_THRESHOLD_MARGIN")
    worker_margin: int = option(1, "... or its light/heavy split by more than this many workers",
                                env="DIFFSERVE_WORKER_MARGIN")
    default_switch_s: float = option(5.0, "role-switch time assumed for a worker that has not switched yet "
                                     "(unscaled)", env="DIFFSERVE_DEFAULT_SWITCH_S")
    max_switch_fraction: float = option(0.25, "at most this share of the workers change role per tick unless "
                                        "the current allocation cannot serve demand", env="DIFFSERVE_MAX_SWITCH_FRACTION")
    spare_util: float = option(0.5, "spare workers go to the busiest stage while its utilisation is above this",
                               env="DIFFSERVE_SPARE_UTIL")


class RateEstimator:
    """Rate of a monotonic counter: EWMA of per-tick deltas, plus a look-ahead of one
    interval's trend while it rises."""

    def __init__(self, alpha: float = 0.5, initial: float | None = None, alpha_down: float | None = None):
        self.alpha = alpha
        self.alpha_down = alpha if alpha_down is None else alpha_down
        self.count: int | None = None
        self.at: float | None = None
        self.rate: float | None = initial  # smoothed
        self.previous: float | None = None  # smoothed rate one tick ago
        self.raw: float | None = None

    def update(self, count: int, at: float) -> None:
        if self.count is not None and self.at is not None and at > self.at:
            delta = count - self.count
            if delta < 0:  # the stream was deleted and recreated: its counter restarted
                delta = count
            self.raw = delta / (at - self.at)
            self.previous = self.rate
            if self.rate is None:
                self.rate = self.raw
            else:  # quick to follow a rise, slow to believe a fall
                alpha = self.alpha if self.raw >= self.rate else self.alpha_down
                self.rate = alpha * self.raw + (1 - alpha) * self.rate
        self.count, self.at = count, at

    @property
    def smoothed(self) -> float:
        return max(0.0, self.rate or 0.0)

    def forecast(self) -> float:
        """The smoothed rate, extrapolated one interval ahead while it is rising."""
        rate = self.smoothed
        if self.previous is not None and rate > self.previous:
            rate += rate - self.previous
        return rate


@dataclass
class WorkerView:
    worker_id: str
    role: str  # current role: the planned one if it is in the stored plan, else the reported one
    reported_role: str
    switch_s: float


class Controller:
    def __init__(self, svc: Service):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.log = svc.log
        self.profile = load_profile(self.cfg)
        self.scale = latency_scale(self.cfg)
        # DIFFSERVE_SLO_MS means the same for every service: the wall-clock budget the router
        # stamps as the deadline. Only the cascade's default is scaled for a time-scaled run.
        self.slo_ms = self.cfg.slo_ms or self.profile.slo_ms * self.scale
        self.interval_s = self.cfg.interval_s or max(MIN_INTERVAL_S, DEFAULT_INTERVAL_S * self.scale)
        self.objective = None if self.cfg.objective == "auto" else self.cfg.objective
        alpha = self.cfg.ewma_alpha
        self.demand = RateEstimator(alpha, alpha_down=self.cfg.ewma_alpha_down)
        self.arrivals = {name: RateEstimator(alpha) for name in ("light", "discriminator", "heavy")}
        self.slo_counts: tuple[int, int] | None = None
        self.last: Plan | None = None
        self.last_result: PlanResult | None = None
        self.ticks = 0
        self.proposal: tuple | None = None  # a role change seen once, awaiting confirmation

    # ---------- measurements ----------
    async def entries_added(self, stream: str) -> int:
        try:
            info = await self.r.xinfo_stream(stream)
        except ResponseError:  # no such stream yet
            return 0
        added = info.get("entries-added")
        return int(added if added is not None else info.get("length", 0))

    async def measure_rates(self) -> None:
        at = time.monotonic()
        streams = {"light": self.keys.light_queue, "discriminator": self.keys.light_results,
                   "heavy": self.keys.heavy_queue}
        self.demand.update(await self.entries_added(self.keys.jobs), at)
        for name, stream in streams.items():
            self.arrivals[name].update(await self.entries_added(stream), at)

    async def live_workers(self, stored: Plan | None) -> list[WorkerView]:
        cutoff = now_ms() - self.cfg.worker_timeout_s * 1000.0
        members = await self.r.zrangebyscore(self.keys.workers, cutoff, "+inf")
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hgetall(self.keys.worker_info(w))
            infos = await pipe.execute()
        planned = stored.roles if stored is not None else {}
        out = []
        for w, info in zip(ids, infos):
            info = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in (info or {}).items()}
            reported = info.get("role", "")
            try:
                switch_s = float(info.get("switch_s") or 0.0)
            except ValueError:
                switch_s = 0.0
            role = planned.get(w) if planned.get(w) in ROLES else reported
            out.append(WorkerView(w, role if role in ROLES else "", reported,
                                  switch_s if switch_s > 0 else self.cfg.default_switch_s * self.scale))
        return out

    async def queue_stats(self) -> QueueStats:
        return QueueStats(
            light_backlog=await backlog(self.r, self.keys.light_queue, "workers"),
            light_qps=self.arrivals["light"].smoothed,
            discriminator_backlog=await backlog(self.r, self.keys.light_results, "discriminator"),
            discriminator_qps=self.arrivals["discriminator"].smoothed,
            heavy_backlog=await backlog(self.r, self.keys.heavy_queue, "workers"),
            heavy_qps=self.arrivals["heavy"].smoothed)

    async def slo_missed(self) -> bool:
        """Whether SLO misses were counted since the last tick (``stats`` hash, when maintained)."""
        raw = await self.r.hmget(self.keys.stats, ["slo_miss", "slo_hit"])
        try:
            counts = (int(raw[0] or 0), int(raw[1] or 0))
        except (TypeError, ValueError):
            return False
        before, self.slo_counts = self.slo_counts, counts
        return before is not None and counts[0] > before[0]

    # ---------- planning ----------
    def solve(self, demand: float, current: dict[str, str], queues: QueueStats, *, keep_roles: bool = False,
              aimd: AimdState | None = None, switch_s: dict[str, float] | None = None) -> PlanResult:
        return plan(self.profile, demand, len(current), policy=self.cfg.policy, objective=self.objective,
                    batch_grid=tuple(sorted(self.cfg.batch_grid)),
                    slo_ms=self.slo_ms, latency_scale=self.scale, static_threshold=self.cfg.static_threshold,
                    current=current, queues=queues, keep_roles=keep_roles, aimd=aimd,
                    drain_s=self.interval_s, spare_util=self.cfg.spare_util, switch_s=switch_s)

    def with_switch_backlog(self, result: PlanResult, current: dict[str, str], switch_s: dict[str, float],
                            demand: float) -> QueueStats | None:
        """Queues plus the jobs the switching workers' new stage receives for them while they
        load (their share of that stage's planned arrivals); None when nobody switches."""
        stage_qps = {"light": demand, "heavy": demand * (1.0 - result.light_share)}
        size = {"light": max(1, result.light_workers), "heavy": max(1, result.heavy_workers)}
        extra = {"light": 0.0, "heavy": 0.0}
        for w, role in result.roles.items():
            if current.get(w) in ROLES and current[w] != role:
                extra[role] += switch_s.get(w, 0.0) * stage_qps[role] / size[role]
        if not any(extra.values()):
            return None
        return extra

    def choose(self, stored: Plan | None, demand: float, workers: list[WorkerView], queues: QueueStats,
               aimd: AimdState | None) -> tuple[PlanResult, str]:
        """The plan to write and why (logged)."""
        current = {w.worker_id: w.role for w in workers}
        switch_s = {w.worker_id: w.switch_s for w in workers}
        new = self.solve(demand, current, queues, aimd=aimd, switch_s=switch_s)
        proposal, self.proposal = self.proposal, None  # kept only while a change awaits confirmation
        if not current or new.role_changes == 0:
            return new, "no role change"
        if stored is None or stored.policy != self.cfg.policy:
            return new, "first plan" if stored is None else "policy changed"
        keep = self.solve(demand, current, queues, keep_roles=True, aimd=aimd, switch_s=switch_s)
        flipping = [w for w, r in new.roles.items() if current.get(w) in ROLES and current[w] != r]
        if not keep.feasible:
            reason = "current allocation cannot serve demand"
        else:
            differs = (abs(new.threshold - keep.threshold) > self.cfg.threshold_margin + 1e-9
                       or abs(new.heavy_fraction - keep.heavy_fraction) > self.cfg.threshold_margin + 1e-9
                       or abs(new.light_workers - keep.light_workers) > self.cfg.worker_margin)
            if not differs:
                return keep, "within margins: roles kept"
            slow = [w for w in flipping if switch_s.get(w, 0.0) > self.interval_s / 2]
            if slow:
                return keep, "switch slower than half an interval: roles kept"
            # Noise damping: a move the current roles can live with must be proposed by two
            # consecutive ticks before workers reload models for it.
            sign = lambda x: (x > 1e-9) - (x < -1e-9)  # noqa: E731
            move = (sign(new.light_workers - keep.light_workers), sign(new.threshold - keep.threshold),
                    sign(new.heavy_fraction - keep.heavy_fraction))  # the direction, not the exact plan
            if move != proposal:
                self.proposal = move
                return keep, "change proposed: confirming next interval"
            self.proposal = move  # the next tick may continue the same move without waiting
            reason = "plan moved beyond margins (confirmed)"
            # A move the current roles can live with is taken in steps (fastest switchers
            # first), so a burst does not swing the whole cluster between models.
            step = max(1, math.ceil(self.cfg.max_switch_fraction * len(current)))
            if len(flipping) > step:
                partial = dict(current)
                for w in sorted(flipping, key=lambda w: switch_s.get(w, 0.0))[:step]:
                    partial[w] = new.roles[w]
                stepped = self.solve(demand, partial, queues, keep_roles=True, aimd=aimd, switch_s=switch_s)
                if not stepped.feasible:
                    return keep, "partial move infeasible: roles kept"
                stepped.solve_ms += new.solve_ms
                new = stepped
                reason += f", {step} of {len(flipping)} role changes this tick"
        extra = self.with_switch_backlog(new, current, switch_s, demand)
        if extra:
            # The plan must also absorb the jobs that queue up while the switching workers load.
            loaded = dataclasses.replace(queues, light_backlog=queues.light_backlog + round(extra["light"]),
                                         heavy_backlog=queues.heavy_backlog + round(extra["heavy"]))
            again = self.solve(demand, current, loaded, aimd=aimd, switch_s=switch_s)
            if again.feasible and again.role_changes:
                again.solve_ms += new.solve_ms
                new = again
            elif keep.feasible and not again.feasible:
                return keep, "switch cost makes the change infeasible: roles kept"
        return new, reason

    async def tick(self) -> Plan:
        stored = await load_plan(self.r, self.keys)
        if self.ticks == 0 and stored is not None and stored.demand_qps > 0:
            self.demand.rate = stored.demand_qps  # a restarted controller starts from the last estimate
        await self.measure_rates()
        self.ticks += 1
        demand = self.demand.forecast()
        workers = await self.live_workers(stored)
        queues = await self.queue_stats()
        aimd = None
        if self.cfg.policy == "aimd":
            miss = await self.slo_missed()
            aimd = AimdState(stored.light_batch, stored.heavy_batch, miss) if stored else AimdState(1, 1, miss)
        result, reason = self.choose(stored, demand, workers, queues, aimd)
        version = (stored.version if stored is not None else 0) + 1
        message = result.to_message(version, result.roles, now_ms())
        message.demand_qps = demand
        await store_plan(self.r, self.keys, message)
        self.export(result, demand)
        self.report(stored, message, result, reason, workers)
        self.last, self.last_result = message, result
        return message

    def export(self, result: PlanResult, demand: float) -> None:
        metrics.THRESHOLD.set(result.threshold)
        metrics.WORKERS.labels("light").set(result.light_workers)
        metrics.WORKERS.labels("heavy").set(result.heavy_workers)
        metrics.DEMAND.set(demand)
        metrics.PLAN_INFEASIBLE.set(0 if result.feasible else 1)
        metrics.SOLVE_TIME.observe(result.solve_ms / 1000.0)

    def report(self, stored: Plan | None, message: Plan, result: PlanResult, reason: str,
               workers: list[WorkerView]) -> None:
        changed = stored is None or any(getattr(stored, f) != getattr(message, f) for f in (
            "policy", "threshold", "light_batch", "heavy_batch", "heavy_fraction", "roles", "feasible"))
        if not result.feasible and (stored is None or stored.feasible or changed):
            self.log.warning("demand exceeds capacity: maximum-throughput plan", extra={
                "demand_qps": round(message.demand_qps, 3), "workers": len(workers), "slo_ms": result.slo_ms})
        if not changed and reason.endswith("roles kept") or reason.startswith("change proposed"):
            self.log.info("role change deferred", extra={"version": message.version, "reason": reason,
                                                         "demand_qps": round(message.demand_qps, 3)})
        if changed:
            current = {w.worker_id: w.role for w in workers}
            self.log.info("new plan", extra={
                "version": message.version, "policy": message.policy, "objective": result.objective,
                "threshold": message.threshold, "heavy_fraction": message.heavy_fraction,
                "light_batch": message.light_batch, "heavy_batch": message.heavy_batch,
                "light_workers": message.light_workers, "heavy_workers": message.heavy_workers,
                "role_changes": count_changes(current, message.roles), "demand_qps": round(message.demand_qps, 3),
                "feasible": message.feasible, "estimated_quality": message.estimated_quality,
                "predicted_ms": round(result.latency.total_ms, 1), "slo_ms": result.slo_ms,
                "solve_ms": round(result.solve_ms, 2), "reason": reason})

    async def step(self) -> None:
        started = time.monotonic()
        await self.tick()
        await self.svc.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


async def serve(svc: Service) -> None:
    logging.getLogger("mip").setLevel(logging.WARNING)  # its import announces itself at INFO
    controller = Controller(svc)
    await asyncio.to_thread(warm_up)  # CBC's first solve is slow; keep it out of the first tick
    svc.ready()
    await run_forever("plan", controller.step, svc.stop)


def main(argv: list[str] | None = None) -> None:
    run("controller", ControllerConfig.from_args(argv, prog="diffserve controller"), serve)


if __name__ == "__main__":
    main()

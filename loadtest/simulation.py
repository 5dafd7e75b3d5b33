"""The simulated cascade ``diffserve simulate`` runs (:class:`Simulation`): discrete events in full-speed
milliseconds, with the live services' own decision code. What it simulates and what it imports rather
than copies: ``loadtest/simulate.py`` (the command's ``--help``)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import admission
from common.admission import DEFAULT_ADMISSION_HEADROOM, DEFAULT_MAX_LIGHT_BACKLOG
from common.backends.profiled import DEFAULT_LOAD_SECONDS, LOAD_SECONDS, ProfiledDiscriminator
from common.control import DEFAULT_SWITCH_S, WATCH_S, ControlLoop, ControlSettings, WorkerView, switch_estimates
from common.messages import ErrorCode, FinalResult, LightReason, Plan, Role, RoutedBy, Status
from common.plan_store import PLAN_REFRESH_S
from common.planner import FixedPlan, PlanResult, Policy, QueueStats, default_plan, policy_spec
from common.profiles import CascadeProfile
from common.replay import ARRIVAL_BUCKET_MS, HOP_MS, RECENT_CONFIDENCES, ArrivalHistory
from common.routing import (
    Decision,
    ShareKeeper,
    Stage,
    batch_times,
    cascade_decision,
    decision_order,
    direct_decision,
    exchange_for,
    fill_until_ms,
    joining_ms,
    light_reason,
)
from common.stage import DISCRIMINATOR_BATCH
from loadtest.runner import JobRecord, RunRecord
from loadtest.traces import Trace


@dataclass
class SimJob:
    record: JobRecord
    prompt: str
    deadline_ms: float
    confidence: float | None = None  # set once the discriminator scored it
    routed_by: RoutedBy = RoutedBy.CASCADE
    light_done: bool = False


@dataclass
class SimWorker:
    worker_id: str
    role: str
    loaded: set[str] = field(default_factory=set)  # models that were loaded once (later loads come from host)
    busy: bool = False
    batch: list[SimJob] = field(default_factory=list)
    switch_s: float = 0.0
    free_at: float = 0.0  # when the batch it is running (or filling) ends (the controller's busy_s)
    filling: bool = False  # it holds a short heavy batch, waiting for more
    fills: int = 0  # fills begun (a fill's timer that finds a later one ignores itself)


@dataclass(kw_only=True)
class SimConfig:
    policy: Policy
    workers: int
    slo_ms: float  # full speed
    light_workers: int | None = None  # at the start; default half
    interval_s: float = ControlSettings.interval_s  # controller interval, full speed
    time_scale: float = 1.0  # of the live stack modelled (its wall-clock constants)
    controller: bool = True
    sample_interval_s: float = 1.0
    fixed_plan: FixedPlan | None = None
    # workers read the other role's model into host memory at start (the worker's --stage-other-role, on by
    # default; the trace starts after they did): every switch is a load from host memory
    stage_other_role: bool = True
    control: dict[str, Any] = field(default_factory=dict)  # other ControlSettings fields


class Simulation:
    def __init__(
        self,
        profile: CascadeProfile,
        trace: Trace,
        prompts: list[str],
        cfg: SimConfig,
        *,
        overrides: dict[int, float] | None = None,
        seed: int = 0,
    ):
        self.profile, self.trace, self.prompts, self.cfg = profile, trace, prompts, cfg
        self.spec = policy_spec(cfg.policy)
        self.scorer = ProfiledDiscriminator(profile.discriminator, profile.curve, 0.0, overrides)
        self.hop_ms = HOP_MS / cfg.time_scale
        self.plan_delay_ms = PLAN_REFRESH_S * 1000.0 / 2 / cfg.time_scale  # on average half a refresh
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.queues: dict[str, deque[SimJob]] = {"light": deque(), "discriminator": deque(), "heavy": deque()}
        light = cfg.light_workers if cfg.light_workers is not None else max(1, cfg.workers // 2)
        self.workers = [SimWorker(f"worker-{i}", "light" if i < light else "heavy") for i in range(cfg.workers)]
        for w in self.workers:
            w.loaded.update(("light", "heavy") if cfg.stage_other_role else (w.role,))
        self.disc_busy = False
        self.disc_batch: list[SimJob] = []
        self.plan = default_plan(profile)  # in force at the data plane
        self.stored: Plan | None = None  # the controller's latest
        self.version = 0
        self.arrived = 0
        self.outstanding = 0
        self.rng = random.Random(seed)
        self.jobs: list[JobRecord] = []
        self.samples: list[dict[str, Any]] = []
        settings = ControlSettings(
            policy=cfg.policy,
            slo_ms=cfg.slo_ms,
            interval_s=cfg.interval_s,
            fixed_plan=cfg.fixed_plan,
            hop_ms=self.hop_ms,
            **cfg.control,
        )
        self.loop = ControlLoop(profile, settings)
        # the arrivals the router's histogram would hold: 100-ms buckets of a live stack's wall clock
        self.history = ArrivalHistory(bucket_ms=ARRIVAL_BUCKET_MS / cfg.time_scale)
        self.early_tick = False  # a tick is due soon: traffic arrived after an idle one
        self.watch_ms = WATCH_S * 1000.0 / cfg.time_scale  # the controller's look at the light queue
        self.keeper = ShareKeeper(RECENT_CONFIDENCES)  # its ``recent``: what the discriminator publishes
        self.times = {role: batch_times(profile, role, 1.0) for role in ("light", "heavy", "discriminator")}

    # ---------- event machinery ----------
    def at(self, t_ms: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.events, (t_ms, next(self._seq), fn, args))

    def run(self) -> RunRecord:
        for i, (arrival_ms, index) in enumerate(self.trace):
            rec = JobRecord(
                f"sim-{i}", index, arrival_ms, sent_s=arrival_ms / 1000.0, blank_prompt=not self.prompts[index]
            )
            self.jobs.append(rec)
            self.at(arrival_ms + self.hop_ms, self.admit, rec)
        self.outstanding = len(self.jobs)
        if self.cfg.controller:  # the load tester waits for the first plan before it sends anything
            self.tick()
            if self.stored is not None:  # tick() stores one
                self.publish(self.stored)
        self.at(0.0, self.sample)
        if self.cfg.controller and not self.spec.fixed:
            self.at(self.watch_ms, self.watch)
        end_ms = self.trace.duration_s * 1000.0
        while self.events:
            t, _seq, fn, args = heapq.heappop(self.events)
            if self.outstanding == 0 and t > end_ms:
                break
            self.now = t
            fn(*args)
        return RunRecord(
            self.cfg.policy,
            1.0,
            self.trace,
            self.jobs,
            plan_samples=self.samples,
            wall_s=self.now / 1000.0,
            drained=self.outstanding == 0,
        )

    # ---------- control plane ----------
    def backlogs(self) -> dict[str, int]:
        busy = {"light": 0, "heavy": 0}
        for w in self.workers:
            if w.busy and w.batch:
                busy[w.role] += len(w.batch)
        return {
            "light": len(self.queues["light"]) + busy["light"],
            "discriminator": len(self.queues["discriminator"]) + len(self.disc_batch),
            "heavy": len(self.queues["heavy"]) + busy["heavy"],
        }

    def tick(self, periodic: bool = True) -> None:
        self.early_tick = False
        demand = self.loop.observe(self.arrived, self.now / 1000.0)
        self.history.prune(self.now - self.loop.cfg.hindsight_s * 1000.0 - 1000.0)
        result, _reason = self.loop.decide(
            self.stored,
            demand,
            self.views(),
            self.queue_stats(),
            history=self.history,
            now_ms=self.now,
            confidences=self.keeper.recent,
        )
        self.store(result, demand)
        if periodic and (self.outstanding or self.now < self.trace.duration_s * 1000.0):
            self.at(self.now + self.cfg.interval_s * 1000.0, self.tick)

    def views(self) -> list[WorkerView]:
        planned = self.stored.roles if self.stored is not None else {}
        switch_s = switch_estimates({w.worker_id: w.switch_s for w in self.workers}, DEFAULT_SWITCH_S)
        return [
            WorkerView(
                w.worker_id,
                planned.get(w.worker_id, w.role),
                switch_s[w.worker_id],
                busy_s=max(0.0, w.free_at - self.now) / 1000.0 if w.batch else 0.0,
            )
            for w in self.workers
        ]

    def queue_stats(self) -> QueueStats:
        b = self.backlogs()
        return QueueStats(light_backlog=b["light"], discriminator_backlog=b["discriminator"], heavy_backlog=b["heavy"])

    def store(self, result: PlanResult, demand: float) -> None:
        self.version += 1
        message = result.to_message(self.version, result.roles, self.now)
        message.demand_qps = demand
        self.stored = message
        self.at(self.now + self.plan_delay_ms, self.publish, message)

    def watch(self) -> None:
        """The controller between ticks (services/controller.py ``watch``): what the plan in force does not
        carry (a burst the light stage cannot absorb, a heavy stage sent more than it runs or with room to spare,
        ControlLoop.watch) is planned for at once."""
        stored = self.stored
        rate = self.history.rate_qps(self.now, self.loop.cfg.burst_window_s * 1000.0)
        backlogs = self.backlogs()
        seen = self.loop.watch(stored, rate, backlogs["light"], backlogs["heavy"], self.now / 1000.0)
        if seen is not None and stored is not None:
            plan = self.loop.between_ticks(seen, stored, rate, self.views(), self.queue_stats())
            if plan is not None:
                self.store(plan[0], stored.demand_qps)
        if self.outstanding or self.now < self.trace.duration_s * 1000.0:
            self.at(self.now + self.watch_ms, self.watch)

    def publish(self, message: Plan) -> None:
        self.plan = message
        for w in self.workers:
            self.try_worker(w)

    def sample(self) -> None:
        p = self.plan
        roles = [w.role for w in self.workers]
        b = self.backlogs()
        self.samples.append(
            {
                "t_s": round(self.now / 1000.0, 3),
                "plan_version": p.version,
                "policy": p.policy,
                "threshold": p.threshold,
                "light_workers": p.light_workers,
                "heavy_workers": p.heavy_workers,
                "light_batch": p.light_batch,
                "heavy_batch": p.heavy_batch,
                "heavy_fraction": p.heavy_fraction,
                "demand_qps": p.demand_qps,
                "feasible": p.feasible,
                "roles": {"light": roles.count("light"), "heavy": roles.count("heavy")},
                "backlog": {"light": b["light"], "heavy": b["heavy"]},
            }
        )
        if self.outstanding or self.now < self.trace.duration_s * 1000.0:
            self.at(self.now + self.cfg.sample_interval_s * 1000.0, self.sample)

    # ---------- data plane ----------
    def latency_ms(self, role: str, batch: int) -> float:
        return self.times[role](batch)

    def stage(self, role: str, joining: bool = False) -> Stage:
        """The deadline rule's view of a stage, as StageWatcher gives it to the live services (``joining``: with
        the workers the plan moves into it, as the router's admission sees them)."""
        batch = max(1, self.plan.light_batch if role == "light" else self.plan.heavy_batch)
        workers = ((w.worker_id, w.role, w.switch_s, w.free_at) for w in self.workers)
        return Stage(
            workers=sum(w.role == role for w in self.workers),
            batch=batch,
            batch_ms=self.latency_ms(role, batch),
            backlog=self.backlogs()[role],
            times=self.times[role],
            joining_ms=joining_ms(role, self.plan.roles, workers, self.now) if joining else (),
        )

    def admit(self, rec: JobRecord) -> None:
        """The router: validation, direct routing (split policies) and admission by predicted wait."""
        self.arrived += 1
        self.history.add(rec.arrival_ms)
        if self.cfg.controller and self.loop.idle and not self.early_tick:  # traffic after an idle tick
            self.early_tick = True
            self.at(self.now + self.loop.cfg.traffic_settle_s * 1000.0, self.tick, False)
        if rec.blank_prompt:  # the router refuses an empty prompt
            self.finish_error(rec, ErrorCode.INVALID, "prompt is empty")
            return
        job = SimJob(rec, self.prompts[rec.prompt_index], rec.arrival_ms + self.cfg.slo_ms)
        heavy = self.stage("heavy")
        decision = Decision.LIGHT
        if self.plan.heavy_fraction > 0:
            decision = direct_decision(
                self.rng.random(),
                self.plan.heavy_fraction,
                degrade_late=self.plan.degrade_late,
                on_time=heavy.on_time(self.now, job.deadline_ms),
            )
        headroom = DEFAULT_ADMISSION_HEADROOM
        verdict = admission.admit(
            self.plan,
            decision,
            self.now,
            job.deadline_ms,
            light=admission.at_headroom(self.stage("light", joining=True), headroom),
            heavy=admission.at_headroom(heavy, headroom),
            discriminator_ms=self.latency_ms("discriminator", max(1, self.plan.light_batch)) / headroom,
            max_light_backlog=DEFAULT_MAX_LIGHT_BACKLOG,
        )
        if not verdict.admitted:
            self.finish_error(rec, ErrorCode.OVERLOADED, verdict.reason)
            return
        if decision == Decision.HEAVY:
            job.routed_by = RoutedBy.DIRECT
            self.enqueue("heavy", [job])
            return
        job.routed_by = RoutedBy.FALLBACK if decision == Decision.LATE else RoutedBy.CASCADE
        self.enqueue("light", [job])

    def enqueue(self, queue: str, jobs: list[SimJob]) -> None:
        """Jobs one stage writes to a queue in one transaction (a batch's outputs): idle consumers read them."""
        self.queues[queue].extend(jobs)
        if queue == "discriminator":
            self.try_discriminator()
            return
        for w in self.workers:
            if not self.queues[queue]:
                break
            if not w.busy and w.role == queue:
                self.try_worker(w)
        # then workers filling a short batch: a Redis stream serves the consumers blocked longest first, and a
        # worker blocks again for its fill after the idle ones blocked
        for w in self.workers:
            if not self.queues[queue]:
                break
            if w.filling and w.role == queue:
                self._fill(w)

    def try_worker(self, w: SimWorker) -> None:
        if w.busy:
            return
        wanted = self.plan.roles.get(w.worker_id, w.role)
        if wanted != w.role:
            model = getattr(self.profile.spec, wanted)
            source = "host" if wanted in w.loaded else "disk"
            seconds = LOAD_SECONDS[source].get(model, DEFAULT_LOAD_SECONDS[source])
            w.busy, w.batch = True, []
            self.at(self.now + seconds * 1000.0, self.switched, w, wanted, seconds)
            return
        queue = self.queues[w.role]
        if not queue:
            return
        size = max(1, self.plan.light_batch if w.role == "light" else self.plan.heavy_batch)
        jobs = [queue.popleft() for _ in range(min(size, len(queue)))]
        fill_ms = self.plan.heavy_fill_ms if w.role == "heavy" else 0.0
        if fill_ms > 0 and len(jobs) < size:
            until = fill_until_ms(self.now, [j.deadline_ms for j in jobs], self.latency_ms("heavy", size), fill_ms)
            if until > self.now:  # the batch fill (common/routing.py): hold the short batch for more
                w.busy, w.batch, w.filling, w.fills = True, jobs, True, w.fills + 1
                w.free_at = until + self.latency_ms("heavy", size)  # its busy_s: it runs this batch first
                self.at(until, self._filled, w, w.fills)
                return
        self._start(w, jobs)

    def _fill(self, w: SimWorker) -> None:
        """A filling worker reads what arrived; with a full batch it runs it."""
        queue, size = self.queues[w.role], max(1, self.plan.heavy_batch)
        while queue and len(w.batch) < size:
            w.batch.append(queue.popleft())
        if len(w.batch) >= size:
            self._filled(w, w.fills)

    def _filled(self, w: SimWorker, fill: int) -> None:
        if not w.filling or w.fills != fill:  # the batch filled before this timer
            return
        jobs, w.batch, w.filling = w.batch, [], False
        self._start(w, jobs)

    def _start(self, w: SimWorker, jobs: list[SimJob]) -> None:
        """A worker's batch, read: the heavy worker's last check, then the model."""
        if w.role == "heavy" and self.plan.degrade_late:
            # the heavy worker's own check, with nothing ahead of this batch
            batch = Stage(workers=1, batch=len(jobs), batch_ms=self.latency_ms("heavy", len(jobs)))
            on_time = []
            for job in jobs:
                if batch.on_time(self.now, job.deadline_ms):
                    on_time.append(job)
                elif job.light_done:
                    self.finish(job, Role.LIGHT, LightReason.DEADLINE)
                else:
                    job.routed_by = RoutedBy.FALLBACK
                    self.enqueue("light", [job])
            jobs = on_time
            if not jobs:  # all answered or sent back: the worker pulls again after its pass
                w.busy = True
                self.at(self.now + self.hop_ms, self._free, w)
                return
        w.busy, w.batch = True, jobs
        w.free_at = self.now + self.latency_ms(w.role, len(jobs)) + self.hop_ms
        self.at(w.free_at, self.batch_done, w)

    def _free(self, w: SimWorker) -> None:
        w.busy = False
        self.try_worker(w)

    def switched(self, w: SimWorker, role: str, seconds: float) -> None:
        w.role, w.busy, w.switch_s = role, False, seconds
        w.loaded.add(role)
        self.try_worker(w)

    def batch_done(self, w: SimWorker) -> None:
        jobs, w.batch, w.busy = w.batch, [], False
        if w.role == "light":
            # A light worker writes its whole batch in one transaction: the discriminator reads it whole.
            for job in jobs:
                job.light_done = True
            self.enqueue("discriminator", jobs)
        else:
            for job in jobs:
                self.finish(job, Role.HEAVY)
        self.try_worker(w)

    def try_discriminator(self) -> None:
        queue = self.queues["discriminator"]
        if self.disc_busy or not queue:
            return
        self.disc_batch = [queue.popleft() for _ in range(min(DISCRIMINATOR_BATCH, len(queue)))]
        self.disc_busy = True
        self.at(self.now + self.latency_ms("discriminator", len(self.disc_batch)) + self.hop_ms, self.discriminated)

    def discriminated(self) -> None:
        jobs, self.disc_batch, self.disc_busy = self.disc_batch, [], False
        plan = self.plan
        heavy = self.stage("heavy") if plan.degrade_late else None
        scores = [self.scorer.confidence(job.prompt, job.record.prompt_index) for job in jobs]
        for job, score in zip(jobs, scores, strict=False):
            job.confidence = score
        thresholds = self.keeper.thresholds(plan, self.now, scores)
        onward = []
        for i in decision_order(scores):
            job = jobs[i]
            decision = cascade_decision(
                scores[i],
                thresholds[i],
                discriminator_routes=plan.discriminator_routes,
                degrade_late=plan.degrade_late,
                fallback=job.routed_by == RoutedBy.FALLBACK,
                on_time=heavy is None or heavy.on_time(self.now, job.deadline_ms),
            )
            if decision == Decision.LATE and heavy is not None and job.routed_by != RoutedBy.FALLBACK:
                waiting = self.queues["heavy"]
                k = exchange_for(heavy, self.now, job.deadline_ms, scores[i], [w.confidence for w in waiting])
                if k is not None:  # it takes the place of an easier prompt, answered with its light image
                    yielded = waiting[k]
                    del waiting[k]
                    self.finish(yielded, Role.LIGHT, LightReason.DEADLINE)
                    onward.append(job)
                    continue
            if decision == Decision.HEAVY:
                if heavy is not None:
                    heavy.admit()
                onward.append(job)
            else:
                self.finish(job, Role.LIGHT, light_reason(decision, scores[i], plan))
        self.enqueue("heavy", onward)
        self.try_discriminator()

    def finish(self, job: SimJob, answered_by: Role, reason: LightReason | None = None) -> None:
        done = self.now + self.hop_ms  # the router's delivery pass
        rec = job.record
        rec.received_s = done / 1000.0
        rec.result = FinalResult(
            job_id=rec.job_id,
            status=Status.OK,
            answered_by=answered_by,
            model=getattr(self.profile.spec, answered_by),
            confidence=job.confidence,
            degraded=reason not in (None, LightReason.CONFIDENT),
            light_reason=reason,
            latency_ms=done - rec.arrival_ms,
            slo_met=done <= job.deadline_ms,
            finished_ms=done,
        )
        self.outstanding -= 1

    def finish_error(self, rec: JobRecord, code: ErrorCode, message: str) -> None:
        rec.received_s = self.now / 1000.0
        rec.result = FinalResult(
            job_id=rec.job_id, status=Status.ERROR, error_code=code, error_message=message, finished_ms=self.now
        )
        self.outstanding -= 1


def simulate(
    profile: CascadeProfile,
    trace: Trace,
    prompts: list[str],
    cfg: SimConfig,
    *,
    overrides: dict[int, float] | None = None,
    seed: int = 0,
) -> RunRecord:
    return Simulation(profile, trace, prompts, cfg, overrides=overrides, seed=seed).run()

"""What the planner returns (:class:`PlanResult`, one constructor for every way a plan is made) and the
plan's trade-offs in words."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from common.messages import Objective, Plan, Policy, Role
from common.planner.policies import policy_spec
from common.routing import below_target, heavy_fill_ms


@dataclass(kw_only=True)
class LatencyBreakdown:
    light_ms: float = 0.0
    discriminator_ms: float = 0.0
    heavy_ms: float = 0.0
    light_queue_ms: float = 0.0
    heavy_queue_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(kw_only=True)
class PlanResult:
    policy: Policy
    objective: Objective
    threshold: float
    heavy_fraction: float
    light_batch: int
    heavy_batch: int
    light_workers: int
    heavy_workers: int
    feasible: bool
    latency: LatencyBreakdown
    estimated_quality: float | None
    objective_value: float  # t (threshold objective) or the quality score (quality objective)
    light_share: float
    demand_qps: float
    workers: int
    slo_ms: float
    solve_ms: float
    light_demand_qps: float = 0.0
    min_light_workers: int = 0  # what the chosen option needs, before spare workers are handed out
    min_heavy_workers: int = 0
    role_changes: int = 0
    roles: dict[str, Role] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan_ms: float = 0.0  # solve_ms plus building the problems and placing spare workers
    target_threshold: float | None = None  # quality_threshold(profile): what the cascade wants with room for all
    reason: str = ""  # why this plan, in words (the controller adds its part)
    fill_ms: float = 0.0  # the heavy batch fill the controller allows (Plan.heavy_fill_ms when the rule applies)
    share_window_ms: float = 0.0  # the share keeper's window (Plan.share_window_ms; a policy that routes on t)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_message(self, version: int, roles: dict[str, Role] | None = None, created_ms: float | None = None) -> Plan:
        spec = policy_spec(self.policy)
        return Plan(
            version=version,
            policy=self.policy,
            threshold=float(self.threshold),
            light_batch=int(self.light_batch),
            heavy_batch=int(self.heavy_batch),
            light_workers=int(self.light_workers),
            heavy_workers=int(self.heavy_workers),
            heavy_fraction=float(self.heavy_fraction),
            roles=dict(self.roles if roles is None else roles),
            demand_qps=float(self.demand_qps),
            feasible=bool(self.feasible),
            objective=self.objective,
            estimated_quality=None if self.estimated_quality is None else float(self.estimated_quality),
            created_ms=time.time() * 1000.0 if created_ms is None else created_ms,
            discriminator_routes=spec.discriminator_routes,
            degrade_late=spec.degrade_late,
            target_threshold=self.target_threshold,
            reason=self.reason or None,
            heavy_fill_ms=(
                heavy_fill_ms(self.threshold, self.target_threshold, self.heavy_batch, self.fill_ms)
                if spec.discriminator_routes
                else 0.0
            ),
            share_window_ms=self.share_window_ms if spec.discriminator_routes else 0.0,
        )


def explain(result: PlanResult, light_floor: int) -> str:
    """The plan's trade-offs in words (Plan.reason); ``light_floor``: the fewest light workers it had to keep."""
    parts = []
    if not result.feasible:
        parts.append("demand exceeds capacity even at the lowest threshold: maximum-throughput plan")
    target = result.target_threshold
    if result.heavy_workers and below_target(result.threshold, target) and result.heavy_fraction == 0:
        parts.append(
            f"t={result.threshold:g} < the cascade's {target:g}: {result.heavy_workers} heavy x{result.heavy_batch} "
            f"carry {100 * (1 - result.light_share):.0f} % of {result.demand_qps:.1f} q/s"
        )
    if result.light_workers:
        needed = f"{result.light_workers} light x{result.light_batch} for {result.light_demand_qps:.1f} q/s"
        if light_floor >= 2 and result.light_workers == light_floor:
            needed += f" (a floor of {light_floor} light workers)"
        parts.append(needed)
    return "; ".join(parts)

"""What each serving policy means, for the planner and for the data plane (via the plan's fields): one
table, :data:`POLICY_TABLE`; and a plan given explicitly (:class:`FixedPlan`)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from common.messages import Objective, Policy


class OptionKind(enum.StrEnum):
    """What a policy's routing knob is (its plans' options)."""

    THRESHOLD = "threshold"  # cascade on the discriminator's confidence, threshold t
    SPLIT = "split"  # a fraction h of the jobs straight to heavy
    LIGHT = "light"  # the light model alone
    HEAVY = "heavy"  # the heavy model alone


OBJECTIVES = tuple(Objective)


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """What a policy means, for the planner and for the data plane (via the plan's fields)."""

    options: OptionKind
    objective: Objective | None  # None: the configured objective (quality where the cascade has a curve)
    discriminator_routes: bool  # False: every light image is the answer
    degrade_late: bool  # the deadline rule: a job the heavy model cannot finish in time gets its light image
    fixed: bool = False  # planned once, never changed
    aimd: bool = False  # batch sizes by additive increase / multiplicative decrease on SLO misses
    summary: str = ""


POLICY_TABLE: dict[Policy, PolicySpec] = {
    Policy.DIFFSERVE: PolicySpec(
        options=OptionKind.THRESHOLD,
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        summary="MILP every interval, best estimated quality within the SLO",
    ),
    Policy.DIFFSERVE_THRESHOLD: PolicySpec(
        options=OptionKind.THRESHOLD,
        objective=Objective.THRESHOLD,
        discriminator_routes=True,
        degrade_late=True,
        summary="MILP every interval, largest t (the paper)",
    ),
    Policy.STATIC: PolicySpec(
        options=OptionKind.THRESHOLD,
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        fixed=True,
        summary="one plan (threshold, batches, roles) set once and never changed",
    ),
    Policy.CLIPPER_LIGHT: PolicySpec(
        options=OptionKind.LIGHT,
        objective=Objective.THRESHOLD,
        discriminator_routes=False,
        degrade_late=True,
        summary="light model only",
    ),
    Policy.CLIPPER_HEAVY: PolicySpec(
        options=OptionKind.HEAVY,
        objective=Objective.THRESHOLD,
        discriminator_routes=False,
        degrade_late=False,
        summary="heavy model only, late answers stay heavy",
    ),
    Policy.PROTEUS: PolicySpec(
        options=OptionKind.SPLIT,
        objective=Objective.THRESHOLD,
        discriminator_routes=False,
        degrade_late=True,
        summary="a random fraction straight to heavy, as large as capacity allows",
    ),
    Policy.AIMD: PolicySpec(
        options=OptionKind.THRESHOLD,
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        aimd=True,
        summary="batch sizes by AIMD on SLO misses, MILP for the rest",
    ),
}
POLICIES = tuple(POLICY_TABLE)


def spec_uses_light(policy: Policy) -> bool:
    return policy_spec(policy).options != OptionKind.HEAVY


def policy_spec(policy: Policy | str) -> PolicySpec:
    """A policy's meaning; a name that is no policy is a ValueError (what an operator typed, or an old plan)."""
    try:
        return POLICY_TABLE[Policy(policy)]
    except (ValueError, KeyError):  # not a Policy value, or one without an entry
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}") from None


@dataclass(frozen=True, kw_only=True)
class FixedPlan:
    """A plan given explicitly: ``t=0.02,light=4x16,heavy=12x4`` (workers x batch)."""

    threshold: float
    light_workers: int
    light_batch: int
    heavy_workers: int
    heavy_batch: int

    _SPEC = re.compile(r"^\s*t=([0-9.]+)\s*,\s*light=(\d+)x(\d+)\s*,\s*heavy=(\d+)x(\d+)\s*$")

    @classmethod
    def parse(cls, text: str) -> FixedPlan:
        m = cls._SPEC.match(text or "")
        if not m:
            raise ValueError(f"plan {text!r} is not of the form t=0.02,light=4x16,heavy=12x4 (workers x batch)")
        t, lw, lb, hw, hb = float(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5])
        if not 0.0 <= t <= 1.0 or min(lb, hb) < 1:
            raise ValueError(f"plan {text!r}: t must be in [0, 1] and batches at least 1")
        return cls(threshold=t, light_workers=lw, light_batch=lb, heavy_workers=hw, heavy_batch=hb)

    def __str__(self) -> str:
        return (
            f"t={self.threshold:g},light={self.light_workers}x{self.light_batch},"
            f"heavy={self.heavy_workers}x{self.heavy_batch}"
        )

"""After the solver: every worker gets a role (spare workers to the busier stage, then heavy), the batch
sizes are re-fitted to the final counts, AIMD's candidate batches, the maximum-throughput fallback, and
roles assigned to named workers with the fewest changes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

from common.messages import Policy, Role
from common.planner.policies import OptionKind, policy_spec
from common.planner.problem import ROLES, AimdState, Choice, Evaluation, Option, Problem, evaluate


def assign_roles(
    current: Mapping[str, str], light_workers: int, heavy_workers: int, *, ready_s: dict[str, float] | None = None
) -> dict[str, Role]:
    """A role for every worker in ``current`` (worker id -> its role now, or anything else
    for unknown) with ``light_workers`` light and ``heavy_workers`` heavy, changing the fewest
    known roles.  Workers beyond light+heavy keep their role (light when unknown); when the
    counts exceed the workers, light is served first.  Among workers that must flip, those
    ready soonest (``ready_s``: the batch each is running, then its measured switch) flip first; ids
    break ties so the result is stable."""
    cost = ready_s or {}
    ids = sorted(current)
    want = {Role.LIGHT: max(0, light_workers), Role.HEAVY: max(0, heavy_workers)}
    roles: dict[str, Role] = {}
    for role in ROLES:  # those slowest to switch stay put
        keepers = sorted((w for w in ids if current[w] == role), key=lambda w: (-cost.get(w, 0.0), w))[: want[role]]
        for w in keepers:
            roles[w] = role
    # unknown roles first (they cost no change), then the cheapest to switch
    rest = sorted((w for w in ids if w not in roles), key=lambda w: (current[w] in ROLES, cost.get(w, 0.0), w))
    for role in ROLES:
        need = want[role] - sum(1 for r in roles.values() if r == role)
        while need > 0 and rest:
            roles[rest.pop(0)] = role
            need -= 1
    for w in rest:  # more workers than light + heavy: leave them as they are
        roles[w] = Role(current[w]) if current[w] in ROLES else Role.LIGHT
    return roles


def count_changes(current: Mapping[str, str], roles: Mapping[str, str]) -> int:
    return sum(1 for w, r in roles.items() if current.get(w) in ROLES and current[w] != r)


def utilisation(problem: Problem, o: Option, role: Role, x: int, b: int) -> float:
    """Planned load over capacity of one stage (the load includes the backlog to drain)."""
    if role == Role.LIGHT:
        load, cap = problem.light_load(o), x * problem.p1(b)
    else:
        load, cap = problem.heavy_load(o), x * problem.p2(b)
    return math.inf if cap <= 0 else load * problem.headroom / cap


def refit_batches(problem: Problem, ch: Choice, x1: int, x2: int, refit: bool = True) -> tuple[Choice, Evaluation]:
    """Batch sizes for the counts (x1, x2): within the SLO and loading no stage more than the
    solver's plan ``ch`` did, the largest capacity (lowest utilisation of the busier stage, then of
    the other), then the lowest predicted latency; ``ch``'s batches when none fits (or when ``refit`` is off, as under
    AIMD batching).  A batch size is the most a worker takes: at low load it takes what is there,
    so a larger one costs little latency and is capacity in hand when a burst comes."""
    o = problem.options[ch.option]
    relaxed = dataclasses.replace(problem, keep_roles=False)
    if refit:
        rho1 = utilisation(problem, o, Role.LIGHT, ch.x1, ch.b1) if o.uses_light else 0.0
        rho2 = utilisation(problem, o, Role.HEAVY, ch.x2, ch.b2) if o.uses_heavy else 0.0
        # a stage the option sends nothing new gets the smallest batch (stable plans)
        b1s = (
            [b for b in problem.b1s if utilisation(problem, o, Role.LIGHT, x1, b) <= rho1 * (1 + 1e-9)]
            if o.uses_light
            else problem.b1s[:1]
        )
        b2s = (
            [b for b in problem.b2s if utilisation(problem, o, Role.HEAVY, x2, b) <= rho2 * (1 + 1e-9)]
            if o.uses_heavy
            else problem.b2s[:1]
        )
        best = None
        for b1 in b1s:
            for b2 in b2s:
                cand = Choice(option=ch.option, b1=b1, b2=b2, x1=x1, x2=x2)
                ev = evaluate(relaxed, cand)
                if ev.feasible:
                    rho = sorted(
                        (
                            utilisation(problem, o, Role.LIGHT, x1, b1) if o.uses_light else 0.0,
                            utilisation(problem, o, Role.HEAVY, x2, b2) if o.uses_heavy else 0.0,
                        ),
                        reverse=True,
                    )
                    key = (round(rho[0], 6), round(rho[1], 6), round(ev.total_ms, 6), (b1, b2) != (ch.b1, ch.b2))
                    if best is None or key < best[0]:
                        best = (key, cand, ev)
        if best is not None:
            return best[1], best[2]
    cand = Choice(option=ch.option, b1=ch.b1, b2=ch.b2, x1=x1, x2=x2)
    return cand, evaluate(relaxed, cand)


@dataclasses.dataclass(kw_only=True)
class _Pool:
    """Workers per role, and the spares still to hand out: a role's surplus (workers it has beyond the
    solver's count) or workers with no role yet."""

    x: dict[Role, int]
    surplus: dict[Role, int]
    unknown: int

    @property
    def spare(self) -> int:
        return self.surplus[Role.LIGHT] + self.surplus[Role.HEAVY] + self.unknown

    def take(self, r: Role) -> None:
        """One more worker for ``r``: its own surplus first, then one without a role, then the other's."""
        other = Role.HEAVY if r == Role.LIGHT else Role.LIGHT
        if self.surplus[r] > 0:
            self.surplus[r] -= 1
        elif self.unknown > 0:
            self.unknown -= 1
        else:
            self.surplus[other] -= 1
        self.x[r] += 1


def _pool(problem: Problem, ch: Choice) -> _Pool:
    unknown = max(0, problem.workers - problem.current_light - problem.current_heavy)
    if problem.keep_roles:  # known workers keep their role; only unknown ones are handed out
        x = {Role.LIGHT: max(ch.x1, problem.current_light), Role.HEAVY: max(ch.x2, problem.current_heavy)}
        return _Pool(x=x, surplus={Role.LIGHT: 0, Role.HEAVY: 0}, unknown=unknown)
    # workers of each role beyond what the solver placed there; deficits are covered by
    # workers without a role first, then by the other role's surplus (role changes)
    surplus = {Role.LIGHT: max(0, problem.current_light - ch.x1), Role.HEAVY: max(0, problem.current_heavy - ch.x2)}
    for role, need, other in ((Role.LIGHT, ch.x1, Role.HEAVY), (Role.HEAVY, ch.x2, Role.LIGHT)):
        deficit = max(0, need - (problem.current_light if role == Role.LIGHT else problem.current_heavy))
        from_unknown = min(unknown, deficit)
        unknown -= from_unknown
        surplus[other] = max(0, surplus[other] - (deficit - from_unknown))
    return _Pool(x={Role.LIGHT: ch.x1, Role.HEAVY: ch.x2}, surplus=surplus, unknown=unknown)


def heavy_limited(problem: Problem, o: Option) -> bool:
    """Whether the objective ranks higher an option that needs more heavy capacity than ``o``: the solver
    chose ``o`` because the heavy stage could not carry better (in a busy phase on a small cluster it may
    plan t = 0, so the heavy stage "runs nothing" and looked like the place a spare is wasted).  Cascade
    options only: there the deadline rule's exchange gives heavy capacity the hardest prompts whatever t
    the plan states; a split sends its heavy workers only their fraction."""
    if o.split:
        return False
    need = problem.heavy_load(o)
    return any(other.rank < o.rank and problem.heavy_load(other) > need for other in problem.options)


def hand_out_spares(problem: Problem, ch: Choice, *, target_util: float = 0.5) -> tuple[int, int]:
    """Final counts: the solver's counts plus every spare worker.

    When the option is short of heavy capacity (:func:`heavy_limited`: the objective ranks an option that
    needs more of it higher), every spare goes to the heavy stage, even where the option runs none (t = 0):
    the light stage already carries its load, and a heavy worker is quality, since the controller's replay
    and the deadline rule's exchange give any heavy capacity the hardest prompts.  Otherwise, while a
    stage's utilisation (load incl. backlog to drain, over capacity) is above ``target_util``, the stage
    with the highest utilisation gets the next spare, so its queueing falls, and the rest go to the heavy
    stage when the option uses it.  Either way the controller moves heavy workers to the light stage
    within seconds of a burst (common/control.py; its hysteresis decides whether a move is worth its role
    changes).  Stages the option does not use get none otherwise."""
    o = problem.options[ch.option]
    allowed = [r for r, used in ((Role.LIGHT, o.uses_light), (Role.HEAVY, o.uses_heavy)) if used] or [Role.LIGHT]
    pool = _pool(problem, ch)
    if heavy_limited(problem, o):
        while pool.spare > 0:
            pool.take(Role.HEAVY)
    b = {Role.LIGHT: ch.b1, Role.HEAVY: ch.b2}

    def rho(r: Role) -> float:
        return utilisation(problem, o, r, pool.x[r], b[r])

    while pool.spare > 0:
        if max(rho(r) for r in allowed) > target_util:
            pool.take(max(allowed, key=rho))
        else:
            pool.take(Role.HEAVY if Role.HEAVY in allowed else allowed[0])
    return pool.x[Role.LIGHT], pool.x[Role.HEAVY]


def best_batch(problem: Problem, paths: dict[int, float], rate: Callable[[int], float]) -> int:
    """Highest-throughput batch whose path latency fits the SLO (else the highest-throughput one)."""
    fits = [b for b in paths if paths[b] <= problem.slo_ms]
    return max(fits or list(paths), key=lambda b: (rate(b), -b))


def fallback(problem: Problem, policy: Policy) -> tuple[Choice, Evaluation]:
    """The maximum-throughput plan for a demand no option can meet."""
    S = problem.workers
    light_paths = {b: problem.light_path_ms(b) for b in problem.b1s}
    if policy_spec(policy).options == OptionKind.HEAVY:
        b2 = best_batch(problem, {b: problem.heavy_path_ms(b) for b in problem.b2s}, problem.p2)
        ch = Choice(option=0, b1=problem.b1s[0], b2=b2, x1=problem.min_light, x2=S - problem.min_light)
    else:  # every worker light, t = 0 (or h = 0)
        k = min(range(len(problem.options)), key=lambda i: (problem.options[i].heavy_factor, problem.options[i].value))
        b1 = best_batch(problem, light_paths, problem.p1)
        ch = Choice(option=k, b1=b1, b2=problem.b2s[0], x1=S - problem.min_heavy, x2=problem.min_heavy)
    return ch, evaluate(dataclasses.replace(problem, keep_roles=False), ch)


def aimd_batches(aimd: AimdState, batch_grid: Iterable[int]) -> list[tuple[int, int]]:
    """Candidate (light, heavy) batches in the order AIMD tries them: on SLO misses both halve;
    otherwise each tries one grid step up, falling back to the batches in force."""
    grid = sorted(batch_grid)

    def snap(b: int) -> int:
        return max([g for g in grid if g <= b] or [grid[0]])

    def up(b: int) -> int:
        return min([g for g in grid if g > b] or [grid[-1]])

    b1, b2 = snap(aimd.light_batch), snap(aimd.heavy_batch)
    if aimd.slo_miss:
        return [(snap(max(1, b1 // 2)), snap(max(1, b2 // 2)))]
    out: list[tuple[int, int]] = []
    for cand in ((up(b1), up(b2)), (up(b1), b2), (b1, up(b2)), (b1, b2)):
        if cand not in out:
            out.append(cand)
    return out

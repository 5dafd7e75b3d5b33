"""The optimum by MILP (python-mip, CBC): one binary per option, one per batch size per stage, an integer
worker count per batch size bounded by its binary (x_b <= S·y_b), so products of a batch choice and a
worker count are sums over x_b; the lexicographic objective (option rank, role changes, light workers,
latency) folded into one weighted sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.planner.problem import REL_TOL, Choice, Evaluation, Problem, brute_force, evaluate

_WARM = False


def warm_up() -> None:
    """Load CBC once (its first model costs ~0.2 s), so solve times measure solving."""
    global _WARM
    if not _WARM:
        import mip

        mip.Model(solver_name=mip.CBC)
        _WARM = True


@dataclass(frozen=True, kw_only=True)
class _Model:
    """The model and its variables (python-mip's, untyped)."""

    m: Any
    z: dict[int, Any]  # option k chosen
    y1: dict[int, Any]  # light batch b chosen
    y2: dict[int, Any]  # heavy batch b chosen
    x1: dict[int, Any]  # light workers at batch b
    x2: dict[int, Any]  # heavy workers at batch b
    c: Any  # role changes (a lower bound)
    lat: Any  # the chosen option's latency, in units of the SLO
    opts: list[int]
    u1: dict[int, int]  # the most light workers at batch b
    u2: dict[int, int]


def solve_milp(problem: Problem) -> tuple[Choice, Evaluation] | None:
    """The optimum by MILP (python-mip, CBC); None when no plan satisfies the constraints."""
    import mip

    warm_up()
    if problem.workers <= 0:
        return None
    opts = _possible_options(problem)
    if not opts:
        return None
    model = _variables(mip, problem, opts)
    _allocation_rows(mip, model, problem)
    _latency_rows(mip, model, problem)
    S = problem.workers
    w3 = 2.0  # lat <= 1 < w3: one light worker fewer outweighs any latency
    w2 = w3 * (S + 1) + 1.0  # one role change outweighs any number of light workers
    w1 = w2 * (S + 1) + 1.0  # one rank step outweighs any number of changes
    rank = mip.xsum(problem.options[k].rank * model.z[k] for k in opts)
    model.m.objective = mip.minimize(w1 * rank + w2 * model.c + w3 * mip.xsum(model.x1.values()) + model.lat)
    status = model.m.optimize()
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None
    return _solution(problem, model)


def _possible_options(problem: Problem) -> list[int]:
    """Options whose fixed part alone can meet the SLO and that need no role nobody may take."""
    lmin = min(problem.light_path_ms(b) for b in problem.b1s)
    hmin = min(problem.heavy_path_ms(b) for b in problem.b2s)
    opts = []
    for k, o in enumerate(problem.options):
        light = lmin if o.uses_light else 0.0
        heavy = hmin if o.uses_heavy else 0.0
        fixed = max(light, heavy) if o.split else light + heavy
        roles_there = (not o.uses_light or problem.current_light >= 1) and (
            not o.uses_heavy or problem.current_heavy >= 1
        )
        if fixed <= problem.slo_ms * (1 + REL_TOL) and (not problem.keep_roles or roles_there):
            opts.append(k)
    return opts


def _variables(mip: Any, problem: Problem, opts: list[int]) -> _Model:
    S = problem.workers
    U1 = {b: problem.current_light if problem.keep_roles else S for b in problem.b1s}
    U2 = {b: problem.current_heavy if problem.keep_roles else S for b in problem.b2s}
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = 1
    m.max_mip_gap = 1e-9
    m.max_mip_gap_abs = 1e-7
    m.preprocess = 0  # the model is tiny; CBC's preprocessing costs more than it saves
    return _Model(
        m=m,
        z={k: m.add_var(var_type=mip.BINARY, name=f"z{k}") for k in opts},
        y1={b: m.add_var(var_type=mip.BINARY, name=f"y1_{b}") for b in problem.b1s},
        y2={b: m.add_var(var_type=mip.BINARY, name=f"y2_{b}") for b in problem.b2s},
        x1={b: m.add_var(var_type=mip.INTEGER, lb=0, ub=U1[b], name=f"x1_{b}") for b in problem.b1s},
        x2={b: m.add_var(var_type=mip.INTEGER, lb=0, ub=U2[b], name=f"x2_{b}") for b in problem.b2s},
        c=m.add_var(lb=0, ub=S, name="changes"),
        lat=m.add_var(lb=0, ub=1 + REL_TOL, name="latency"),
        opts=opts,
        u1=U1,
        u2=U2,
    )


def _allocation_rows(mip: Any, v: _Model, problem: Problem) -> None:
    """One option and one batch per stage; worker counts within their batch's bound and the cluster;
    capacity for the chosen option's load; the floors; role changes."""
    m, opt, opts = v.m, problem.options, v.opts
    m += mip.xsum(v.z.values()) == 1
    m += mip.xsum(v.y1.values()) == 1
    m += mip.xsum(v.y2.values()) == 1
    for b in problem.b1s:
        m += v.x1[b] <= v.u1[b] * v.y1[b]
    for b in problem.b2s:
        m += v.x2[b] <= v.u2[b] * v.y2[b]
    X1, X2 = mip.xsum(v.x1.values()), mip.xsum(v.x2.values())
    m += X1 + X2 <= problem.workers
    m += mip.xsum(problem.p1(b) * v.x1[b] for b in problem.b1s) >= mip.xsum(
        problem.light_load(opt[k]) * (1 - REL_TOL) * v.z[k] for k in opts
    )
    m += mip.xsum(problem.p2(b) * v.x2[b] for b in problem.b2s) >= mip.xsum(
        problem.heavy_load(opt[k]) * (1 - REL_TOL) * v.z[k] for k in opts
    )
    m += X1 >= mip.xsum(v.z[k] for k in opts if opt[k].uses_light)
    m += X2 >= mip.xsum(v.z[k] for k in opts if opt[k].uses_heavy)
    if problem.min_light:
        m += X1 >= problem.min_light
    if problem.min_heavy:
        m += X2 >= problem.min_heavy
    m += v.c >= X1 - problem.current_light
    m += v.c >= X2 - problem.current_heavy


def _latency_rows(mip: Any, v: _Model, problem: Problem) -> None:
    """The latency of the chosen option: each kind of option (by which paths it uses) has one row."""
    m, slo, opt = v.m, problem.slo_ms, problem.options
    A1 = mip.xsum(problem.light_path_ms(b) / slo * v.y1[b] for b in problem.b1s)
    A2 = mip.xsum(problem.heavy_path_ms(b) / slo * v.y2[b] for b in problem.b2s)
    M = (max(problem.light_path_ms(b) for b in problem.b1s) + max(problem.heavy_path_ms(b) for b in problem.b2s)) / slo
    kinds: dict[tuple[bool, bool, bool], list[int]] = {}
    for k in v.opts:
        kinds.setdefault((opt[k].uses_light, opt[k].uses_heavy, opt[k].split), []).append(k)
    for (light, heavy, split), ks in kinds.items():
        chosen = mip.xsum(v.z[k] for k in ks)
        rows = ([A1] if light else []) + ([A2] if heavy else [])
        for row in rows if split else [mip.xsum(rows)]:
            m += v.lat >= row - M * (1 - chosen)


def _solution(problem: Problem, v: _Model) -> tuple[Choice, Evaluation] | None:
    k = max(v.opts, key=lambda i: v.z[i].x)
    b1 = max(problem.b1s, key=lambda b: v.y1[b].x)
    b2 = max(problem.b2s, key=lambda b: v.y2[b].x)
    x1, x2 = (int(round(sum(x.x for x in xs.values()))) for xs in (v.x1, v.x2))
    ch = Choice(option=k, b1=b1, b2=b2, x1=x1, x2=x2)
    if not problem.options[k].uses_light:
        ch.x1 = 0
    if not problem.options[k].uses_heavy:
        ch.x2 = 0
    ev = evaluate(problem, ch)
    if not ev.feasible:  # numerical trouble: the enumeration is exact and cheap
        return brute_force(problem, exhaustive=False)
    return ch, ev

"""The planner: which threshold, batch sizes and light/heavy worker split serve demand D
on S workers within the SLO at the best quality. Pure computation, no Redis; the controller,
``diffserve plan`` and the simulator (``diffserve simulate``) all call it.

Formulation (the DiffServe paper's MILP, solved with python-mip / CBC), for one choice of
threshold t (or, for ``proteus``, heavy fraction h) from a grid, one light batch b1 and one
heavy batch b2 from the batch grid, and integer worker counts x1 (light), x2 (heavy)::

    rho·x1·p1(b1) >= DL + B1/H          light capacity (p(b) = b / e(b) per worker)
    rho·x2·p2(b2) >= D·f(t) + B2/H      heavy capacity for the share the discriminator sends on
    x1 + x2       <= S
    (1+k)·(e1(b1) + ed(b1)) + (1+k)·e2(b2) <= SLO

Differences from the original, on purpose:

- a backlog B is work to drain within ``drain_s`` (H), so it adds capacity, not latency: the
  measured queue wait used to make every t > 0 infeasible after a busy interval, the plan flipped
  to t = 0, the queue drained and t came back (bang-bang).  Jobs already queued are protected by
  the data plane's deadline rule (common/routing.py), which answers a job with its light image
  when the heavy stage cannot finish it in time;
- capacity is planned at utilisation ``headroom`` (rho, 0.85 by default), because the profiled
  latencies are means and queues grow without bound as utilisation nears 1; with that cap a job
  waits about k = half a batch for a worker (``WAIT_BATCHES``), which the latency budget includes;
- the light stage may be planned for a higher demand DL than the heavy stage (the controller passes
  the rate the last minutes exceeded half the time, or a burst's rate): every query passes through the
  light model, so an under-provisioned light stage misses the SLO for everyone, while a short heavy
  overload only degrades some answers;
- the discriminator's batch latency ed(b1) is in the latency budget (it scores each light batch);
- no worker is reserved for a sink;
- ties on the objective are broken by fewer role changes against the current assignment, then
  by fewer light workers (larger light batches: the heavy stage is the scarce one when a burst
  comes), then by lower predicted latency;
- the threshold grid is 0.01 wide (f(t) is interpolated between the calibrated points), so the
  heavy share can be matched to capacity instead of jumping from 0 to f(0.05) = 36 %;
- ``threshold_window`` bounds how far t may move from the plan in force (the controller's
  smoothing); when nothing inside the window is feasible the whole grid is searched for the
  allocation, and t moves to the window's edge nearest the feasible plan's: a burst is carried
  by the data plane's deadline rule while t steps down tick by tick only if the load persists;
- when even t=0 cannot meet demand the plan is "maximum throughput" (every worker light,
  the highest-throughput batch that fits, t=0) and ``feasible`` is False;
- a queue that still holds jobs keeps at least one worker (with two or more workers) even
  when the chosen option sends it nothing new (t=0, clipper-heavy), so no job is stranded.

Linearisation is exact: one binary per option (t), one binary per batch size per stage and an
integer worker count per batch size bounded by its binary (x_b <= S·y_b).  Products of a
batch choice and a worker count become sums over x_b.  The objective is lexicographic (option
rank, role changes, latency) folded into one weighted sum; :func:`brute_force` enumerates the
same grid and is what the tests compare to (key: rank, changes, light workers, latency).

Objectives: ``threshold`` maximises t (the paper).  ``quality`` (the default where the cascade
has a quality curve) picks the feasible threshold whose light share 1-f(t) has the best
estimated quality (FID: lower is better), ties to the larger t.  Workers the chosen plan does
not need are handed, one by one, to the stage with the higher utilisation (load including its
backlog over capacity), and the batch sizes are then re-fitted to the final counts, so every
worker gets a role and the predicted latency falls.

What each policy means (its options, objective and what the data plane does with its plans)
is one table, :data:`POLICY_TABLE`; the services read the plan's explicit fields, never the
policy's name.

Time units: every profiled latency is multiplied by ``latency_scale`` and the SLO is taken as
given (``slo_ms``).  A controller running the profiled backend with ``time_scale`` < 1 passes
``latency_scale=time_scale`` and ``slo_ms=SLO*time_scale`` and measures demand in real
(wall-clock, i.e. "fast") queries/s, so latencies, SLO and demand are all in the same units.

Modules, by idea: ``policies`` (what each policy means, :data:`POLICY_TABLE`; fixed plans),
``problem`` (inputs, the problem, evaluation, the exact enumeration), ``milp`` (the solver),
``allocation`` (spare workers, batch refits, AIMD, the fallback, roles of named workers), ``result``
(:class:`PlanResult` and its explanation), ``solve`` (:func:`plan` over a :class:`PlanRequest`) and
``cli`` (``diffserve plan``). The names the rest of the code uses are imported here.
"""

from common.messages import Objective, Policy
from common.planner.allocation import assign_roles, count_changes
from common.planner.milp import solve_milp, warm_up
from common.planner.policies import OBJECTIVES, POLICIES, POLICY_TABLE, FixedPlan, OptionKind, PolicySpec, policy_spec
from common.planner.problem import (
    DEFAULT_HEADROOM,
    ROLES,
    THRESHOLD_GRID,
    WAIT_BATCHES,
    AimdState,
    QueueStats,
    brute_force,
    build_problem,
    default_plan,
    evaluate,
    quality_threshold,
)
from common.planner.result import LatencyBreakdown, PlanResult, explain
from common.planner.solve import PlanRequest, plan, solve

__all__ = [
    "DEFAULT_HEADROOM",
    "OBJECTIVES",
    "POLICIES",
    "POLICY_TABLE",
    "ROLES",
    "THRESHOLD_GRID",
    "WAIT_BATCHES",
    "AimdState",
    "FixedPlan",
    "LatencyBreakdown",
    "Objective",
    "OptionKind",
    "PlanRequest",
    "PlanResult",
    "Policy",
    "PolicySpec",
    "QueueStats",
    "assign_roles",
    "brute_force",
    "build_problem",
    "count_changes",
    "default_plan",
    "evaluate",
    "explain",
    "plan",
    "policy_spec",
    "quality_threshold",
    "solve",
    "solve_milp",
    "warm_up",
]

"""Turns replays into ``report.json`` and ``summary.md``.

Units: every latency and time in the report is **full-speed** (wall-clock value divided by
the run's time scale), labelled ``..._ms`` / ``t_s`` with ``"units": "full-speed"``.

Per policy: SLO violation ratio (errors and lost jobs count as violations), latency
p50/p95/p99 (router-measured arrival -> answer, and client-measured send -> receive),
throughput, share answered by the heavy model, errors by code, lost jobs (sent, no result
by the end: must be 0), duplicated results (must be 0), degraded answers and quality.

Quality (profiled backend): an FID estimate per 5-second window (full-speed time, by arrival),
averaged over windows, as the DiffServe paper does, with one correction.  The cascade's quality
curve gives FID against the light share for the discriminator-picked split (the easiest
``share`` of prompts answered by the light model, the rest by the heavy one).  The paper maps
each window's light share through it, counting every light answer alike (``paper_estimate``).
But a degraded answer (the light image of a job the heavy model could not finish in time) is
not one of the easiest prompts: it was escalated because it is hard, and a random split
(``proteus``) answers hard prompts light too.  So each window is also charged what its light
answers cost over the window's most confident prompts, in an additive model where a light answer
costs the curve's slope at the light share where the discriminator would just have answered it
light (from its confidence and f(t)).  Without degraded answers or random splits both estimates
agree.
With real models (tiny/diffusers) the report gives the heavy share and the mean
discriminator confidence of the light answers instead.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.messages import Role, Status
from common.quality import QualityModel

if TYPE_CHECKING:
    from common.messages import FinalResult
    from common.profiles import ConfidenceCurve, QualityCurve
    from loadtest.runner import JobRecord, RunRecord

LAG_WARN_SHARE = 0.1  # warn when the tester sent a query later than this share of the SLO


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): what benchmarks report per job."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float], digits: int = 2) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(a, 50)), digits),
        "p95": round(float(np.percentile(a, 95)), digits),
        "p99": round(float(np.percentile(a, 99)), digits),
        "mean": round(float(a.mean()), digits),
        "max": round(float(a.max()), digits),
        "n": len(values),
    }


def _bin_counts(times_s: list[float], bin_s: float, n_bins: int) -> list[int]:
    bins = [0] * n_bins
    for t in times_s:
        if t >= 0:
            bins[min(n_bins - 1, int(t / bin_s))] += 1
    return bins


def summarize(
    run: RunRecord,
    *,
    slo_ms: float,
    backend: str = "profiled",
    curve: QualityCurve | None = None,
    confidence_curve: ConfidenceCurve | None = None,
    bin_s: float | None = None,
) -> dict[str, Any]:
    """One policy's entry of report.json from a :class:`loadtest.runner.RunRecord`; ``curve`` is the
    cascade's quality curve, ``confidence_curve`` its f(t) (the profiled backend's confidences)."""
    x = run.time_scale
    jobs = run.jobs
    measured = [j for j in jobs if not j.blank_prompt]
    results = _answered(run)
    ok = [(j, r, received) for j, r, received in results if r.status == Status.OK]
    errors = Counter(r.error_code or "unknown" for _j, r, _t in results if r.status != Status.OK)
    lost = len(jobs) - len(results)
    met = sum(bool(r.slo_met) for _j, r, _t in ok)
    by = Counter(r.answered_by for _j, r, _t in ok)
    duration_s = max(run.trace.duration_s, (max((j.arrival_ms for j in jobs), default=0) / 1000))
    latency = [r.latency_ms / x for _j, r, _t in ok if r.latency_ms is not None]
    e2e = [(received - j.sent_s) * 1000 / x for j, _r, received in ok]
    entry = {
        "policy": run.policy,
        "units": "full-speed (wall-clock / time_scale)",
        "time_scale": x,
        "slo_ms": slo_ms,
        "sent": len(jobs),
        "answered": len(results),
        "ok": len(ok),
        "lost": lost,
        "duplicates": run.duplicates,
        "unknown_results": run.unknown_results,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        # light answers for jobs the cascade wanted the heavy model for: the deadline rule's and the plan's
        "degraded": sum(bool(r.degraded) for _j, r, _t in ok),
        "light_reasons": dict(Counter(str(r.light_reason) for _j, r, _t in ok if r.light_reason is not None)),
        "blank_prompts": sum(j.blank_prompt for j in jobs),
        "slo_met": met,
        # The prompt file's blank lines are refused as empty prompts by design: not the system's misses.
        "slo_violation_ratio": round(1 - met / len(measured), 4) if measured else None,
        "latency_ms": percentiles(latency),
        "e2e_latency_ms": percentiles(e2e),
        "offered_qps": round(len(jobs) / duration_s, 3) if duration_s else None,
        "throughput_qps": round(len(ok) / duration_s, 3) if duration_s else None,
        "goodput_qps": round(met / duration_s, 3) if duration_s else None,
        "answered_light": by.get(Role.LIGHT, 0),
        "answered_heavy": by.get(Role.HEAVY, 0),
        "heavy_share": round(by.get(Role.HEAVY, 0) / len(ok), 4) if ok else None,
        "drained": run.drained,
        "wall_s": round(run.wall_s, 2),
        "max_send_lag_ms": round(run.max_send_lag_s * 1000 / x, 2),
    }
    answers: list[tuple[float, str | None, float | None]] = [
        (j.arrival_ms / 1000, r.answered_by, r.confidence) for j, r, _t in ok
    ]
    if backend == "profiled" and curve is not None and confidence_curve is not None:
        entry["quality"] = QualityModel(curve, lambda c: 1.0 - confidence_curve.f(c)).estimate(answers)
    else:
        conf = [r.confidence for _j, r, _t in ok if r.answered_by == Role.LIGHT and r.confidence is not None]
        entry["quality"] = {
            "metric": "heavy_share+light_confidence",
            "estimate": None,
            "heavy_share": entry["heavy_share"],
            "mean_light_confidence": round(float(np.mean(conf)), 4) if conf else None,
            "method": "real models: heavy share and the mean discriminator confidence of the "
            "light answers (no FID without a reference set)",
        }
    entry["timeline"] = timeline(run, bin_s or default_bin_s(duration_s))
    return entry


def _answered(run: RunRecord) -> list[tuple[JobRecord, FinalResult, float]]:
    """(job, its result, when it was received) of every job that got one."""
    return [(j, j.result, j.received_s) for j in run.jobs if j.result is not None and j.received_s is not None]


def default_bin_s(duration_s: float) -> float:
    return max(1.0, round(duration_s / 60))


def timeline(run: RunRecord, bin_s: float) -> dict[str, Any]:
    """Per-bin series (full-speed seconds) for the plots, plus the plan samples."""
    x = run.time_scale
    ok = [(j, r, received) for j, r, received in _answered(run) if r.status == Status.OK]
    end_s = max([run.trace.duration_s] + [received / x for _j, _r, received in ok])
    n = max(1, math.ceil(end_s / bin_s))
    offered = _bin_counts([j.arrival_ms / 1000 for j in run.jobs], bin_s, n)
    done = _bin_counts([received / x for _j, _r, received in ok], bin_s, n)
    arrived_ok = _bin_counts([j.arrival_ms / 1000 for j, r, _t in ok if r.slo_met], bin_s, n)
    heavy = _bin_counts([j.arrival_ms / 1000 for j, r, _t in ok if r.answered_by == Role.HEAVY], bin_s, n)
    answered = _bin_counts([j.arrival_ms / 1000 for j, _r, _t in ok], bin_s, n)
    samples = []
    for s in run.plan_samples:
        s = dict(s)
        s["t_s"] = round(s["t_s"] / x, 3)
        samples.append(s)
    return {
        "bin_s": bin_s,
        "t_s": [i * bin_s for i in range(n)],
        "offered_qps": [c / bin_s for c in offered],
        "throughput_qps": [c / bin_s for c in done],
        "slo_miss_ratio": [None if o == 0 else round(1 - m / o, 4) for o, m in zip(offered, arrived_ok, strict=False)],
        "heavy_share": [None if a == 0 else round(h / a, 4) for a, h in zip(answered, heavy, strict=False)],
        "plan": samples,
    }


JOB_COLUMNS = (
    "job_id",
    "prompt_index",
    "arrival_ms",
    "sent_ms",
    "received_ms",
    "status",
    "error_code",
    "answered_by",
    "confidence",
    "degraded",
    "latency_ms",
    "slo_met",
)


def write_jobs_csv(run: RunRecord, path: str | Path) -> Path:
    """One line per sent job (full-speed ms; empty result columns for a lost job)."""
    import csv

    x = run.time_scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(JOB_COLUMNS)
        for j in run.jobs:
            r = j.result
            w.writerow(
                [
                    j.job_id,
                    j.prompt_index,
                    round(j.arrival_ms, 3),
                    round(j.sent_s * 1000 / x, 3),
                    "" if j.received_s is None else round(j.received_s * 1000 / x, 3),
                    "lost" if r is None else r.status,
                    "" if r is None else (r.error_code or ""),
                    "" if r is None else (r.answered_by or ""),
                    "" if r is None or r.confidence is None else round(r.confidence, 6),
                    "" if r is None else int(bool(r.degraded)),
                    "" if r is None or r.latency_ms is None else round(r.latency_ms / x, 3),
                    "" if r is None else int(bool(r.slo_met)),
                ]
            )
    return path


def write_report(out_dir: str | Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "policies": {e["policy"]: e for e in entries}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(summary_markdown(report))
    return out / "report.json"


def publish(out_dir: str | Path, entries: list[dict[str, Any]], meta: dict[str, Any], *, plots: bool = True) -> Path:
    """report.json, summary.md and (optionally) the plots; prints the summary.  What ``diffserve
    loadtest`` and ``diffserve simulate`` both end with."""
    path = write_report(out_dir, entries, meta)
    if plots:
        from loadtest.plots import write_plots

        write_plots({"meta": meta, "policies": {e["policy"]: e for e in entries}}, out_dir)
    print((Path(out_dir) / "summary.md").read_text())
    print(f"report: {path}")
    return path


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def summary_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Load test: {meta.get('trace', '')} trace",
        "",
        f"{meta.get('sent', '?')} queries over {meta.get('duration_s', '?')} s (full speed), "
        f"backend {meta.get('backend')}, cascade {meta.get('cascade')}, {meta.get('workers', '?')} workers, "
        f"SLO {meta.get('slo_ms')} ms, time scale {meta.get('time_scale')} "
        f"(latencies are full-speed ms = wall / time scale).",
        "",
    ]
    profiled = meta.get("backend") == "profiled"
    qcol = "FID est." if profiled else "light conf."
    lines.append(
        f"| policy | SLO miss | p50 ms | p95 ms | p99 ms | goodput q/s | heavy share | {qcol} "
        "| degraded | errors | lost | dup |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in report["policies"].values():
        q = e["quality"]
        qv = _fmt(q.get("estimate"), ".2f") if profiled else _fmt(q.get("mean_light_confidence"), ".3f")
        errs = ", ".join(f"{k} {v}" for k, v in e["errors"].items()) or "0"
        lat = e["latency_ms"]
        miss = None if e["slo_violation_ratio"] is None else 100 * e["slo_violation_ratio"]
        lines.append(
            f"| {e['policy']} | {_fmt(miss, '.1f')} % "
            f"| {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} "
            f"| {_fmt(e['goodput_qps'], '.2f')} "
            f"| {_fmt(100 * e['heavy_share'] if e['heavy_share'] is not None else None, '.1f')} % "
            f"| {qv} | {e['degraded']} | {errs} | {e['lost']} | {e['duplicates']} |"
        )
    lines.append("")
    if profiled:
        first = next(iter(report["policies"].values()), None)
        if first and first["quality"].get("all_heavy") is not None:
            q = first["quality"]
            lines.append(
                f"FID estimate: {q['method']}; all-heavy {q['all_heavy']:.2f}, "
                f"all-light {q['all_light']:.2f} ({q['curve']}). Lower is better."
            )
    else:
        lines.append("Quality with real models: heavy share and mean discriminator confidence of light answers.")
    lines.append("")
    lagging = {
        e["policy"]: e["max_send_lag_ms"]
        for e in report["policies"].values()
        if e.get("max_send_lag_ms") and e["max_send_lag_ms"] > LAG_WARN_SHARE * e["slo_ms"]
    }
    if lagging:
        worst = ", ".join(f"{p} {v:.0f} ms" for p, v in lagging.items())
        lines += [
            f"**Warning:** the load generator sent some queries late (max lag, full speed: {worst}): the "
            "replay was not faithful at this time scale (this machine's CPUs, shared by the tester and "
            "the services, could not keep up); use a larger --time-scale or fewer workers.",
            "",
        ]
    offered = meta.get("sent", 0) / meta["duration_s"] if meta.get("duration_s") else None
    lines.append(
        "SLO miss counts errors and lost jobs as misses. p50/p95/p99: router-measured latency "
        "(arrival at the router -> answer), full-speed ms. Goodput: answers within the SLO per second "
        f"of trace (offered {_fmt(offered, '.2f')} q/s)."
    )
    return "\n".join(lines) + "\n"

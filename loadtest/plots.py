"""PNG plots of a load-test report (matplotlib, Agg backend).

``python -m loadtest.plots OUT/report.json`` redraws them from a saved report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ("demand_throughput.png", "slo_miss.png", "threshold.png", "workers.png", "compare.png")


def _policies(report: dict[str, Any]) -> list[dict[str, Any]]:
    return list(report["policies"].values())


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int, width: float = 4.2, height: float = 3.0) -> tuple[Any, Any]:
    cols = min(3, max(1, n))
    rows = (max(1, n) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharex=True, sharey=True)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def demand_vs_throughput(report: dict[str, Any], path: Path) -> Path:
    """One panel per policy: offered load (the same trace) and answers completed per second."""
    entries = _policies(report)
    fig, axes = _grid(len(entries))
    for ax, e in zip(axes.flat, entries, strict=False):
        tl = e["timeline"]
        ax.plot(tl["t_s"], tl["offered_qps"], color="black", lw=1.6, label="demand")
        ax.plot(tl["t_s"], tl["throughput_qps"], color="#1f77b4", lw=1.1, label="throughput")
        ax.set_title(e["policy"], fontsize=9)
        ax.set_xlabel("time (s, full speed)", fontsize=8)
        ax.set_ylabel("queries / s", fontsize=8)
        ax.grid(alpha=0.3)
    if entries:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Demand vs throughput")
    return _save(fig, path)


def slo_miss_over_time(report: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for e in _policies(report):
        tl = e["timeline"]
        pts = [(t, 100 * m) for t, m in zip(tl["t_s"], tl["slo_miss_ratio"], strict=False) if m is not None]
        if pts:
            ax.plot(*zip(*pts, strict=False), lw=1.2, label=e["policy"])
    ax.set_xlabel("arrival time (s, full speed)")
    ax.set_ylabel("SLO miss (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("SLO-miss ratio over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def threshold_over_time(report: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    drawn = False
    for e in _policies(report):
        samples = e["timeline"]["plan"]
        pts = [(s["t_s"], s["threshold"]) for s in samples if s.get("threshold") is not None]
        if pts:
            (line,) = ax.step(*zip(*pts, strict=False), where="post", lw=1.2, label=e["policy"])
            drawn = True
            # proteus splits by a heavy fraction instead of a threshold: draw it dashed
            frac = [(s["t_s"], s.get("heavy_fraction") or 0.0) for s in samples if s.get("threshold") is not None]
            if any(f for _t, f in frac):
                ax.step(
                    *zip(*frac, strict=False),
                    where="post",
                    lw=1.2,
                    ls="--",
                    color=line.get_color(),
                    label=f"{e['policy']} heavy fraction",
                )
    if not drawn:
        ax.text(
            0.5, 0.5, "no plan stored (no controller): threshold 0.5 throughout", ha="center", transform=ax.transAxes
        )
    ax.set_xlabel("time (s, full speed)")
    ax.set_ylabel("confidence threshold (dashed: heavy fraction)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Threshold over time")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def workers_over_time(report: dict[str, Any], path: Path) -> Path:
    entries = _policies(report)
    fig, axes = _grid(len(entries))
    for ax, e in zip(axes.flat, entries, strict=False):
        samples = e["timeline"]["plan"]
        t = [s["t_s"] for s in samples]
        # Actual roles from the workers' heartbeats; the plan's counts where no heartbeat was read.
        light = [s.get("roles", {}).get("light", s.get("light_workers", 0)) for s in samples]
        heavy = [s.get("roles", {}).get("heavy", s.get("heavy_workers", 0)) for s in samples]
        if t:
            ax.stackplot(t, light, heavy, labels=["light", "heavy"], colors=["#78aadc", "#dc965a"], step="post")
        ax.set_title(e["policy"], fontsize=9)
        ax.set_xlabel("time (s, full speed)", fontsize=8)
        ax.set_ylabel("workers", fontsize=8)
        ax.grid(alpha=0.3)
    if entries:
        axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Workers per role over time")
    return _save(fig, path)


def compare_policies(report: dict[str, Any], path: Path) -> Path:
    entries = _policies(report)
    names = [e["policy"] for e in entries]
    profiled = report["meta"].get("backend") == "profiled"
    panels = [
        ("SLO miss (%)", [100 * (e["slo_violation_ratio"] or 0) for e in entries]),
        ("heavy share (%)", [100 * (e["heavy_share"] or 0) for e in entries]),
    ]
    if profiled:
        panels.append(("FID estimate (lower is better)", [e["quality"].get("estimate") or 0 for e in entries]))
    else:
        panels.append(("mean light confidence", [e["quality"].get("mean_light_confidence") or 0 for e in entries]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, values) in zip(axes, panels, strict=False):
        bars = ax.bar(range(len(names)), values, color=[colours[i % len(colours)] for i in range(len(names))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.bar_label(bars, fmt="%.1f" if "FID" in title or "%" in title else "%.3f", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        if "FID" in title and entries:
            q = entries[0]["quality"]
            lo = min(v for v in values + [q.get("all_heavy", 0), q.get("all_light", 0)] if v)
            hi = max(values + [q.get("all_heavy", 0), q.get("all_light", 0)])
            ax.set_ylim(lo * 0.9, hi * 1.05)
            for key, style in (("all_heavy", ":"), ("all_light", "--")):
                if q.get(key):
                    ax.axhline(q[key], color="grey", ls=style, lw=1, label=key.replace("_", " "))
            ax.legend(fontsize=7)
    fig.suptitle("Policies side by side")
    return _save(fig, path)


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        demand_vs_throughput(report, out / PLOTS[0]),
        slo_miss_over_time(report, out / PLOTS[1]),
        threshold_over_time(report, out / PLOTS[2]),
        workers_over_time(report, out / PLOTS[3]),
        compare_policies(report, out / PLOTS[4]),
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m loadtest.plots OUT/report.json")
    path = Path(argv[0])
    for p in write_plots(json.loads(path.read_text()), path.parent):
        print(p)


if __name__ == "__main__":
    main()

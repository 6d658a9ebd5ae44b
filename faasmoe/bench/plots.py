"""Plots of a `faasmoe bench` report: memory and CPU over time at the headline rate, and by rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_all(report: dict, out: Path) -> list[Path]:
    """memory.png and cpu.png over time, and rates.png by rate (not for a closed loop: it has no rates)."""
    paths = [_over_time(report, out, "pss_gb", "physical memory (PSS, GB)", "Memory", "memory.png"),
             _over_time(report, out, "cpu_percent", "CPU (%)", "CPU", "cpu.png")]
    if _closed(report):
        (out / "rates.png").unlink(missing_ok=True)  # an earlier run's in this folder would pass for this one's
        return paths
    return [*paths, _by_rate(report, out)]


def _closed(report: dict) -> bool:
    return report["workload"]["arrival"] == "concurrent"


def _headline_runs(report: dict) -> list[dict]:
    rate = (report.get("headline") or {}).get("rate_per_tenant")
    return [r for r in report["runs"] if r["purpose"] == "main" and r["rate_per_tenant"] == rate]


def _over_time(report: dict, out: Path, key: str, ylabel: str, what: str, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in _headline_runs(report):
        ax.plot([s["t"] for s in r["timeline"]], [s[key] for s in r["timeline"]], label=r["strategy"])
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel(ylabel)
    load = "closed loop" if _closed(report) else "headline rate"
    ax.set_title(f"{what} of all processes, {report['workload']['tenants']} tenants, {load}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return out / name


def _by_rate(report: dict, out: Path) -> Path:
    main = [r for r in report["runs"] if r["purpose"] == "main"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("avg_mem_gb_physical", "average physical memory (GB)"), ("cpu_seconds_per_token", "CPU-s per token"),
              ("drain_s", "drain time (s)"))
    for strategy in dict.fromkeys(r["strategy"] for r in main):
        pts = sorted((r for r in main if r["strategy"] == strategy), key=lambda r: r["rate_per_tenant"])
        for ax, (key, label) in zip(axes, panels):
            ax.plot([r["rate_per_tenant"] for r in pts], [r[key] for r in pts], marker="o", label=strategy)
            ax.set_xlabel("mean requests/s per tenant")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=110)
    plt.close(fig)
    return out / "rates.png"

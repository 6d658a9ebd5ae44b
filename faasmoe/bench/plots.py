"""Plots of a `faasmoe bench` report: memory and CPU over time, per-tenant bars, the granularity trade-off."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_all(report: dict, out: Path) -> list[Path]:
    return [p for p in (_over_time(report, out, "pss_gb", "memory (PSS, GB)", "Memory", "memory.png"),
                        _over_time(report, out, "cpu_percent", "CPU (%)", "CPU", "cpu.png"),
                        _tenants(report, out), _granularity(report, out)) if p]


def _over_time(report: dict, out: Path, key: str, ylabel: str, what: str, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for strategy, r in report["strategies"].items():
        ax.plot([s["t"] for s in r["timeline"]], [s[key] for s in r["timeline"]], label=strategy)
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{what} of all processes, {report['workload']['tenants']} tenants")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return out / name


def _tenants(report: dict, out: Path) -> Path:
    strategies = list(report["strategies"])
    tenants = list(report["strategies"][strategies[0]]["per_tenant"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(strategies)
    for ax, key, label in ((axes[0], "cpu_seconds", "CPU-seconds"), (axes[1], "gb_seconds", "GB-seconds")):
        for i, s in enumerate(strategies):
            vals = [report["strategies"][s]["per_tenant"][t][key] for t in tenants]
            ax.bar([j + i * width for j in range(len(tenants))], vals, width, label=s)
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(tenants))], tenants)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per tenant")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tenants.png", dpi=120)
    plt.close(fig)
    return out / "tenants.png"


def _granularity(report: dict, out: Path) -> Path | None:
    rows = report.get("sweep") or []
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("invocations_per_token", "invocations per generated token", 1),
              ("tpot_p50_s", "time per output token, p50 (ms)", 1000), ("avg_memory_gb", "average memory (GB)", 1))
    for strategy in sorted({r["strategy"] for r in rows}):
        pts = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["experts_per_function"])
        ks = [r["experts_per_function"] for r in pts]
        for ax, (key, label, scale) in zip(axes, panels):
            ax.plot(ks, [(r[key] or 0) * scale for r in pts], marker="o", label=strategy)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("experts per function (k)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Granularity trade-off")
    fig.tight_layout()
    fig.savefig(out / "granularity.png", dpi=120)
    plt.close(fig)
    return out / "granularity.png"

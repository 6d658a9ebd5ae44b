"""What machine a figure was measured on, recorded beside every benchmark result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import psutil


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform(),
        "code": code_version(),
    }


def code_version() -> str | None:
    """The commit of the faasmoe source that ran (with "+dirty" for uncommitted changes to tracked files), when it
    runs from a git checkout; else the installed package's version."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                     "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        from faasmoe import __version__

        return __version__

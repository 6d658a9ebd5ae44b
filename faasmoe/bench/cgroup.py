"""A memory cgroup for a benchmark run: a hard limit on everything its processes use, page cache included.

A server that keeps every expert resident cannot be told "use at most 16 GiB" any other way: its weights
are file pages (mapped or read) that the kernel charges to the cgroup of the process that faulted them in,
and reclaims, or OOM-kills, at the limit. Works with cgroup v1 (`memory.limit_in_bytes`,
`memory.max_usage_in_bytes`) and v2 (`memory.max`, `memory.peak`), created below this process's own
memory cgroup; needs write access there (root in a VM or container usually has it). Swap is not
limited: on a machine with swap, a process past the limit may be swapped instead of killed.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

_seq = itertools.count()


def _own_memory_cgroup() -> tuple[Path, int]:
    """(directory of this process's memory cgroup, cgroup version)."""
    unified = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1: a memory hierarchy of its own, preferred where present
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
        if hier == "0" and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
            unified = Path("/sys/fs/cgroup") / path.lstrip("/")
    if unified is None:
        raise OSError("no memory cgroup found for this process")
    return unified, 2


class MemoryCgroup:
    """A child memory cgroup with a limit in bytes; processes added to it (and their children) stay in it."""

    def __init__(self, limit_bytes: int):
        parent, self.version = _own_memory_cgroup()
        self.path = parent / f"faasmoe-bench-{os.getpid()}-{next(_seq)}"
        self.path.mkdir()
        self.limit = limit_bytes
        try:  # v2: memory.max exists only where the parent delegates the memory controller
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            else:
                (self.path / "memory.max").write_text(str(limit_bytes))
        except OSError:
            self.path.rmdir()
            raise

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int:
        """The most the cgroup's processes held at once since it was created, page cache included."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """Processes the kernel killed for passing the limit."""
        if self.version == 1:
            text = (self.path / "memory.oom_control").read_text()
        else:
            text = (self.path / "memory.events").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroup once its processes are gone (its page cache charges move to the parent)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)

"""The usual way, for comparison: one full model with every expert resident in the server's process.

`MonolithicEngine` is faasmoe's control plane with `ResidentExperts` in place of the
functions: the same math (exact against transformers, as the tests check), the same
step scheduler, so it batches all its running sequences at every step as a vLLM or
llama.cpp server does. It holds its own copy of every weight, as a server that loads a
checkpoint does, or (`paged`) maps them and lets the kernel read them on use and drop them
under memory pressure, as llama.cpp's default mmap does: the way a user would try to serve
a model larger than memory. `faasmoe serve --mode monolithic` serves it behind the same
API: one server per tenant is the benchmark's Baseline, one for all tenants its
shared-monolithic.
"""

from __future__ import annotations

import time
from pathlib import Path

from faasmoe.control.resident import ResidentExperts
from faasmoe.engines.base import BaseEngine


class MonolithicEngine(BaseEngine):
    def __init__(self, model: str | Path, dtype: str | None = None, threads: int | None = None,
                 paged: bool = False):
        t0 = time.perf_counter()
        super().__init__(model, dtype, threads)
        self.paged = paged
        self.experts = ResidentExperts(self.checkpoint, self.dtype, own_copy=not paged, paged=paged)
        control_plane = self.checkpoint.family.control_plane_class()
        self.control_plane = control_plane(self.checkpoint, self.dtype, self.experts, own_copy=not paged,
                                          pack=not paged)
        self.load_s = time.perf_counter() - t0

    def describe(self) -> dict:
        return {"engine": "monolithic (every expert " + ("mapped, paged by the kernel" if self.paged else "resident")
                + ", batched)"}

"""`one_row_mlp`: a function's one-token expert through `torch.compile` (inductor, generated C++ on CPU).

A decode step sends each function one token per sequence, and most of its experts get a single row: two
matrix-vector products over weights mapped from the page cache (row-major, too many to keep a packed copy
per host), with a few elementwise operations between. Eager torch runs those products slowly on some CPUs:
on a 2-core Zen 4 EPYC (AVX512-BF16), one thread, weights from memory, 704 x 512 bf16 took 188 us through
torch.mv and 110 through torch.mm, where a oneDNN-packed copy took 73. Inductor generates its own
matrix-vector loops, as fast as the packed copy over the row-major weights, and fuses the activation with
the product it feeds: a quarter-preset expert for one token, from the mapped checkpoint, 93-113 us against
eager's 336-408 (`torch.mv`), bit-equal. The control plane's own products already use packed weights; its
layer steps compiled the same way measured no faster and changed bf16 roundings, so they stay eager.

Compilation costs seconds per weight shape (6-10 s here with inductor's cache warm, 19 s cold), once per
process: the local platform's zygote compiles while the platform starts, and the hosts it forks inherit the
compiled code; a Ray host compiles in its actor. Inductor keeps fused intermediates in fp32 unless asked to round them as eager
does (`emulate_precision_casts`, set here). Where the compiler cannot run (no C++ compiler), the expert
falls back to eager, with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from faasmoe.models.layers import gated_mlp

log = logging.getLogger(__name__)
CACHE_DIR = Path.home() / ".cache" / "faasmoe" / "inductor"  # kept across reboots and TMPDIRs (the bench's)


class OneRowMLP:
    """`gated_mlp(x, gate_up, down)` with activation `act` for one row x [H], compiled; eager from the first call
    the compiled code fails and eager does not (a compiler that cannot run), with a warning."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]):
        self.eager = functools.partial(gated_mlp, act=act)
        self.compiled: Callable[..., torch.Tensor] | None = None
        try:
            import torch._inductor.config as inductor_config

            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
            inductor_config.emulate_precision_casts = True  # round fused bf16 intermediates as eager does
            inductor_config.compile_threads = 1  # no pool of compiler processes: the zygote compiles, then forks
            self.compiled = torch.compile(self.eager, fullgraph=True)
        except Exception as e:  # noqa: BLE001 - no compiler here: eager
            log.warning("torch.compile is not available, computing the experts eagerly: %s: %s", type(e).__name__, e)

    def __call__(self, x: torch.Tensor, gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 down: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.eager(x, gate_up, down)
        try:
            return self.compiled(x, gate_up, down)
        except Exception as e:  # noqa: BLE001 - eager's own errors raise from the line below, compiled stays on
            y = self.eager(x, gate_up, down)
            log.warning("torch.compile of the experts failed, computing them eagerly: %s: %s", type(e).__name__, e)
            self.compiled = None
            return y


@functools.cache
def one_row_mlp(act: Callable[[torch.Tensor], torch.Tensor]) -> OneRowMLP:
    """The process's `OneRowMLP` for activation `act` (one compilation per weight shape, shared by its functions)."""
    return OneRowMLP(act)

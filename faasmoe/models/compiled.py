"""`compiled_expert`: a function's one-token expert compiled by inductor (generated C++ on CPU).

A decode step sends each function one token per sequence, and most of its experts get a single row: two
matrix-vector products over weights mapped from the page cache (row-major, too many to keep a packed copy
per host), with a few elementwise operations between. Eager torch runs those products slowly on some CPUs:
on a 2-core Zen 4 EPYC (AVX512-BF16), one thread, weights from memory, 704 x 512 bf16 took 188 us through
torch.mv and 110 through torch.mm, where a oneDNN-packed copy took 73. Inductor generates its own
matrix-vector loops, as fast as the packed copy over the row-major weights, and fuses the activation with
the product it feeds: a quarter-preset expert for one token, from the mapped checkpoint, 93-113 us against
eager's 336-408 (`torch.mv`), bit-equal. The control plane's own products already use packed weights; its
layer steps compiled the same way measured no faster and changed bf16 roundings, so they stay eager.

Each expert is one compiled call that also applies its routing weight and adds the token's previous experts'
sum (`acc + down(act(gate(x)) * up(x)) * w`, rounded where eager rounds). The graph is traced with make_fx
and compiled with `torch._inductor.compile`, not `torch.compile`: dynamo's guards cost 10-45 us a call, as
much as the product of a small expert, and the weighting and the sum cost two eager operations more. On the
Zen 4, 24 groups of four mapped experts, medians of 8 interleaved passes: 403 us per four experts against
686 through `torch.compile` with eager weighting and sum, 90 against 124 for one. Without guards, each
compiled graph serves only the input layouts (shapes, strides, dtypes) it was traced with: they are its key.

Compilation costs seconds per layout, once per process: the local platform's zygote compiles while the
platform starts, and the hosts it forks inherit the compiled code; a Ray host compiles in its actor. The
generated code is specialised to the thread count it was compiled under (the zygote's one). Inductor keeps
fused intermediates in fp32 unless asked to round them as eager does (`emulate_precision_casts`). Where the
compiler cannot run (no C++ compiler), the experts fall back to eager, with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from faasmoe.models.layers import GateUp, gated_mlp

log = logging.getLogger(__name__)
CACHE_DIR = Path.home() / ".cache" / "faasmoe" / "inductor"  # kept across reboots and TMPDIRs (the bench's)
# round fused bf16 intermediates as eager does; no pool of compiler processes (the zygote compiles, then forks)
OPTIONS = {"emulate_precision_casts": True, "compile_threads": 1}


class CompiledExpert:
    """`acc + gated_mlp(x, gate_up, down, act) * w` for one row x [H], a routing weight w (0-d, x's dtype) and the
    sum so far acc [H] (None: the first expert), through one compiled graph per input layout; eager from the
    first call the compiled code fails and eager does not (a compiler that cannot run), with a warning."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]):
        self.act = act
        self.on = True
        self.graphs: dict[tuple, Callable[..., torch.Tensor]] = {}  # by (pair, accumulate, each input's layout)

    def __call__(self, x: torch.Tensor, gate_up: GateUp, down: torch.Tensor, w: torch.Tensor,
                 acc: torch.Tensor | None = None) -> torch.Tensor:
        if not self.on:
            return self.eager(x, gate_up, down, w, acc)
        pair = isinstance(gate_up, tuple)
        args = (x, *gate_up, down, w) if pair else (x, gate_up, down, w)
        if acc is not None:
            args += (acc,)
        try:
            key = (pair, acc is not None, *((a.shape, a.stride(), a.dtype) for a in args))
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = _compile(self._traced(pair, acc is not None), args)
            return graph(*args)
        except Exception as e:  # noqa: BLE001 - eager's own errors raise from the line below, compiled stays on
            y = self.eager(x, gate_up, down, w, acc)
            log.warning("the compiled experts failed, computing them eagerly: %s: %s", type(e).__name__, e)
            self.on = False
            return y

    def eager(self, x: torch.Tensor, gate_up: GateUp, down: torch.Tensor, w: torch.Tensor,
              acc: torch.Tensor | None = None) -> torch.Tensor:
        y = gated_mlp(x, gate_up, down, self.act) * w
        return y if acc is None else acc + y

    def _traced(self, pair: bool, accumulate: bool) -> Callable[..., torch.Tensor]:
        """What a graph computes: `eager`'s arithmetic on flat inputs, each product a matrix-vector product."""
        act = self.act

        def expert(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            k = 2 if pair else 1  # rest: the gate/up matrices, then down, w (and acc)
            y = gated_mlp(x, (rest[0], rest[1]) if pair else rest[0], rest[k], act, _mv) * rest[k + 1]
            return rest[k + 2] + y if accumulate else y

        return expert


def _mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a vector x: what the graphs trace (inductor generates its own loop for it, where
    `kernels.linear` would trace its CPU-dependent dispatch)."""
    return torch.mv(w, x)


def _compile(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
    """`fn` traced on `args` and compiled by inductor: valid for inputs of `args`' layouts only (no guards)."""
    import torch._inductor
    from torch.fx.experimental.proxy_tensor import make_fx

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
    with torch.inference_mode():
        return torch._inductor.compile(make_fx(fn)(*args), list(args), options=OPTIONS)


@functools.cache
def compiled_expert(act: Callable[[torch.Tensor], torch.Tensor]) -> CompiledExpert:
    """The process's `CompiledExpert` for activation `act` (its graphs shared by its functions)."""
    return CompiledExpert(act)

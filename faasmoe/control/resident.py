"""Every routed expert in this process: the monolithic model a user would otherwise deploy.

Same interface as `ExpertDispatcher` (`start` / `finish`), so the control plane, the
step scheduler and the server are the very same code; only the experts are computed
here, on the tensors (no frames), with the same per-expert math as a function holding
every expert of its layer (in bf16 its weights are packed, `kernels.pack`: oneDNN's layout, whose one-row
product rounds as F.linear's does where a function's `torch.mv` may differ in the last bit, or FBGEMM's fp16 on
CPUs without bf16 instructions, whose products differ from a function's bf16 ones in about 1 output in 10^4 by
one rounding step). This is the
Baseline of the benchmark: a full model that batches its running sequences at every step, as vLLM
or llama.cpp do.

Shapes: T = tokens, H = hidden, A = experts per token.
"""

from __future__ import annotations

import torch

from faasmoe.control.deployment import Deployment
from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.kernels import pack
from faasmoe.models.weights import parts, private_copy


def _own(w, threads: int):
    """A server's own copy of an expert's matrix (or (gate, up) pair): packed for `linear` on `threads` threads
    (`kernels.pack`) where that applies, a private copy where not."""
    if isinstance(w, tuple):
        return tuple(_own(t, threads) for t in w)
    packed = pack(w, threads)
    return packed if packed is not w else private_copy(w)


class ResidentExperts:
    """All routed experts of every MoE layer, loaded at start-up into this process's own memory."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, own_copy: bool = True, paged: bool = False):
        """`own_copy`: the weights copied into this process (as transformers loads them; in the layout `linear`
        multiplies fastest where it has one: `kernels.pack`); `paged` instead: mapped
        from the page cache and read on use, the kernel paging them in and out (a model served through mmap)."""
        self.layers: dict[int, ExpertFunction] = {}
        self.nbytes = 0  # the checkpoint's bytes of every expert (a packed copy's layout is the kernel library's)
        every_expert = Deployment.plan(ckpt, ckpt.num_experts, dtype)
        threads = torch.get_num_threads()  # the engine's
        for spec in every_expert.specs:  # one block per layer, holding every expert
            fn = ExpertFunction(spec, paged=paged)
            self.nbytes += sum(t.numel() * t.element_size() for w in (*fn.gate_up, *fn.down) for t in parts(w))
            if own_copy and not paged:  # a server's own weights (as transformers loads them), not pages shared
                fn.gate_up, fn.down = [_own(w, threads) for w in fn.gate_up], [_own(w, threads) for w in fn.down]
            self.layers[spec.layer] = fn
        self.digest = bytes.fromhex(ckpt.digest)

    two_batches = False  # the experts run inside `send`: nothing would compute while the control plane does

    def send(self, layer: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], experts/weights [T, A] -> [T, H], computed now (there is nothing to overlap with)."""
        T, A = experts.shape
        inv = wire.Invocation(self.digest, layer, 0, x, torch.arange(T, dtype=torch.int32).repeat_interleave(A),
                              experts.flatten().to(torch.int32), weights.flatten().to(torch.float32))
        return self.layers[layer].compute(inv)

    def combine(self, result: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        return result if shared is None else result + shared

    def discard(self, result: torch.Tensor) -> None:
        """Nothing is in flight."""

    def worth_prefetching(self, layer: int) -> bool:
        """Every expert is resident: nothing to warm."""
        return False

    def prefetch(self, layer: int, experts: torch.Tensor) -> None:
        """Every expert is resident: nothing to warm."""

"""A model's expert functions on a platform: how experts are packed, each function's spec, deploying and warming.

Every user of a model's functions (the engine, private-mode serving, packaging, the benchmarks) plans
them here, so that packing (a policy, not a constant), specs and function ids have one source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faasmoe.functions import wire
from faasmoe.functions.spec import FunctionSpec, function_specs
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.weights import torch_dtype
from faasmoe.platforms.base import Platform


def contiguous_blocks(num_experts: int, experts_per_function: int) -> list[list[int]]:
    """Experts 0..k-1 in block 0, k..2k-1 in block 1, ...; the last block may be smaller."""
    if not 1 <= experts_per_function <= num_experts:
        raise ValueError(f"experts_per_function must be between 1 and {num_experts}, got {experts_per_function}")
    k = experts_per_function
    return [list(range(s, min(s + k, num_experts))) for s in range(0, num_experts, k)]


def block_of_expert(blocks: list[list[int]], num_experts: int) -> torch.Tensor:
    """[E] long: the block holding each expert, the lookup the dispatcher routes with."""
    table = torch.full((num_experts,), -1, dtype=torch.long)
    for b, experts in enumerate(blocks):
        table[experts] = b
    if (table < 0).any():
        raise ValueError("every expert must belong to exactly one block")
    return table


def prewarm_calls(specs: list[FunctionSpec]) -> list[tuple[str, bytes]]:
    """One call per function with no routing pairs (the function answers zeros): enough to cold-start it."""
    calls = []
    for s in specs:
        empty = torch.zeros(0, dtype=torch.int32)
        inv = wire.Invocation(bytes.fromhex(s.model), s.layer, s.block,
                              torch.zeros(1, s.hidden_size, dtype=torch_dtype(s.dtype)), empty, empty, torch.zeros(0))
        calls.append((s.id, wire.encode_invocation(inv)))
    return calls


@dataclass(frozen=True)
class Deployment:
    """The functions of one checkpoint at k experts per function: blocks of experts and one spec per
    (MoE layer, block)."""

    checkpoint: Checkpoint
    experts_per_function: int
    dtype: str  # torch dtype name the functions compute in
    blocks: list[list[int]]
    specs: list[FunctionSpec]

    @classmethod
    def plan(cls, checkpoint: Checkpoint, experts_per_function: int,
             dtype: str | torch.dtype | None = None) -> "Deployment":
        """`dtype`: a name or a torch dtype (default: the checkpoint's)."""
        dtype = str(torch_dtype(str(dtype or checkpoint.dtype))).removeprefix("torch.")
        blocks = contiguous_blocks(checkpoint.num_experts, experts_per_function)
        return cls(checkpoint, experts_per_function, dtype, blocks, function_specs(checkpoint, blocks, dtype))

    def deploy(self, platform: Platform) -> None:
        """Register every function (no instance starts: they scale from zero)."""
        for spec in self.specs:
            platform.deploy(spec)
        platform.finish_deploy()

    def prewarm(self, platform: Platform) -> None:
        """Cold-start one instance of every function now, so the first request finds them warm."""
        platform.invoke_many(prewarm_calls(self.specs))

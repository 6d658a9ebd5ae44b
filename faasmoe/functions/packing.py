"""How the experts of a layer are packed into functions of k experts (a policy, not a constant)."""

from __future__ import annotations

import torch


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

"""One sequence's key/value cache, preallocated for its whole length (prompt + max tokens).

Shapes: L = layers, g = key/value heads, C = capacity (positions), d = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype):
        self.k = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype)  # [L, g, C, d]
        self.v = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype)
        self.length = 0  # positions filled by completed steps

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [g, t, d] at positions start.. and return all keys and values up to them, [g, S, d]."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"sequence of {end} positions exceeds its cache of {self.capacity}")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Chunk:
    """The new tokens of one sequence in a step, at positions start .. start+len-1."""

    cache: KVCache
    tokens: torch.Tensor  # [t] long
    start: int

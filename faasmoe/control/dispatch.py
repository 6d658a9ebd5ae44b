"""Route → group by function → invoke all at once → sum: the control plane's side of a MoE layer.

`start` sends one invocation per function that has tokens routed to it (split in calls
of at most `max_tokens_per_call` tokens: a function refuses larger frames) and returns
at once, so the caller computes the shared expert while the functions run;
`finish` waits and adds the functions' rows into one [T, H] output.

Shapes: T = tokens, H = hidden, A = experts per token, n = tokens sent to one function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from faasmoe.functions import wire
from faasmoe.functions.packing import block_of_expert
from faasmoe.functions.spec import function_id, max_tokens_per_call
from faasmoe.platforms.base import Platform


@dataclass
class DispatchStats:
    dispatches: int = 0  # MoE layer steps
    invocations: int = 0  # function calls
    tokens_sent: int = 0  # token rows sent, summed over calls
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0  # time the control plane blocked in `finish`
    per_layer: dict[int, int] = field(default_factory=dict)  # invocations per MoE layer


@dataclass
class Pending:
    batch: Any  # the platform's handle on the calls in flight
    rows: list[torch.Tensor]  # for each call, the token rows it covers (ascending)
    T: int
    H: int


class ExpertDispatcher:
    def __init__(self, platform: Platform, model: str, blocks: list[list[int]], num_experts: int,
                 dtype: torch.dtype, max_tokens: int | None = None):
        self.platform = platform
        self.max_tokens = max_tokens or max_tokens_per_call()
        self.model = model
        self.model_bytes = bytes.fromhex(model)
        self.block_of = block_of_expert(blocks, num_experts)  # [E]
        self.dtype = dtype
        self.stats = DispatchStats()
        self.last_calls: dict[int, list[tuple[str, bytes]]] = {}  # per layer, the calls of the latest dispatch
        self.num_blocks = len(blocks)
        self._fids: dict[int, list[str]] = {}  # per layer, the function id of each block

    def prefetch(self, layer: int, experts: torch.Tensor) -> None:
        """Warm the functions holding `experts` (a predicted routing of `layer`) that have no instance."""
        fids = self._fids.get(layer)
        if fids is None:
            fids = self._fids[layer] = [function_id(self.model, layer, b) for b in range(self.num_blocks)]
        hit = torch.unique(self.block_of[experts]).tolist()
        self.platform.warm([fids[b] for b in hit])

    def start(self, layer: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> Pending:
        """x [T, H] normalised hidden states, experts/weights [T, A] from the router."""
        T, A = experts.shape
        block = self.block_of[experts].flatten()  # [T*A], pair p is token p // A
        order = torch.argsort(block, stable=True)
        blocks, counts = torch.unique_consecutive(block[order], return_counts=True)
        token = order // A
        expert = experts.flatten()[order].to(torch.int32)
        weight = weights.flatten()[order].to(torch.float32)
        calls: list[tuple[str, bytes]] = []
        rows_of: list[torch.Tensor] = []
        s = 0
        cap = self.max_tokens
        for b, n in zip(blocks.tolist(), counts.tolist()):  # one call per function hit, never per token
            rows, local = torch.unique(token[s:s + n], return_inverse=True)  # rows [n_b], local [n], ascending
            cuts = torch.searchsorted(local, torch.arange(0, len(rows), cap)).tolist() + [n]  # pair ranges
            for first_row, lo, hi in zip(range(0, len(rows), cap), cuts, cuts[1:]):  # one range unless n_b > cap
                frame = wire.encode_invocation(wire.Invocation(
                    self.model_bytes, layer, b, x[rows[first_row:first_row + cap]],
                    (local[lo:hi] - first_row).to(torch.int32), expert[s + lo:s + hi], weight[s + lo:s + hi]))
                calls.append((function_id(self.model, layer, b), frame))
                rows_of.append(rows[first_row:first_row + cap])
            s += n
        self.last_calls[layer] = calls
        st = self.stats
        st.dispatches += 1
        st.invocations += len(calls)
        st.per_layer[layer] = st.per_layer.get(layer, 0) + len(calls)
        st.tokens_sent += sum(len(r) for r in rows_of)
        st.bytes_sent += sum(len(f) for _, f in calls)
        return Pending(self.platform.submit(calls), rows_of, T, x.shape[1])

    def finish(self, p: Pending) -> torch.Tensor:
        """[T, H]: the sum of every function's weighted expert outputs."""
        t0 = time.perf_counter()
        replies = self.platform.gather(p.batch)
        self.stats.wait_s += time.perf_counter() - t0
        out = torch.zeros(p.T, p.H, dtype=self.dtype)
        for rows, reply in zip(p.rows, replies):
            self.stats.bytes_received += len(reply)
            out.index_add_(0, rows, wire.decode_result(reply, self.dtype, len(rows), p.H))
        return out

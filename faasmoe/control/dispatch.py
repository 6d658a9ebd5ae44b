"""Route → group by function → invoke all at once → sum: the control plane's side of a MoE layer.

`send` sends one invocation per function that has tokens routed to it (split in calls
of at most `max_tokens_per_call` tokens: a function refuses larger frames) and returns
at once, so the caller computes the shared expert while the functions run;
`combine` waits and adds the functions' rows (then the shared expert's) into one [T, H] output.

Shapes: T = tokens, H = hidden, A = experts per token, n = tokens sent to one function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from faasmoe.control.deployment import block_of_expert
from faasmoe.functions import wire
from faasmoe.functions.spec import function_id, max_tokens_per_call
from faasmoe.platforms.base import Platform


@dataclass
class DispatchStats:
    dispatches: int = 0  # MoE layer steps
    tokens_sent: int = 0  # token rows sent, summed over calls
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0  # time the control plane blocked in `combine`


@dataclass
class Pending:
    batch: Any  # the platform's handle on the calls in flight
    rows: list[np.ndarray]  # for each call, the token rows it covers (ascending; read-only: may be shared)
    T: int
    H: int


class ExpertDispatcher:
    def __init__(self, platform: Platform, model_digest: str, blocks: list[list[int]], num_experts: int,
                 dtype: torch.dtype, max_tokens: int | None = None):
        self.platform = platform
        self.max_tokens = max_tokens or max_tokens_per_call()
        self.model_digest = model_digest  # names the checkpoint in function ids and frames
        self.digest = bytes.fromhex(model_digest)
        self.block_of = block_of_expert(blocks, num_experts).numpy()  # [E]
        self.dtype = dtype
        self.stats = DispatchStats()
        self.keep_calls = False  # keep each layer's latest calls in `last_calls` (for bench-engine)
        self.last_calls: dict[int, list[tuple[str, bytes]]] = {}
        self.num_blocks = len(blocks)
        self._fids: dict[int, list[str]] = {}  # per layer, the function id of each block
        self._rows: dict[tuple[int, type], np.ndarray] = {}  # `_pair_rows`' arrays
        # whether a control plane may keep two layers' calls in flight (`ControlPlane._layers_in_halves`)
        self.two_batches = platform.concurrent_batches() >= 2

    def _function_ids(self, layer: int) -> list[str]:
        fids = self._fids.get(layer)
        if fids is None:
            fids = self._fids[layer] = [function_id(self.model_digest, layer, b) for b in range(self.num_blocks)]
        return fids

    def worth_prefetching(self, layer: int) -> bool:
        """Whether any of the layer's functions has no instance (otherwise a prediction would warm nothing)."""
        return self.platform.any_cold(self._function_ids(layer))

    def prefetch(self, layer: int, experts: torch.Tensor) -> None:
        """Warm the functions holding `experts` (a predicted routing of `layer`) that have no instance."""
        fids = self._function_ids(layer)
        self.platform.warm([fids[b] for b in np.unique(self.block_of[experts.numpy()]).tolist()])

    def send(self, layer: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> Pending:
        """x [T, H] normalised hidden states, experts/weights [T, A] from the router.

        The bookkeeping is numpy on a few hundred pairs (a microsecond an op, where a torch op costs several);
        each frame is assembled from numpy buffers with one copy."""
        T, A = experts.shape
        H = x.shape[1]
        e = experts.numpy().reshape(-1)  # [T*A], pair p is token p // A
        block = self.block_of[e]
        xb = x.contiguous().view(torch.uint8).numpy()  # [T, H * itemsize]: rows copied as raw bytes
        weight = np.ascontiguousarray(weights.to(torch.float32).numpy().reshape(-1))  # a frame takes it as bytes
        fids = self._function_ids(layer)
        if T == 1:  # one token (a single sequence's decode step): its A pairs grouped by block in a loop, as the
            # paths below would (blocks ascending, pairs in routing order), without their array operations
            by_block: dict[int, list[int]] = {}
            for p, b in enumerate(block.tolist()):
                by_block.setdefault(b, []).append(p)
            expert = e.astype(np.int32)
            zeros, row = self._pair_rows(1, A, np.int32), self._pair_rows(1, 1, np.int64)
            calls = [(fids[b], wire.encode_invocation_raw(self.digest, layer, b, self.dtype, 1, H, xb, zeros[:len(ps)],
                                                          expert[ps], weight[ps])) for b, ps in sorted(by_block.items())]
            return self._submit(layer, calls, [row] * len(calls), T, H)
        if T <= self.max_tokens and (block == block[0]).all():  # one function (k = every expert): one call of
            # every row, the pairs in token order as they come: no grouping to do
            b = int(block[0])
            return self._submit(layer, [(fids[b], wire.encode_invocation_raw(
                self.digest, layer, b, self.dtype, T, H, xb, self._pair_rows(T, A, np.int32), e.astype(np.int32),
                weight))], [self._pair_rows(T, 1, np.int64)], T, H)
        order = np.argsort(block, kind="stable")  # by block, then by token
        block = block[order]
        token = order // A
        expert = e[order].astype(np.int32)
        weight = weight[order]
        # a pair starts a new row of its call where its block or its token changes (tokens ascend within a
        # block): every call's rows and each pair's row in its call in a fixed number of array operations
        first = np.empty(len(order), dtype=bool)
        first[0] = True
        np.not_equal(token[1:], token[:-1], out=first[1:])
        boundary = block[1:] != block[:-1]
        first[1:] |= boundary
        row = np.cumsum(first, dtype=np.int32) - 1  # each pair's row, counted over the layer's calls
        cuts = (np.flatnonzero(boundary) + 1).tolist()
        los, his = [0, *cuts], [*cuts, len(order)]
        rows = token[first]  # [R]: each call's rows back to back
        n = (row[np.subtract(his, 1)] - row[los] + 1).tolist()  # rows per function hit
        if max(n) <= self.max_tokens:  # one call per function hit, never per token, each from slices of arrays
            # built for all calls at once
            xr = xb[rows]  # [R, H * itemsize]: every call's rows, one copy
            local = row - np.repeat(row[los], np.subtract(his, los))  # each pair's row within its call
            calls, rows_of, r0 = [], [], 0
            for lo, hi, m in zip(los, his, n):
                b = int(block[lo])
                calls.append((fids[b], wire.encode_invocation_raw(self.digest, layer, b, self.dtype, m, H,
                                                                  xr[r0:r0 + m], local[lo:hi], expert[lo:hi],
                                                                  weight[lo:hi])))
                rows_of.append(rows[r0:r0 + m])
                r0 += m
            return self._submit(layer, calls, rows_of, T, H)
        calls, rows_of = [], []
        cap = self.max_tokens
        for lo, hi in zip(los, his):  # a function with more rows than a call takes: split in several calls
            b = int(block[lo])
            rows = token[lo:hi][first[lo:hi]]  # [n_b] ascending: the tokens this function gets
            local = row[lo:hi] - row[lo]  # [n] each pair's row within the call
            bounds = [*np.searchsorted(local, np.arange(0, len(rows), cap)).tolist(), hi - lo]
            for start, (p0, p1) in zip(range(0, len(rows), cap), zip(bounds, bounds[1:])):
                r = rows[start:start + cap]
                calls.append((fids[b], wire.encode_invocation_raw(
                    self.digest, layer, b, self.dtype, len(r), H, xb if len(r) == T else xb[r],
                    local[p0:p1] - start, expert[lo + p0:lo + p1], weight[lo + p0:lo + p1])))
                rows_of.append(r)
        return self._submit(layer, calls, rows_of, T, H)

    def _pair_rows(self, T: int, per_row: int, dtype: type) -> np.ndarray:
        """[T * per_row]: each pair's row when every row has per_row pairs in order (0, 0, .., 1, 1, ..). A prefix
        of one array per (per_row, dtype), grown as T grows (never written: frames copy it, `Pending.rows` is
        only read)."""
        rows = self._rows.get((per_row, dtype))
        if rows is None or len(rows) < T * per_row:
            n = max(T, 2 * len(rows) // per_row if rows is not None else 16)
            rows = self._rows[(per_row, dtype)] = np.repeat(np.arange(n, dtype=dtype), per_row)
        return rows[:T * per_row]

    def _submit(self, layer: int, calls: list[tuple[str, bytes]], rows_of: list[np.ndarray], T: int,
                H: int) -> Pending:
        if self.keep_calls:
            self.last_calls[layer] = calls
        st = self.stats
        st.dispatches += 1
        st.tokens_sent += sum(len(r) for r in rows_of)
        st.bytes_sent += sum(len(f) for _, f in calls)
        return Pending(self.platform.submit(calls), rows_of, T, H)

    def discard(self, p: Pending) -> None:
        """Wait for calls whose results are no longer wanted (a step that failed), so that what they hold is
        released; their errors are not this caller's."""
        try:
            self.platform.gather(p.batch)
        except Exception:  # noqa: BLE001 - the step has already failed with its own error
            pass

    def combine(self, p: Pending, shared: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H]: the sum of every function's weighted expert outputs, in call order, then `shared` (the shared
        expert's output, where the layer has one) added last, as transformers adds it."""
        t0 = time.perf_counter()
        replies = self.platform.gather(p.batch)
        self.stats.wait_s += time.perf_counter() - t0
        out, owned = None, False  # a reply is only read, never written: it may be read-only or its platform's
        for rows, reply in zip(p.rows, replies):
            self.stats.bytes_received += len(reply)
            y = wire.decode_result(reply, self.dtype, len(rows), p.H)
            if len(rows) == p.T:  # every row, in order: the first such reply starts the sum (0 + y is y, up to a
                # zero's sign)
                if out is None:
                    out = y
                elif owned:
                    out.add_(y)
                else:
                    out, owned = out + y, True
                continue
            if out is None:
                out, owned = torch.zeros(p.T, p.H, dtype=self.dtype), True
            elif not owned:
                out, owned = out.clone(), True
            out.index_add_(0, torch.from_numpy(rows), y)
        if shared is not None:
            return out.add_(shared) if owned else out + shared
        return out if owned else out.clone()

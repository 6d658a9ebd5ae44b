"""The expert function: one (layer, block of k experts), stateless, platform-agnostic.

Its whole contract is `handle(frame: bytes) -> bytes` (wire format in, wire format
out). It knows nothing of the platform that runs it: the embedded platform's hosts (forked,
or Ray actors) and the packaged HTTP handler all wrap this same class.

Shapes: T = tokens sent to this function, H = hidden size, I = expert
intermediate size, P = routing pairs, k = experts in the block.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from faasmoe.functions import wire
from faasmoe.functions.spec import FunctionSpec
from faasmoe.models.layers import activation, gated_mlp
from faasmoe.models.weights import map_stacked, scale_groups, torch_dtype, with_scales


WARM_ROWS = 512  # row counts warmed up before forking (larger calls are rare: long prompts' prefill)


# per dtype: the integer type of its bits, the mask without the sign, and the exponent that NaN and inf have
_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000), torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
         torch.float16: (torch.int16, 0x7FFF, 0x7C00)}
_F32, _U32 = struct.Struct("<f"), struct.Struct("<I")


def _bits(t: torch.Tensor) -> np.ndarray:
    """The elements' bits as integers, what a result frame carries (a view of a contiguous tensor)."""
    return (t if t.is_contiguous() else t.contiguous()).view(_BITS[t.dtype][0]).numpy()


def _finite_bits(bits: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether every element is finite: none has its exponent bits all ones (NaN and inf do). Two numpy operations
    on the bits the frame carries anyway, where a tensor reduction costs several times as much in a host."""
    _, magnitude, exponent = _BITS[dtype]
    return not bits.size or int((bits & magnitude).max()) < exponent


def _bf16(x: float) -> float:
    """x (a float32 value) rounded to the nearest bf16, ties to even, as torch's conversion rounds it: the routing
    weight as transformers applies it. Plain Python: for the few pairs of a one-token call, several times cheaper
    than a tensor's conversion."""
    (u,) = _U32.unpack(_F32.pack(x))
    if u & 0x7F800000 == 0x7F800000:  # inf and NaN stay as they are
        return x
    return _F32.unpack(_U32.pack((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000))[0]


class ExpertFunction:
    def __init__(self, spec: FunctionSpec, paged: bool = False, compiled: bool = False):
        """`paged`: map the weights without reading them (pages read on use and dropped under memory pressure
        by the kernel: a monolithic model served through mmap), instead of loading them now.
        `compiled`: the experts that get one token through code compiled by inductor (`faasmoe.models.compiled`;
        not for int8 weights), compiled in this process on first use (`warm_up` compiles what a decode step uses;
        the local platform's zygote runs it before forking hosts)."""
        self.spec = spec
        self.dtype = torch_dtype(spec.dtype)
        self.digest = bytes.fromhex(spec.model)  # the checkpoint's, as frames carry it
        self.act = activation(spec.hidden_act)
        # cold start: only this block's bytes, listed per expert as gate, up, down (whatever the family calls
        # them); gate and up as one [2I, H] matrix (one matmul), mapped as one where the checkpoint stores them
        # back to back (gate_proj, up_proj in name order do; Mixtral's w1, w2, w3 do not: two matmuls then)
        # int8 experts (`faasmoe.models.quantize`): each matrix's scales follow, in the same order
        k = len(spec.experts)
        if len(spec.tensors) not in (3 * k, 6 * k):
            raise ValueError(f"{spec.id}: {len(spec.tensors)} tensors for {k} experts, not 3 (or 6 in int8) each")
        matrices = spec.tensors[:3 * k]
        gate, up, down = matrices[0::3], matrices[1::3], matrices[2::3]
        groups = ({f"{e}.gate_up": [g, u] for e, g, u in zip(spec.experts, gate, up)} |
                  {f"{e}.down": [d] for e, d in zip(spec.experts, down)})
        groups |= scale_groups(groups, {m.name: s for m, s in zip(matrices, spec.tensors[3 * k:])})
        w = with_scales(map_stacked(groups, self.dtype, concatenate=False, paged=paged))
        self.gate_up = [w[f"{e}.gate_up"] for e in spec.experts]  # k x [2I, H] (or k x (gate, up) [I, H])
        self.down = [w[f"{e}.down"] for e in spec.experts]  # k x [H, I]
        self._compiled = None  # one-token experts through `faasmoe.models.compiled` (int8 weights stay eager)
        if compiled and isinstance(self.down[0], torch.Tensor):
            from faasmoe.models.compiled import compiled_expert

            self._compiled = compiled_expert(self.act)
        # expert id -> position in this block, -1 for experts of other blocks
        self.local = np.full(max(spec.experts) + 1, -1, dtype=np.int64)
        self.local[list(spec.experts)] = np.arange(len(spec.experts))

    @property
    def _compiling(self) -> bool:
        """Whether one-token experts run compiled code (not after a compiler failure: eager's own path is cheaper)."""
        return self._compiled is not None and self._compiled.on

    def compute(self, inv: wire.Invocation) -> torch.Tensor:
        """[T, H]: for each token, the routing-weighted sum of its experts' outputs in this block."""
        out = self._compute(inv.hidden, inv.token.numpy(), self.local[inv.expert.numpy()], inv.weight.numpy())
        return out.view(inv.hidden.shape)

    def _compute(self, x: torch.Tensor, token: np.ndarray, local: np.ndarray, weight: np.ndarray) -> torch.Tensor:
        """`compute` on hidden states x [T, H] and the pairs' tokens, positions in this block and weights [P]; for one
        token with pairs here, a vector [H] (`_one_token`'s: no dimension added to be dropped).

        The bookkeeping is numpy (a microsecond an op on a few pairs, where a torch op costs several); the
        math is torch. A loop over the (at most k) experts of the block, never over tokens, in ascending
        expert order as in transformers."""
        T = x.shape[0]
        if not len(local):
            return torch.zeros_like(x)
        if T == 1:
            return self._one_token(x[0], local, weight)
        out = torch.zeros_like(x)
        order = np.argsort(local, kind="stable")
        counts = np.bincount(local, minlength=len(self.down))
        tok = token[order]  # [P], ascending within each expert
        tokens = tok.tolist()
        weight = torch.from_numpy(weight[order]).to(x.dtype)[:, None]  # [P, 1]
        ends = np.cumsum(counts).tolist()
        all_rows = np.arange(T)
        xs = outs = ws = None  # views of each row, each row's sum and each pair's weight, made on first use
        for j in np.flatnonzero(counts).tolist():
            lo, hi = ends[j] - counts[j], ends[j]
            if hi - lo == 1:  # one token (most of a decode step's pairs): a view in, one row added out
                if xs is None:  # one operation each for every row, where indexing costs one a pair
                    xs, outs, ws = x.unbind(), out.unbind(), weight.view(-1).unbind()
                r = tokens[lo]
                if self._compiling:
                    outs[r].add_(self._compiled(xs[r], self.gate_up[j], self.down[j], ws[lo]))
                else:
                    outs[r].add_(gated_mlp(xs[r], self.gate_up[j], self.down[j], self.act) * ws[lo])
                continue
            every_row = hi - lo == T and bool((tok[lo:hi] == all_rows).all())  # rows 0..T-1 once each, in order
            rows = None if every_row else torch.from_numpy(tok[lo:hi].astype(np.int64))
            h = x if every_row else x.index_select(0, rows)  # [n, H]
            y = gated_mlp(h, self.gate_up[j], self.down[j], self.act) * weight[lo:hi]  # [n, H]
            if every_row:
                out.add_(y)
            else:
                out.index_add_(0, rows, y)
        return out

    def _one_token(self, x: torch.Tensor, local: np.ndarray, weight: np.ndarray) -> torch.Tensor:
        """[H]: `_compute` for one token x [H] (a single sequence's decode step) and its P >= 1 pairs here, in
        ascending expert order: each expert a matrix-vector product on the row as a vector, its routing weight
        rounded to the model's dtype first, as transformers applies it, and the first expert's output the sum's
        start (0 + y is y, the sign of a zero aside). Eager: the weights rounded in plain Python (bf16) and seven
        torch operations an expert; compiled: one call an expert, which weights and sums too."""
        order = [0] if len(local) == 1 else np.argsort(local, kind="stable").tolist()
        if self._compiling:
            ws = torch.tensor(weight, dtype=x.dtype).unbind()  # 0-d each (a copy: the frame's array is read-only)
            out = None
            for p in order:
                j = local[p]
                out = self._compiled(x, self.gate_up[j], self.down[j], ws[p], out)
            return out
        w = ([_bf16(v) for v in weight.tolist()] if x.dtype == torch.bfloat16 else weight.tolist()
             if x.dtype == torch.float32 else torch.tensor(weight).to(x.dtype).tolist())  # [P]
        out = None
        for p in order:
            j = local[p]
            y = gated_mlp(x, self.gate_up[j], self.down[j], self.act).mul_(w[p])
            out = y if out is None else out.add_(y)
        return out

    def warm_up(self, max_rows: int = WARM_ROWS) -> None:
        """Run every kernel once for each row count `linear` pads to, up to max_rows, both with every row routed to
        an expert and with some. One expert is enough (every expert of a function has its shape): all of them took
        5.2 s at k = 60 on real-size layers. On a function made with `paged=True` only that expert's pages are
        read.

        Kernels are compiled and cached on first use, per shape, and the allocator grows around them. The
        zygote calls this once per function shape before forking, so its instances share one copy of all that
        (copy-on-write) instead of each building its own: measured on the quarter preset, an instance's own
        memory after 300 varied calls went from 18 to 10 MB, for 0.1 s of the zygote's time once per shape. The zygote
        warms them on one thread (a fork-safe OpenMP state), so hosts with more threads build their own. With
        compiled experts it compiles the graphs one-token calls use too (`_compile_one_token_calls`)."""
        H = self.spec.hidden_size
        n = 1
        while n <= max_rows:
            for every_row in (True, False):
                T = n if every_row else 2 * n
                token = torch.arange(n, dtype=torch.int32)  # one expert: its kernels are every expert's
                expert = torch.full((n,), self.spec.experts[0], dtype=torch.int32)
                inv = wire.Invocation(self.digest, self.spec.layer, self.spec.block,
                                      torch.zeros(T, H, dtype=self.dtype), token, expert,
                                      torch.ones(token.numel(), dtype=torch.float32))
                with torch.inference_mode():
                    self.compute(inv)
            n *= 2
        if self._compiling:
            self._compile_one_token_calls()

    def _compile_one_token_calls(self) -> None:
        """Compile the graphs a one-token call can use: an expert alone and one added to a sum, for gate and up
        stacked and as a pair. The zygote warms one function per shape, and any function of a stacked family may
        hold a pair (a shard boundary between an expert's gate and up), so the pair's graphs are compiled from
        views of a stacked matrix too (a real pair's layout: two contiguous [I, H] matrices)."""
        down, I = self.down[0], self.down[0].shape[1]
        stacked = next((gu for gu in self.gate_up if not isinstance(gu, tuple)), None)
        pair = next((gu for gu in self.gate_up if isinstance(gu, tuple)), None)
        if pair is None:
            pair = (stacked[:I], stacked[I:])
        layouts = [pair] if stacked is None else [stacked, pair]  # a pair family (Mixtral's w1, w3) never stacks
        x, w = torch.zeros(self.spec.hidden_size, dtype=self.dtype), torch.ones((), dtype=self.dtype)
        with torch.inference_mode():
            for gu in layouts:
                self._compiled(x, gu, down, w, self._compiled(x, gu, down, w))  # alone, then added to a sum

    def check(self, h: wire.Header, expert: np.ndarray) -> np.ndarray:
        """The frame (header `h`, routing pairs' experts) is for this function and names only this block's experts:
        their positions in the block [P]. Input values are checked only when the output is not finite (see
        `diagnose`)."""
        s = self.spec
        if h.model != self.digest:
            raise wire.WireError(f"frame is for model {h.model.hex()}, this function serves {s.model}")
        if (h.layer, h.block) != (s.layer, s.block):
            raise wire.WireError(f"frame is for layer {h.layer} block {h.block}, this function is "
                                 f"layer {s.layer} block {s.block}")
        if h.dtype != self.dtype or h.H != s.hidden_size:
            raise wire.WireError(f"hidden states are {h.dtype} with H={h.H}, this "
                                 f"function expects {self.dtype} with H={s.hidden_size}")
        if not len(expert):
            return expert.astype(np.int64)
        lo, hi = wire.span(expert)
        if lo < 0 or hi >= len(self.local) or wire.span(local := self.local[expert])[0] < 0:
            raise wire.WireError(f"routing pair names an expert outside this block {list(s.experts)}")
        return local

    @staticmethod
    def diagnose(hidden: torch.Tensor, weight: np.ndarray) -> str:
        """Why an output is not finite."""
        if not (bool(torch.isfinite(hidden).all()) and bool(np.isfinite(weight).all())):
            return "hidden states or routing weights contain NaN or inf"
        return "the experts' output is not finite (inputs out of any sane range)"

    def handle(self, frame: bytes | bytearray | memoryview) -> bytes:
        """One invocation: a result frame, or an error frame saying what was wrong with the input."""
        try:
            h, hidden, token, expert, weight = wire.decode_invocation_parts(frame)
            local = self.check(h, expert)
            with torch.inference_mode():
                out = (self._one_token(hidden, local, weight) if h.T == 1 and len(local) else
                       self._compute(hidden.view(h.T, h.H), token, local, weight))
            bits = _bits(out)
            if not _finite_bits(bits, out.dtype):  # never send NaN or inf on: say what was wrong instead
                raise wire.WireError(self.diagnose(hidden, weight))
            return wire.encode_result_raw(self.digest, self.spec.layer, self.spec.block, out.dtype, h.T, h.H, bits)
        except wire.WireError as e:
            return wire.encode_error(f"{self.spec.id}: bad invocation: {e}", self.digest, self.spec.layer,
                                     self.spec.block)
        except Exception as e:  # a bug must reach the caller as an error, not kill the instance
            return wire.encode_error(f"{self.spec.id}: {type(e).__name__}: {e}", self.digest, self.spec.layer,
                                     self.spec.block)

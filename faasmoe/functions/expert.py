"""The expert function: one (layer, block of k experts), stateless, platform-agnostic.

Its whole contract is `handle(frame: bytes) -> bytes` (wire format in, wire format
out). It knows nothing of the platform that runs it: the embedded platform, Ray
Serve and the packaged HTTP handler all wrap this same class.

Shapes: T = tokens sent to this function, H = hidden size, I = expert
intermediate size, P = routing pairs, k = experts in the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faasmoe.checkpoint import expert_key
from faasmoe.functions import wire
from faasmoe.functions.spec import FunctionSpec
from faasmoe.weights import map_tensors, torch_dtype


# Activations by their transformers config name (transformers itself is not imported: it costs seconds per cold start).
ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ExpertFunction:
    def __init__(self, spec: FunctionSpec):
        self.spec = spec
        self.dtype = torch_dtype(spec.dtype)
        self.model = bytes.fromhex(spec.model)
        self.act = activation(spec.hidden_act)
        w = map_tensors(spec.tensors, self.dtype)  # cold start: only this block's bytes
        L = spec.layer
        self.gate = [w[expert_key(L, e, "gate_proj")] for e in spec.experts]  # k x [I, H]
        self.up = [w[expert_key(L, e, "up_proj")] for e in spec.experts]  # k x [I, H]
        self.down = [w[expert_key(L, e, "down_proj")] for e in spec.experts]  # k x [H, I]
        # expert id -> position in this block, -1 for experts of other blocks
        n = max(spec.experts) + 1
        self.local = torch.full((n,), -1, dtype=torch.long)
        self.local[list(spec.experts)] = torch.arange(len(spec.experts))

    def compute(self, inv: wire.Invocation) -> torch.Tensor:
        """[T, H]: for each token, the routing-weighted sum of its experts' outputs in this block."""
        x = inv.hidden  # [T, H]
        out = torch.zeros_like(x)
        local = self.local[inv.expert.long()]  # [P]
        order = torch.argsort(local, stable=True)
        start = 0
        # A loop over the (at most k) experts of the block, never over tokens; ascending expert order as in transformers.
        for j, n in enumerate(torch.bincount(local, minlength=len(self.gate)).tolist()):
            if n == 0:
                continue
            sel = order[start:start + n]
            start += n
            tok = inv.token[sel].long()  # [n]
            h = x[tok]  # [n, H]
            y = F.linear(self.act(F.linear(h, self.gate[j])) * F.linear(h, self.up[j]), self.down[j])  # [n, H]
            out.index_add_(0, tok, y * inv.weight[sel, None].to(x.dtype))
        return out

    def check(self, inv: wire.Invocation) -> None:
        s = self.spec
        if inv.model != self.model:
            raise wire.WireError(f"frame is for model {inv.model.hex()}, this function serves {s.model}")
        if (inv.layer, inv.block) != (s.layer, s.block):
            raise wire.WireError(f"frame is for layer {inv.layer} block {inv.block}, this function is "
                                 f"layer {s.layer} block {s.block}")
        if inv.hidden.dtype != self.dtype or inv.hidden.shape[1] != s.hidden_size:
            raise wire.WireError(f"hidden states are {inv.hidden.dtype} with H={inv.hidden.shape[1]}, this "
                                 f"function expects {self.dtype} with H={s.hidden_size}")
        if inv.expert.numel():
            e = inv.expert.long()
            if int(e.min()) < 0 or int(e.max()) >= self.local.numel() or bool((self.local[e] < 0).any()):
                raise wire.WireError(f"routing pair names an expert outside this block {list(s.experts)}")
        if not (bool(torch.isfinite(inv.hidden).all()) and bool(torch.isfinite(inv.weight).all())):
            raise wire.WireError("hidden states or routing weights contain NaN or inf")

    def handle(self, frame: bytes | bytearray | memoryview) -> bytes:
        """One invocation: a result frame, or an error frame saying what was wrong with the input."""
        try:
            inv = wire.decode_invocation(frame)
            self.check(inv)
            with torch.inference_mode():
                out = self.compute(inv)
            if not bool(torch.isfinite(out).all()):  # finite but absurd inputs can overflow: say so, send no NaN
                raise wire.WireError("the experts' output is not finite (inputs out of any sane range)")
            return wire.encode_result(self.model, self.spec.layer, self.spec.block, out)
        except wire.WireError as e:
            return wire.encode_error(f"{self.spec.id}: bad invocation: {e}", self.model, self.spec.layer,
                                     self.spec.block)
        except Exception as e:  # a bug must reach the caller as an error, not kill the instance
            return wire.encode_error(f"{self.spec.id}: {type(e).__name__}: {e}", self.model, self.spec.layer,
                                     self.spec.block)

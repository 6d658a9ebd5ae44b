"""Building blocks every MoE family shares: norms, rotary embeddings, attention masks, gated MLPs.

Both planes use them: the control plane (attention, shared experts, dense layers) and the expert
functions (routed experts), so they live here rather than in either. Nothing here imports
transformers, which costs seconds per function cold start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from faasmoe.models.kernels import linear


# Activations by their transformers config name (transformers itself is not imported: it costs seconds per cold start).
ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


GateUp = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def gated_mlp(x: torch.Tensor, gate_up: GateUp, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
              product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = linear) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for x [n, H] (or one row as a vector [H]), gate and up stacked as one [2I, H]
    matrix (one matmul; a (gate, up) pair where the checkpoint does not store them adjacent), down [H, I]: the
    MLP of a routed expert, of the shared expert and of a dense layer alike. `product(x, w)`: x @ w.T (the
    compiled experts trace it as a matrix-vector product)."""
    if isinstance(gate_up, tuple):
        return product(act(product(x, gate_up[0])) * product(x, gate_up[1]), down)
    gate, up = product(x, gate_up).split(down.shape[1], dim=-1)  # [n, I] each
    return product(act(gate) * up, down)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, round to the model dtype, then scale by the weight. torch's
    rms_norm computes a 16-bit input in fp32 and rounds its result back itself (two conversions fewer than doing
    so around it); given the weight it would scale before rounding, which is not transformers' bf16 result."""
    return w * F.rms_norm(x, x.shape[-1:], eps=eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, as transformers computes them."""
    params = dict(config.rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_type {rope_type!r} (length-dependent) is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")



def attention_mask(t: int, start: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
    """Attention mask for t new queries at positions start.. over start+t keys (None where sdpa needs none)."""
    S = start + t
    if window is None or S <= window:
        if t == 1:
            return None, False
        if start == 0:
            return None, True
    q_pos = torch.arange(start, S)[:, None]
    k_pos = torch.arange(S)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed, False

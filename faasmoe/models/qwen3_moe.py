"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): transformers' `Qwen3MoeForCausalLM`.

Per-head RMSNorm of queries and keys before the rotary embedding, no shared expert,
`norm_topk_prob`, MoE layers chosen by `decoder_sparse_step` and `mlp_only_layers`, and
(with `use_sliding_window`) a sliding window on every layer.
"""

from __future__ import annotations

import torch

from faasmoe.models import control_plane
from faasmoe.models.family import Family
from faasmoe.models.kernels import linear
from faasmoe.models.layers import rms_norm
from faasmoe.models.qwen2_moe import Qwen2Moe


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
    qk_norm = "head"
    biased_o_proj = True

    is_moe_layer = Qwen2Moe.is_moe_layer  # transformers' Qwen3MoeDecoderLayer has Qwen2-MoE's rule

    def sliding_window(self, layer: int) -> int | None:
        return self.config.sliding_window  # None unless use_sliding_window


class ControlPlane(control_plane.ControlPlane):
    def qkv(self, attn: control_plane.Attention, x: torch.Tensor) -> torch.Tensor:
        h, g = self.h, self.g
        qkv = linear(x, attn.wqkv, attn.bqkv).view(x.shape[0], h + 2 * g, self.d)
        return torch.cat([rms_norm(qkv[:, :h], attn.q_norm, self.eps), rms_norm(qkv[:, h:h + g], attn.k_norm, self.eps),
                          qkv[:, h + g:]], dim=1)

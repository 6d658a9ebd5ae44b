"""OLMoE (OLMoE-1B-7B): transformers' `OlmoeForCausalLM`.

RMSNorm over the whole query and key projections (not per head), optional clipping of
q, k and v (`clip_qkv`), every layer MoE (64 experts, top-8, no renormalisation), no
shared expert.
"""

from __future__ import annotations

import torch

from faasmoe.models import control_plane
from faasmoe.models.family import Family
from faasmoe.models.kernels import linear
from faasmoe.models.layers import rms_norm


class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    config_class = "OlmoeConfig"
    qk_norm = "full"
    biased_o_proj = True

    @property
    def expert_width(self) -> int:
        return self.config.intermediate_size


class ControlPlane(control_plane.ControlPlane):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = self.config.clip_qkv

    def qkv(self, attn: control_plane.Attention, x: torch.Tensor) -> torch.Tensor:
        q_width, k_width = self.h * self.d, self.g * self.d
        qkv = linear(x, attn.wqkv, attn.bqkv)
        q = rms_norm(qkv[:, :q_width], attn.q_norm, self.eps)
        k = rms_norm(qkv[:, q_width:q_width + k_width], attn.k_norm, self.eps)
        qkv = torch.cat([q, k, qkv[:, q_width + k_width:]], dim=1)
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        return qkv.view(x.shape[0], self.h + 2 * self.g, self.d)

"""Mixtral (Mixtral-8x7B, 8x22B): transformers' `MixtralForCausalLM`.

Every layer is MoE: 8 experts, top-2, softmax over the experts then renormalised over the
chosen ones; no shared expert; an optional sliding window on every layer. The original
checkpoints name the experts `block_sparse_moe.experts.E.w1` (gate), `w3` (up), `w2` (down).
"""

from __future__ import annotations

from faasmoe.models import control_plane
from faasmoe.models.family import Family


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = "MixtralConfig"
    moe_module = "block_sparse_moe"
    expert_projs = ("w1", "w3", "w2")

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def expert_width(self) -> int:
        return self.config.intermediate_size

    @property
    def norm_topk(self) -> bool:
        return True  # softmax over the experts, then over the chosen ones

    def sliding_window(self, layer: int) -> int | None:
        return self.config.sliding_window


ControlPlane = control_plane.ControlPlane  # nothing differs but the layout

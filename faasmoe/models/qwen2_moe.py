"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): transformers' `Qwen2MoeForCausalLM`.

Attention with q/k/v biases, sliding-window layers by `layer_types`, MoE layers chosen by
`decoder_sparse_step` and `mlp_only_layers`, a shared expert behind a sigmoid gate.
"""

from __future__ import annotations

import torch

from faasmoe.models import control_plane
from faasmoe.models.family import Family


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    config_class = "Qwen2MoeConfig"
    shared_expert = "shared_expert"

    @property
    def qkv_bias(self) -> bool:
        return bool(self.config.qkv_bias)

    def is_moe_layer(self, layer: int) -> bool:
        """Same rule as transformers' Qwen2MoeDecoderLayer."""
        c = self.config
        return layer not in c.mlp_only_layers and c.num_experts > 0 and (layer + 1) % c.decoder_sparse_step == 0

    def sliding_window(self, layer: int) -> int | None:
        c = self.config
        types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        return c.sliding_window if types[layer] == "sliding_attention" and c.sliding_window else None

    def shared_expert_width(self) -> int:
        return self.config.shared_expert_intermediate_size

    def moe_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        shapes = super().moe_shapes(layer)
        return {**{k: v for k, v in shapes.items() if ".experts." not in k},
                f"model.layers.{layer}.mlp.shared_expert_gate.weight": (1, self.config.hidden_size),
                **{k: v for k, v in shapes.items() if ".experts." in k}}


class ControlPlane(control_plane.ControlPlane):
    def load_moe(self, layer: int, into: control_plane.Layer, w: dict[str, torch.Tensor]) -> None:
        into.shared_gate = w[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]


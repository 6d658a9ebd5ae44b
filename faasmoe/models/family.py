"""What a family's checkpoint holds: tensor names and shapes, which layers are MoE, the experts' tensors.

Checkpoint reading, validation, random presets and expert functions need only this layout, never a
control plane. The defaults are the layout most families share (Llama-style attention, a router at
`mlp.gate` and experts at `mlp.experts.E.{gate,up,down}_proj`); each family's module subclasses it
for what differs.
"""

from __future__ import annotations

import importlib
from typing import Any


class Family:
    model_type = ""  # config.json's model_type
    architecture = ""  # transformers' model class, as config.json's `architectures` names it
    config_class = ""  # transformers' config class
    moe_module = "mlp"  # the module holding the router (`gate`) and the experts
    expert_projs = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up and down projections
    shared_expert: str | None = None  # the shared expert MLP's module inside moe_module, if the family has one
    qk_norm: str | None = None  # RMSNorm of queries and keys: "head" (per head), "full" (whole projection)
    biased_o_proj = False  # o_proj has a bias too when the attention has biases

    def __init__(self, config: Any):
        self.config = config

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def norm_topk(self) -> bool:
        """Whether the top-k routing weights are renormalised to sum to 1."""
        return bool(getattr(self.config, "norm_topk_prob", False))

    @property
    def qkv_bias(self) -> bool:
        return bool(getattr(self.config, "attention_bias", False))

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def moe_layers(self) -> list[int]:
        return [L for L in range(self.config.num_hidden_layers) if self.is_moe_layer(L)]

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of a layer, None for full attention."""
        return None

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """The gate, up and down projection tensors of one routed expert, in that order."""
        p = f"model.layers.{layer}.{self.moe_module}.experts.{expert}."
        return tuple(f"{p}{proj}.weight" for proj in self.expert_projs)  # type: ignore[return-value]

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_module}.gate.weight"

    def mlp_prefix(self, layer: int) -> str | None:
        """The dense MLP of a dense layer, the shared expert of a MoE layer (None if it has none): a name prefix
        of its gate_proj, up_proj and down_proj."""
        if not self.is_moe_layer(layer):
            return f"model.layers.{layer}.mlp."
        if self.shared_expert is None:
            return None
        return f"model.layers.{layer}.{self.moe_module}.{self.shared_expert}."

    # -- shapes ------------------------------------------------------------------------------------
    def attention_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        c, d = self.config, self.head_dim
        H, q, kv = c.hidden_size, c.num_attention_heads * d, c.num_key_value_heads * d
        a = prefix + "self_attn."
        shapes: dict[str, tuple[int, ...]] = {
            a + "q_proj.weight": (q, H), a + "k_proj.weight": (kv, H), a + "v_proj.weight": (kv, H),
            a + "o_proj.weight": (H, q)}
        if self.qkv_bias:
            shapes |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
            if self.biased_o_proj:
                shapes[a + "o_proj.bias"] = (H,)
        if self.qk_norm == "head":
            shapes |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
        elif self.qk_norm == "full":
            shapes |= {a + "q_norm.weight": (q,), a + "k_norm.weight": (kv,)}
        return shapes

    def shared_expert_width(self) -> int:
        raise NotImplementedError

    def moe_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Router, shared expert and routed experts of a MoE layer."""
        c = self.config
        H, I = c.hidden_size, self.expert_width
        shapes: dict[str, tuple[int, ...]] = {self.router_name(layer): (self.num_experts, H)}
        shared = self.mlp_prefix(layer)
        if shared is not None:
            shapes |= mlp_shapes(shared, H, self.shared_expert_width())
        for e in range(self.num_experts):
            gate, up, down = self.expert_names(layer, e)
            shapes |= {gate: (I, H), up: (I, H), down: (H, I)}
        return shapes

    @property
    def expert_width(self) -> int:
        """A routed expert's intermediate size."""
        return self.config.moe_intermediate_size

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, with its shape, derived from the config alone (safetensors stores them
        in name order, whatever the order here)."""
        c = self.config
        H = c.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, H)
        for L in range(c.num_hidden_layers):
            p = f"model.layers.{L}."
            shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
            shapes |= self.attention_shapes(p)
            if self.is_moe_layer(L):
                shapes |= self.moe_shapes(L)
            else:
                shapes |= mlp_shapes(p + "mlp.", H, c.intermediate_size)
        return shapes

    def quantizable(self) -> dict[str, list[str]]:
        """The matrices weight-only quantization may store in int8, by group: every routed expert's ("experts"),
        every shared expert's and dense MLP's ("mlp"), and an untied lm_head ("lm_head"). Attention, routers and
        embeddings stay in the model's dtype."""
        c = self.config
        experts = [n for L in self.moe_layers() for e in range(self.num_experts) for n in self.expert_names(L, e)]
        mlps = [f"{m}{proj}.weight" for L in range(c.num_hidden_layers) if (m := self.mlp_prefix(L)) is not None
                for proj in ("gate_proj", "up_proj", "down_proj")]
        return {"experts": experts, "mlp": mlps, "lm_head": [] if c.tie_word_embeddings else ["lm_head.weight"]}

    def float32_tensors(self) -> set[str]:
        """Control-plane tensors transformers keeps in fp32 whatever the model's dtype (so must we, to agree)."""
        return set()

    def control_plane_class(self) -> type:
        """The family's control plane: `ControlPlane` in the family's own module."""
        return importlib.import_module(type(self).__module__).ControlPlane


def mlp_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (width, hidden), prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width)}

"""DeepSeek-V2 (V2, V2-Lite) and DeepSeek-V3 (V3, R1, Moonlight): transformers' `DeepseekV2ForCausalLM` and
`DeepseekV3ForCausalLM`.

Multi-head latent attention (MLA): keys and values come from one compressed latent per
position (kv_lora_rank wide, RMS-normalised) plus one shared rotary key, and the KV cache
holds only that (576 numbers per position and layer for V2-Lite, against 4,096 for its
16 heads of full keys and values). Attention runs in the latent space: the key
up-projection is folded into the queries and the value up-projection applied after
attention (the "absorbed" form), so no step expands the cache. Rotary dimensions come in
interleaved pairs. Dense MLPs in the first `first_k_dense_replace` layers, shared experts
without a gate, routing in fp32 with `routed_scaling_factor`: V2 softmax with plain or
group-limited top-k (`topk_method`, `n_group`, `topk_group`), V3 sigmoid scores with a
correction bias choosing among the best groups (`noaux_tc`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faasmoe.control.kv_cache import Chunk, KVCache
from faasmoe.models import control_plane
from faasmoe.models.family import Family
from faasmoe.models.kernels import linear
from faasmoe.models.layers import rms_norm, rotate_half

LATENT_NORM_EPS = 1e-6  # transformers builds the q_a and kv_a norms with their default eps, not rms_norm_eps


class DeepseekV2(Family):
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    config_class = "DeepseekV2Config"
    shared_expert = "shared_experts"

    @property
    def num_experts(self) -> int:
        return self.config.n_routed_experts

    @property
    def head_dim(self) -> int:
        return self.config.qk_rope_head_dim  # the rotary part: what the rotary embedding is computed for

    @property
    def norm_topk(self) -> bool:
        return False  # transformers' V2 router never renormalises, whatever norm_topk_prob says

    def is_moe_layer(self, layer: int) -> bool:
        """Same rule as transformers' DeepseekV2DecoderLayer."""
        return layer >= self.config.first_k_dense_replace

    def mlp_prefix(self, layer: int) -> str | None:
        if self.is_moe_layer(layer) and not self.config.n_shared_experts:
            return None
        return super().mlp_prefix(layer)

    def shared_expert_width(self) -> int:
        return self.config.moe_intermediate_size * self.config.n_shared_experts

    def float32_tensors(self) -> set[str]:
        """The routers (and V3's score correction): `_keep_in_fp32_modules_strict` in transformers."""
        names = set()
        for L in self.moe_layers():
            names |= {self.router_name(L), f"model.layers.{L}.mlp.gate.e_score_correction_bias"}
        return names

    def attention_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        H, h, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        a = prefix + "self_attn."
        if c.q_lora_rank is None:
            shapes: dict[str, tuple[int, ...]] = {a + "q_proj.weight": (h * qk, H)}
        else:
            shapes = {a + "q_a_proj.weight": (c.q_lora_rank, H), a + "q_a_layernorm.weight": (c.q_lora_rank,),
                      a + "q_b_proj.weight": (h * qk, c.q_lora_rank)}
        shapes |= {a + "kv_a_proj_with_mqa.weight": (r + c.qk_rope_head_dim, H), a + "kv_a_layernorm.weight": (r,),
                   a + "kv_b_proj.weight": (h * (c.qk_nope_head_dim + c.v_head_dim), r),
                   a + "o_proj.weight": (H, h * c.v_head_dim)}
        if c.attention_bias:
            shapes |= {a + "kv_a_proj_with_mqa.bias": (r + c.qk_rope_head_dim,), a + "o_proj.bias": (H,)}
            if c.q_lora_rank is not None:
                shapes[a + "q_a_proj.bias"] = (c.q_lora_rank,)
        return shapes


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    config_class = "DeepseekV3Config"

    @property
    def norm_topk(self) -> bool:
        return bool(self.config.norm_topk_prob)

    def moe_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        return super().moe_shapes(layer) | {
            f"model.layers.{layer}.mlp.gate.e_score_correction_bias": (self.num_experts,)}


@dataclass
class LatentAttention:
    """MLA's weights; the key and value up-projections split per head for the absorbed form."""

    wq: torch.Tensor | None  # [h*(dn+dr), H] without a query compression, else None
    wq_a: torch.Tensor | None  # [q_rank, H]
    bq_a: torch.Tensor | None
    q_a_norm: torch.Tensor | None  # [q_rank]
    wq_b: torch.Tensor | None  # [h*(dn+dr), q_rank]
    wkv_a: torch.Tensor  # [r+dr, H]: the latent and the rotary key
    bkv_a: torch.Tensor | None
    kv_norm: torch.Tensor  # [r]
    w_uk: torch.Tensor  # [h, dn, r]: latent -> each head's non-rotary key
    w_uv_t: torch.Tensor  # [h, r, dv]: latent -> each head's value, transposed
    wo: torch.Tensor  # [H, h*dv]
    bo: torch.Tensor | None


class LatentCache(KVCache):
    """One sequence's MLA cache: per layer and position the normalised latent [r] then the rotated key [dr], a
    single "head" every query head attends to; the values are the latents (the cache's first r columns)."""

    def __init__(self, layers: int, rank: int, rope_dim: int, capacity: int, dtype: torch.dtype):
        self.k = torch.empty(layers, 1, capacity, rank + rope_dim, dtype=dtype)  # [L, 1, C, r+dr]
        self.rank = rank
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: None, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [1, t, r+dr] at positions start.. and return keys [1, S, r+dr] and values [1, S, r] up to them."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"sequence of {end} positions exceeds its cache of {self.capacity}")
        self.k[layer, :, start:end] = k
        keys = self.k[layer, :, :end]
        return keys, keys[..., :self.rank]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size()


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x0, x1), (x2, x3), ... to halves (x0, x2, ..., x1, x3, ...), where `rotate_half` rotates each pair
    by its frequency. Queries and keys get the same permutation, so their dot products are DeepSeek's."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class ControlPlane(control_plane.ControlPlane):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.dn, self.dr, self.dv, self.rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.scale = (self.dn + self.dr) ** -0.5
        rope = c.rope_parameters or {}
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):  # yarn's mscale, squared
            factor = rope["factor"]
            mscale = 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
            self.scale *= mscale * mscale
        self.interleaved = self.family.model_type == "deepseek_v2" or bool(getattr(c, "rope_interleave", True))
        self.sigmoid_scores = self.family.model_type == "deepseek_v3"
        self.topk_method = getattr(c, "topk_method", "noaux_tc" if self.sigmoid_scores else "greedy")
        self.groups, self.topk_groups = c.n_group, c.topk_group
        self.scaling = c.routed_scaling_factor

    def load_attention(self, prefix: str, w: dict[str, torch.Tensor]) -> LatentAttention:
        c = self.config
        h = c.num_attention_heads
        kv_b = w[prefix + "kv_b_proj.weight"].view(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return LatentAttention(
            wq=w.get(prefix + "q_proj.weight"), wq_a=w.get(prefix + "q_a_proj.weight"),
            bq_a=w.get(prefix + "q_a_proj.bias"), q_a_norm=w.get(prefix + "q_a_layernorm.weight"),
            wq_b=w.get(prefix + "q_b_proj.weight"), wkv_a=w[prefix + "kv_a_proj_with_mqa.weight"],
            bkv_a=w.get(prefix + "kv_a_proj_with_mqa.bias"), kv_norm=w[prefix + "kv_a_layernorm.weight"],
            w_uk=kv_b[:, :c.qk_nope_head_dim], w_uv_t=kv_b[:, c.qk_nope_head_dim:].transpose(1, 2),
            wo=w[prefix + "o_proj.weight"], bo=w.get(prefix + "o_proj.bias"))

    def load_moe(self, layer: int, into: control_plane.Layer, w: dict[str, torch.Tensor]) -> None:
        into.router_bias = w.get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")  # fp32, as the router

    def new_cache(self, capacity: int) -> KVCache:
        return LatentCache(len(self.layers), self.rank, self.dr, capacity, self.dtype)

    def attention(self, i: int, layer: control_plane.Layer, x: torch.Tensor, chunks: list[Chunk], cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        a: LatentAttention = layer.attn
        T, h = x.shape[0], self.h
        if a.wq is not None:
            q = linear(x, a.wq)
        else:
            q = linear(rms_norm(linear(x, a.wq_a, a.bq_a), a.q_a_norm, LATENT_NORM_EPS), a.wq_b)
        q = q.view(T, h, self.dn + self.dr)
        kv = linear(x, a.wkv_a, a.bkv_a)  # [T, r+dr]
        latent = rms_norm(kv[:, :self.rank], a.kv_norm, LATENT_NORM_EPS)  # [T, r]
        q_rot, k_rot = q[..., self.dn:], kv[:, None, self.rank:]  # [T, h, dr], [T, 1, dr]
        if self.interleaved:
            q_rot, k_rot = _deinterleave(q_rot), _deinterleave(k_rot)
        q_rot = q_rot * cos + rotate_half(q_rot) * sin
        k_rot = k_rot * cos + rotate_half(k_rot) * sin
        # queries in the latent space: q_nope . (W_uk c) = (W_uk^T q_nope) . c
        q_latent = torch.bmm(q[..., :self.dn].transpose(0, 1), a.w_uk).transpose(0, 1)  # [T, h, r]
        queries = torch.cat([q_latent, q_rot], dim=-1)  # [T, h, r+dr]
        keys = torch.cat([latent[:, None], k_rot], dim=-1)  # [T, 1, r+dr]
        out = self.attend(i, layer, queries, keys, None, chunks, scale=self.scale)  # [T, h, r]
        out = torch.bmm(out.transpose(0, 1), a.w_uv_t).transpose(0, 1)  # [T, h, dv]
        return linear(out.reshape(T, h * self.dv), a.wo, a.bo)

    def router_logits(self, layer: control_plane.Layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), layer.router)  # [T, E] fp32

    def route(self, layer: control_plane.Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router_logits(layer, x)
        T, E = logits.shape
        if self.sigmoid_scores:  # V3: choose by biased sigmoid scores among the groups with the best two
            scores = logits.sigmoid()
            choice = scores + layer.router_bias
            group_scores = choice.view(T, self.groups, E // self.groups).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(~self._group_mask(group_scores, E), float("-inf"))
            experts = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, experts)
            if self.norm_topk:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:  # V2: softmax, top-k over every expert or only over the best groups
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            if self.topk_method == "group_limited_greedy":
                group_scores = scores.view(T, self.groups, E // self.groups).max(dim=-1).values
                scores = scores.masked_fill(~self._group_mask(group_scores, E), 0.0)
            weights, experts = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return experts, weights * self.scaling

    def _group_mask(self, group_scores: torch.Tensor, experts: int) -> torch.Tensor:
        """[T, E] bool: the experts of each token's topk_group best groups."""
        best = torch.topk(group_scores, self.topk_groups, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, groups]
        return mask.repeat_interleave(experts // self.groups, dim=1)

"""The control plane's half of a Qwen2-MoE model: everything but the routed experts.

It holds embeddings, attention (with a KV cache per sequence), norms, routers,
shared experts and lm_head, and runs one step over a ragged batch: the new tokens
of several sequences flattened into one [T, H] tensor, so that at every MoE layer
the tokens of every sequence (whatever its tenant) are routed and dispatched
together. The math follows transformers' Qwen2MoeForCausalLM line by line.

Shapes: T = tokens in the step, H = hidden, h = query heads, g = key/value heads,
d = head dim, S = cached positions, E = experts, A = experts per token, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from faasmoe.models.checkpoint import Checkpoint, is_moe_layer
from faasmoe.control.dispatch import ExpertDispatcher
from faasmoe.control.kv_cache import Chunk, KVCache
from faasmoe.models.kernels import linear
from faasmoe.models.layers import activation, attention_mask, gated_mlp, rms_norm, rope_inv_freq, rotate_half
from faasmoe.models.weights import map_stacked, map_tensors

if TYPE_CHECKING:
    from faasmoe.control.resident import ResidentExperts


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor  # [h*d + 2*g*d, H]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [H, h*d]
    sliding_window: int | None
    # MoE layer: router and shared expert; dense layer: its MLP in mlp_*
    router: torch.Tensor | None = None  # [E, H]
    mlp_gate_up: torch.Tensor | None = None  # [2I, H]: gate_proj then up_proj, one matmul
    mlp_down: torch.Tensor | None = None  # [H, I]
    shared_gate: torch.Tensor | None = None  # [1, H], the sigmoid gate of the shared expert


class ControlPlane:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, dispatcher: ExpertDispatcher | ResidentExperts,
                 own_copy: bool = False, prefetch_layers: int = 0):
        """`own_copy`: hold private copies of the weights (a monolithic server) instead of the page cache's.
        `prefetch_layers`: how many layers ahead to predict the routing (that layer's router applied to the
        hidden state here) and warm the functions it names that have no instance, so that a cold start runs
        while the layers in between compute instead of stalling the step; 0: off."""
        c = self.config = ckpt.config
        self.prefetch_layers = prefetch_layers
        self.dtype = dtype
        self.dispatcher = dispatcher
        # Never the routed experts. An untied embedding is mapped lazily: only the rows of tokens seen are read.
        lazy = frozenset() if c.tie_word_embeddings or own_copy else frozenset({"model.embed_tokens.weight"})
        tensors = ckpt.control_plane_tensors()
        loc = {t.name: t for t in tensors}
        mlps = {L: f"model.layers.{L}.mlp." + ("shared_expert." if is_moe_layer(c, L) else "")
                for L in range(c.num_hidden_layers)}
        gate_up = {f"{m}gate_up": [loc[m + "gate_proj.weight"], loc[m + "up_proj.weight"]] for m in mlps.values()}
        stacked = {t.name for group in gate_up.values() for t in group}
        w = map_tensors([t for t in tensors if t.name not in stacked], dtype, lazy)
        w.update(map_stacked(gate_up, dtype))  # one [2I, H] matrix per MLP, mapped as one where adjacent
        if own_copy:
            w = {name: t.clone() for name, t in w.items()}
        self.routed = torch.zeros(c.num_hidden_layers, c.num_experts, dtype=torch.long)  # [L, E] routing pairs
        self.nbytes = sum(t.numel() * t.element_size() for t in w.values())
        self.h, self.g = c.num_attention_heads, c.num_key_value_heads
        self.d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.top_k, self.norm_topk = c.num_experts_per_tok, c.norm_topk_prob
        self.act = activation(c.hidden_act)
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if c.tie_word_embeddings else w["lm_head.weight"]  # [V, H]
        self.inv_freq, self.rope_scale = rope_inv_freq(c)
        layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        self.layers: list[Layer] = []
        for L in range(c.num_hidden_layers):
            p = f"model.layers.{L}."
            a = p + "self_attn."
            bias = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                    if c.qkv_bias else None)
            window = c.sliding_window if layer_types[L] == "sliding_attention" and c.sliding_window else None
            layer = Layer(
                ln1=w[p + "input_layernorm.weight"], ln2=w[p + "post_attention_layernorm.weight"],
                wqkv=torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]),
                bqkv=bias, wo=w[a + "o_proj.weight"], sliding_window=window)
            m = mlps[L]
            layer.mlp_gate_up, layer.mlp_down = w[m + "gate_up"], w[m + "down_proj.weight"]
            if is_moe_layer(c, L):
                layer.router, layer.shared_gate = w[p + "mlp.gate.weight"], w[p + "mlp.shared_expert_gate.weight"]
            self.layers.append(layer)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(len(self.layers), self.g, self.d, capacity, self.dtype)

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], all_logits: bool = False) -> torch.Tensor:
        """Logits [len(chunks), V] at each chunk's last position ([T, V] at every position if all_logits)."""
        tokens = torch.cat([ch.tokens for ch in chunks])  # [T]
        pos = torch.cat([torch.arange(ch.start, ch.start + len(ch.tokens)) for ch in chunks])  # [T]
        x = F.embedding(tokens, self.embed)  # [T, H]
        freqs = pos[:, None].float() * self.inv_freq[None, :]  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None, :]  # [T, 1, d]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[:, None, :]
        ahead = self.prefetch_layers
        for j in range(min(ahead, len(self.layers))):  # the first layers, predicted from the embeddings
            self.prefetch(j, x)
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, layer, rms_norm(x, layer.ln1, self.eps), chunks, cos, sin)
            if ahead and i + ahead < len(self.layers):
                self.prefetch(i + ahead, x)
            m = rms_norm(x, layer.ln2, self.eps)
            x = x + (self.moe(i, layer, m) if layer.router is not None else self.mlp(layer, m))
        for ch in chunks:
            ch.cache.length = ch.start + len(ch.tokens)
        if not all_logits:  # lm_head only where a token will be sampled: it is the costliest matmul
            x = x[torch.tensor([len(ch.tokens) for ch in chunks]).cumsum(0) - 1]
        return linear(rms_norm(x, self.norm, self.eps), self.lm_head)  # [*, V]

    def attention(self, i: int, layer: Layer, x: torch.Tensor, chunks: list[Chunk], cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        h, g, d = self.h, self.g, self.d
        qkv = linear(x, layer.wqkv, layer.bqkv).view(T, h + 2 * g, d)
        qk = qkv[:, :h + g]
        qk = qk * cos + rotate_half(qk) * sin  # [T, h+g, d]: queries and keys rotated together
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + g:]
        out = torch.empty(T, h, d, dtype=x.dtype)
        row = 0
        for ch in chunks:  # attention is per sequence; everything else in the step is batched
            t = len(ch.tokens)
            K, V = ch.cache.update(i, k[row:row + t].transpose(0, 1), v[row:row + t].transpose(0, 1), ch.start)  # [g, S, d]
            qi = q[row:row + t].transpose(0, 1)[None]  # [1, h, t, d]
            mask, causal = attention_mask(t, ch.start, layer.sliding_window)
            o = F.scaled_dot_product_attention(qi, K[None], V[None], attn_mask=mask, is_causal=causal,
                                               enable_gqa=h != g)  # [1, h, t, d]
            out[row:row + t] = o[0].transpose(0, 1)
            row += t
        return linear(out.view(T, h * d), layer.wo)

    def mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, layer.mlp_gate_up, layer.mlp_down, self.act)

    def prefetch(self, i: int, x: torch.Tensor) -> None:
        """Warm the functions layer i's router would pick for hidden states x (a prediction: the residual
        stream changes little from one layer to the next)."""
        layer = self.layers[i]
        if layer.router is not None:
            logits = linear(rms_norm(x, layer.ln2, self.eps), layer.router)  # [T, E]
            self.dispatcher.prefetch(i, torch.topk(logits, self.top_k, dim=-1).indices)

    def moe(self, i: int, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, layer.router)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, A]
        self.routed[i] += torch.bincount(experts.flatten(), minlength=self.routed.shape[1])  # expert popularity
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pending = self.dispatcher.send(i, x, experts, weights.to(logits.dtype))  # the functions start now
        shared = torch.sigmoid(linear(x, layer.shared_gate)) * self.mlp(layer, x)  # computed meanwhile
        return self.dispatcher.combine(pending) + shared

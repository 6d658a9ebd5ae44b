"""init-model presets and the synthetic router skew: graded expert popularity, still a plain checkpoint of its family."""

from __future__ import annotations

import json

import pytest
import torch

import faasmoe
from faasmoe.bench.corpus import expert_top_share, prompt_texts
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.presets import ROUTER_SKEW_LEVELS, init_model, make_config, router_skew_value

# The reference model's routing (60 experts, top-4) on the tiny preset's widths.
ROUTING = {"num_experts": 60, "num_experts_per_tok": 4}


def test_quarter_preset_is_the_reference_structure_at_a_quarter_of_the_width():
    c = make_config("qwen1.5-moe-a2.7b-quarter")
    real = make_config("qwen1.5-moe-a2.7b")
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.intermediate_size) == (512, 4, 4, 352, 1408, 1408)
    same = ("vocab_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "rms_norm_eps",
            "norm_topk_prob", "decoder_sparse_step", "tie_word_embeddings", "max_position_embeddings", "dtype")
    assert all(getattr(c, k) == getattr(real, k) for k in same)
    assert c.rope_parameters == real.rope_parameters and c.hidden_size // c.num_attention_heads == 128


def test_router_skew_values():
    assert router_skew_value("uniform") == 0 and router_skew_value("1.25") == 1.25
    assert ROUTER_SKEW_LEVELS["uniform"] < ROUTER_SKEW_LEVELS["mild"] < ROUTER_SKEW_LEVELS["strong"]
    for bad in ("-1", "hot", "nan"):
        with pytest.raises(ValueError):
            router_skew_value(bad)


def _routing_counts(path: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per MoE layer, how often transformers' router picks each expert over the prompts."""
    from transformers import Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    counts: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def f(_mod, _inp, out):
            counts.setdefault(i, torch.zeros(cfg.num_experts))
            counts[i] += torch.bincount(out[2].flatten(), minlength=cfg.num_experts).float()
        return f

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(hook(i))
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    return [counts[i] for i in sorted(counts)]


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """level -> tiny checkpoint with the reference routing at that skew level."""
    root = tmp_path_factory.mktemp("skew")
    return {level: str(init_model("tiny", root / level, overrides=ROUTING, progress=False, router_skew=level))
            for level in ("uniform", "mild", "strong")}


def test_router_skew_levels_give_graded_expert_popularity(skewed):
    """Share of routed (token, expert) pairs taken by the top 10 % of experts, English prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(skewed["uniform"])
    prompts = [tok.encode(p) for p in prompt_texts(32, tok, 16, 64, seed=3)]
    share = {level: sum(expert_top_share(c) for c in _routing_counts(path, prompts)) / 3
             for level, path in skewed.items()}
    print("top-10% expert share per level:", {k: round(v, 3) for k, v in share.items()})
    assert share["uniform"] < 0.32
    assert 0.3 < share["mild"] < 0.45 and share["mild"] > share["uniform"] + 0.05
    assert share["strong"] > 0.55


def test_skewed_checkpoint_is_standard_recorded_and_deterministic(skewed, tmp_path, reference):
    config = json.loads((Checkpoint(skewed["strong"]).path / "config.json").read_text())
    assert config["faasmoe_router_skew"] == ROUTER_SKEW_LEVELS["strong"]
    assert "faasmoe_router_skew" not in json.loads((Checkpoint(skewed["uniform"]).path / "config.json").read_text())
    again = init_model("tiny", tmp_path / "again", overrides=ROUTING, progress=False, router_skew="strong")
    assert Checkpoint(again).digest == Checkpoint(skewed["strong"]).digest
    with faasmoe.load(skewed["strong"], experts_per_function=8) as engine:  # faasmoe == transformers
        ids = engine.encode("The capital of France is Paris. The capital of Germany is")
        with torch.no_grad():
            expected = reference(skewed["strong"])(torch.tensor([ids])).logits[0]
        assert (engine.logits(ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-deepseek-v2"])
def test_router_skew_works_for_other_families(preset, tmp_path):
    """The skew is placed through each family's own router (Mixtral's block_sparse_moe.gate, DeepSeek's fp32
    router, its group-limited top-k): the strong level concentrates routing on fewer experts than uniform."""
    from faasmoe.engines.monolithic import MonolithicEngine

    shares = {}
    for level in ("uniform", "strong"):
        path = init_model(preset, tmp_path / level, overrides={"num_experts_per_tok": 2}, progress=False,
                          router_skew=level)
        with MonolithicEngine(path) as engine:
            prompts = [engine.encode(p) for p in prompt_texts(16, engine.tokenizer, 16, 48, seed=3)]
            for ids in prompts:
                engine.logits(ids)
            routed = engine.control_plane.routed
            shares[level] = sum(expert_top_share(routed[L]) for L in engine.checkpoint.moe_layers()) / len(
                engine.checkpoint.moe_layers())
    print(preset, shares)
    assert shares["strong"] > shares["uniform"] + 0.1, shares

"""The first invariant: the distributed model gives the monolithic transformers model's logits and tokens."""

from __future__ import annotations

import pytest
import torch

import faasmoe
from conftest import FAMILY_VARIANTS
from helpers import greedy_reference

PROMPT = "The capital of France is Paris. The capital of Germany is"
CASES = [("tiny", 1), ("tiny", 2), ("tiny", 8), ("sparse2-normtopk", 2), ("sparse2-normtopk", 8),
         ("tied-mlponly-window", 3)] + [(v, k) for v in FAMILY_VARIANTS for k in (1, 2, 8)]


@pytest.mark.parametrize("variant,k", CASES, ids=[f"{v}-k{k}" for v, k in CASES])
def test_logits_and_greedy_tokens_equal_transformers(checkpoint, reference, variant, k):
    path = checkpoint(variant)
    ref = reference(path)
    with faasmoe.load(path, experts_per_function=k) as engine:
        ids = engine.encode(PROMPT)
        logits = engine.logits(ids)
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() < 1e-4

        result = engine.generate(ids, max_tokens=12)
        assert result.token_ids == greedy_reference(ref, ids, 12)
        assert result.stats["invocations"] > 0


def test_variants_exercise_the_config_options(checkpoint):
    """Guard the test matrix itself: each variant really sets what it claims."""
    from faasmoe.models.checkpoint import Checkpoint

    sparse = Checkpoint(checkpoint("sparse2-normtopk"))
    assert sparse.moe_layers() == [1, 3] and sparse.config.norm_topk_prob
    tied = Checkpoint(checkpoint("tied-mlponly-window"))
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.tensors
    assert 1 not in tied.moe_layers() and "sliding_attention" in tied.config.layer_types
    assert not tied.config.qkv_bias
    qwen3 = Checkpoint(checkpoint("qwen3-moe"))
    assert qwen3.moe_layers() == [0, 2] and qwen3.config.sliding_window == 6 and qwen3.config.norm_topk_prob
    assert "model.layers.0.self_attn.q_norm.weight" in qwen3.tensors
    mixtral = Checkpoint(checkpoint("mixtral"))
    assert mixtral.config.sliding_window == 6 and mixtral.num_experts == 8
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in mixtral.tensors
    olmoe = Checkpoint(checkpoint("olmoe"))
    assert olmoe.config.clip_qkv == 0.5 and "model.layers.0.self_attn.o_proj.bias" in olmoe.tensors
    v2 = Checkpoint(checkpoint("deepseek-v2"))
    assert v2.moe_layers() == [1, 2] and v2.config.topk_method == "group_limited_greedy"
    assert v2.config.routed_scaling_factor != 1 and v2.config.rope_parameters["rope_type"] == "yarn"
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in v2.tensors and v2.config.q_lora_rank is None
    v3 = Checkpoint(checkpoint("deepseek-v3"))
    assert v3.config.q_lora_rank and v3.config.n_group > v3.config.topk_group and v3.config.norm_topk_prob
    assert v3.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].shape == (8,)


def test_long_prompt_crosses_the_sliding_window(checkpoint, reference):
    path = checkpoint("tied-mlponly-window")
    with faasmoe.load(path, experts_per_function=8) as engine:
        ids = engine.encode("one two three four five six seven eight nine ten eleven twelve")
        assert len(ids) > 6
        with torch.no_grad():
            expected = reference(path)(torch.tensor([ids])).logits[0]
        assert (engine.logits(ids) - expected).abs().max().item() < 1e-4


def test_batched_step_equals_single_sequences(tiny):
    """Sequences stepped together (one dispatch per layer for all) give what each gives alone."""
    from faasmoe.control.sequence import SamplingParams

    prompts = ["Hello there", "A much longer prompt about mixture of experts models", "1 2 3"]
    with faasmoe.load(tiny, experts_per_function=2) as engine:
        alone = [engine.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in prompts]
        seqs = [engine.new_sequence(engine.encode(p), SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
        while not all(s.finished for s in seqs):
            engine.step(seqs)
        assert [s.output_ids for s in seqs] == alone


@pytest.mark.parametrize("variant", ["tiny", "sparse2-normtopk", "tied-mlponly-window"])
def test_the_monolithic_baseline_equals_transformers_and_batches(checkpoint, reference, variant):
    """The Baseline (every expert resident, batched steps) is the same model, not a slower or different one."""
    from faasmoe.control.sequence import SamplingParams
    from faasmoe.engines.monolithic import MonolithicEngine

    path = checkpoint(variant)
    with MonolithicEngine(path) as engine:
        ids = engine.encode(PROMPT)
        with torch.no_grad():
            expected = reference(path)(torch.tensor([ids])).logits[0]
        assert (engine.logits(ids) - expected).abs().max().item() < 1e-4
        prompts = ["Hello there", PROMPT, "1 2 3"]
        alone = [engine.generate(p, max_tokens=6, ignore_eos=True).token_ids for p in prompts]
        seqs = [engine.new_sequence(engine.encode(p), SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
        while not all(s.finished for s in seqs):
            engine.step(seqs)  # one forward for the three sequences
        assert [s.output_ids for s in seqs] == alone

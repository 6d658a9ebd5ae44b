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


def _decode_together(engine, prompts: list[str], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Step the prompts' sequences together; (their tokens, the logits of every step)."""
    from faasmoe.control.sequence import SamplingParams

    cp, logits = engine.control_plane, []
    forward = cp.forward

    def recording(chunks, all_logits=False):
        out = forward(chunks, all_logits)
        logits.append(out.clone())
        return out

    cp.forward = recording
    try:
        seqs = [engine.new_sequence(engine.encode(p), SamplingParams(max_tokens=steps, ignore_eos=True))
                for p in prompts]
        while not all(s.finished for s in seqs):
            engine.step(seqs)
    finally:
        cp.forward = forward
    return [s.output_ids for s in seqs], logits


@pytest.mark.parametrize("variant", ["tiny", "tied-mlponly-window", *FAMILY_VARIANTS])
def test_a_decode_step_in_two_halves_equals_the_whole_batch(checkpoint, variant, monkeypatch):
    """Decode steps of several sequences run in two halves, one half's expert calls in flight during the other's
    attention, the shared expert over both halves at once: the same logits as the whole batch at once (dense
    layers, latent attention and sliding windows included)."""
    from faasmoe.models.control_plane import ControlPlane

    prompts = ["Hello there", PROMPT, "1 2 3", "A much longer prompt about mixture of experts models", "x"]
    with faasmoe.load(checkpoint(variant), experts_per_function=2) as engine:
        engine.dispatcher.two_batches = True  # whatever this machine's cores: the platform has hosts to spare
        halves, shared_rows = [], []
        spy, shared = ControlPlane._layers_in_halves, ControlPlane.shared
        monkeypatch.setattr(ControlPlane, "_layers_in_halves", lambda self, *a: halves.append(1) or spy(self, *a))
        monkeypatch.setattr(ControlPlane, "shared", lambda self, layer, x: shared_rows.append(len(x)) or
                            shared(self, layer, x))
        split_ids, split_logits = _decode_together(engine, prompts, 6)
        assert len(halves) == 5  # every step but the prefill
        assert len(prompts) in shared_rows and not {2, 3} & set(shared_rows)  # never a half's rows alone
        engine.dispatcher.two_batches = False
        whole_ids, whole_logits = _decode_together(engine, prompts, 6)
        assert len(halves) == 5
    assert split_ids == whole_ids
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(split_logits, whole_logits, strict=True))


def test_a_step_that_fails_in_one_half_leaves_no_calls_behind(tiny, monkeypatch):
    """When one half's calls fail, the other half's still in flight are gathered (their hosts released): the
    step fails with that error and the engine serves the next request as before."""
    from faasmoe.control.dispatch import ExpertDispatcher
    from faasmoe.models.control_plane import ControlPlane

    with faasmoe.load(tiny, experts_per_function=2) as engine:
        engine.dispatcher.two_batches = True
        clean = engine.generate("Hello there", max_tokens=4, ignore_eos=True).token_ids
        combine, discard, discarded = ExpertDispatcher.combine, ExpertDispatcher.discard, []
        spy, state = ControlPlane._layers_in_halves, {"halves": False, "combines": 0}

        def halves(self, *args):
            state["halves"] = True
            return spy(self, *args)

        def failing(self, pending, shared=None):
            out = combine(self, pending, shared)  # its calls gathered, as a failing gather's are
            if state["halves"]:
                state["combines"] += 1
                if state["combines"] == 2:  # the second half's, at layer 1: the first half's layer 1 in flight
                    raise RuntimeError("one half's functions failed")
            return out

        monkeypatch.setattr(ControlPlane, "_layers_in_halves", halves)
        monkeypatch.setattr(ExpertDispatcher, "combine", failing)
        monkeypatch.setattr(ExpertDispatcher, "discard", lambda self, p: discarded.append(p) or discard(self, p))
        with pytest.raises(RuntimeError, match="one half"):
            _decode_together(engine, ["Hello there", "1 2 3"], 3)
        assert len(discarded) == 1  # the other half's layer, in flight when its twin failed
        monkeypatch.setattr(ExpertDispatcher, "combine", combine)
        assert all(not h.busy for h in engine.platform._hosts)
        assert engine.generate("Hello there", max_tokens=4, ignore_eos=True).token_ids == clean


def test_halves_whose_calls_spread_over_hosts_take_one_more_host(tiny, monkeypatch):
    """A half of 16 or more token rows spreads over the cores' hosts; the other half, in flight at the same
    time, then needs a host beyond them: it starts one (max_instances above the cores) and the step ends with
    the whole batch's tokens, where with every host held by the first half it would wait for ever."""
    import faasmoe.platforms.local.platform as local
    from faasmoe.platforms import PlatformConfig

    monkeypatch.setattr(local, "_CORES", 2)
    prompts = [f"Sequence number {i} of many" for i in range(16)]  # 8 a half, top-2: 16 rows a half
    with faasmoe.load(tiny, experts_per_function=1, platform_config=PlatformConfig(max_instances=3)) as engine:
        assert engine.dispatcher.two_batches
        split_ids, _ = _decode_together(engine, prompts, 4)
        assert len(engine.platform.hosts()) == 3
        engine.dispatcher.two_batches = False
        whole_ids, _ = _decode_together(engine, prompts, 4)
    assert split_ids == whole_ids

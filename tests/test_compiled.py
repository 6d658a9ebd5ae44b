"""Experts computed by inductor-compiled code (`compile_experts`): the same answers as eager, and eager when the
compiler cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import faasmoe
from faasmoe.control.deployment import Deployment
from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.models import compiled
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.kernels import native_half_gemm
from faasmoe.models.layers import gated_mlp
from faasmoe.platforms import PlatformConfig
from helpers import greedy_reference


def test_compiled_experts_on_the_local_platform_equal_transformers(tiny, reference):
    """The zygote compiles, its forked hosts serve: logits within 1e-4 of transformers', the same greedy tokens."""
    ref = reference(tiny)
    with faasmoe.load(tiny, experts_per_function=2, platform_config=PlatformConfig(compile_experts=True)) as engine:
        ids = engine.encode("The capital of France is Paris. The capital of Germany is")
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert (engine.logits(ids) - expected).abs().max().item() < 1e-4
        result = engine.generate(ids, max_tokens=12)
        assert result.token_ids == greedy_reference(ref, ids, 12)


@pytest.mark.parametrize("variant", ["tiny", "mixtral"])  # gate and up stacked, and a (w1, w3) pair
def test_compiled_one_token_calls_equal_eager_in_bf16(checkpoint, variant):
    """A single sequence's call (one token, several experts) and a batch's call whose experts each get one token:
    bit for bit where this CPU multiplies bf16 natively (eager then sums a row's products as the compiled loop
    does), else within bf16 rounding (eager computes one row through F.linear there)."""
    spec = Deployment.plan(Checkpoint(checkpoint(variant)), 4, "bfloat16").specs[0]
    eager, fast = ExpertFunction(spec), ExpertFunction(spec, compiled=True)
    fast._compiled = compiled.CompiledExpert(fast.act)  # its own graphs, not the process's (other tests fill those)
    e = spec.experts
    g = torch.Generator().manual_seed(7)
    calls = [(1, [0, 0, 0], [e[2], e[0], e[1]]), (3, [0, 1, 2, 2], [e[0], e[1], e[1], e[3]])]
    for T, token, expert in calls:
        inv = wire.Invocation(eager.digest, spec.layer, spec.block,
                              (torch.randn(T, spec.hidden_size, generator=g) * 4).to(torch.bfloat16),
                              torch.tensor(token, dtype=torch.int32), torch.tensor(expert, dtype=torch.int32),
                              torch.rand(len(token), generator=g))
        frame = wire.encode_invocation(inv)
        got, want = (wire.decode_result(f.handle(frame), torch.bfloat16, T, spec.hidden_size) for f in (fast, eager))
        if native_half_gemm():
            assert got.equal(want)
        else:
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)
    assert fast._compiled.on and fast._compiled.graphs  # it ran compiled code, not the eager fallback


def test_warm_up_compiles_every_graph_a_decode_call_uses(checkpoint):
    """The zygote warms a function before forking its hosts: afterwards no decode call (one token to one or
    several experts, a batch's one-token experts) compiles anything, which would stall a step for seconds. Also
    in another function of the same shape where one expert's gate and up are a pair (a shard boundary between
    them), which the zygote does not warm separately."""
    spec = Deployment.plan(Checkpoint(checkpoint("tiny")), 4, "bfloat16").specs[0]
    fn = ExpertFunction(spec, compiled=True)
    fn._compiled = compiled.CompiledExpert(fn.act)  # its own graphs, not the process's (other tests fill those)
    fn.warm_up(max_rows=4)  # this function's experts all stacked, as the one the zygote warms may be
    I = fn.down[2].shape[1]
    fn.gate_up[2] = (fn.gate_up[2][:I].clone(), fn.gate_up[2][I:].clone())  # as mapped where not adjacent
    graphs = dict(fn._compiled.graphs)
    e = spec.experts
    calls = [(1, [0], [e[1]]), (1, [0], [e[2]]), (1, [0, 0, 0], [e[2], e[0], e[3]]), (1, [0, 0], [e[1], e[2]]),
             (2, [0, 1, 1], [e[0], e[1], e[2]])]
    for T, token, expert in calls:
        inv = wire.Invocation(fn.digest, spec.layer, spec.block, torch.randn(T, spec.hidden_size).to(torch.bfloat16),
                              torch.tensor(token, dtype=torch.int32), torch.tensor(expert, dtype=torch.int32),
                              torch.rand(len(token)))
        wire.decode_result(fn.handle(wire.encode_invocation(inv)), torch.bfloat16, T, spec.hidden_size)
    assert fn._compiled.on
    assert fn._compiled.graphs == graphs and len(graphs) == 4  # stacked and pair: alone, and added to a sum


def test_a_compiler_that_fails_leaves_the_experts_eager(monkeypatch, caplog):
    def broken(gm, example_inputs, options=None):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    expert = compiled.CompiledExpert(F.silu)  # not the process's cached one
    x, gate_up, down, w = torch.randn(8), torch.randn(12, 8), torch.randn(8, 6), torch.tensor(0.5)
    want = gated_mlp(x, gate_up, down, F.silu) * w
    with caplog.at_level(logging.WARNING, logger="faasmoe.models.compiled"):
        assert expert(x, gate_up, down, w).equal(want)
        assert expert(x, gate_up, down, w, want).equal(want + want)
    assert not expert.on and not expert.graphs
    assert [r.message for r in caplog.records].count(
        "the compiled experts failed, computing them eagerly: RuntimeError: no C++ compiler") == 1


def test_an_input_error_is_raised_and_leaves_compiled_code_on():
    expert = compiled.CompiledExpert(F.silu)
    with pytest.raises(RuntimeError):
        expert(torch.randn(8), torch.randn(12, 9), torch.randn(8, 6), torch.tensor(0.5))  # shapes that do not multiply
    assert expert.on


def test_each_input_layout_gets_its_own_graph():
    """Compiled graphs have no guards: a graph serves only the layout it was traced with, so each layout (shapes,
    strides, a pair of gate and up, a sum to add to) gets its own, and each equals eager."""
    expert = compiled.CompiledExpert(F.silu)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, generator=g), torch.tensor(0.25)
    gate_up, down = torch.randn(12, 8, generator=g), torch.randn(8, 6, generator=g)
    wide = (torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g))
    pair = (gate_up[:6], gate_up[6:])
    strided = torch.randn(12, 16, generator=g)[:, ::2]
    with torch.inference_mode():
        for args in [(x, gate_up, down, w), (x, *wide, w), (x, pair, down, w), (x, strided, down, w),
                     (x, gate_up, down, w, x)]:
            torch.testing.assert_close(expert(*args), expert.eager(*args), rtol=1e-5, atol=1e-6)
    assert expert.on and len(expert.graphs) == 5


def test_compiled_experts_need_one_thread_per_instance():
    with pytest.raises(ValueError, match="compile_experts needs threads_per_instance = 1"):
        PlatformConfig(compile_experts=True, threads_per_instance=2)

"""The engine as a user drives it: generate, stats, sampling, stop rules, errors, faults."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import faasmoe
from faasmoe.control.sequence import greedy_token


@pytest.fixture(scope="module")
def engine(tiny):
    with faasmoe.load(tiny, experts_per_function=2) as e:
        yield e


def test_generate_reports_invocations_cold_starts_and_phase_times(tiny):
    with faasmoe.load(tiny, experts_per_function=4) as e:
        first = e.generate("Hello", max_tokens=6, ignore_eos=True)
        second = e.generate("Hello", max_tokens=6, ignore_eos=True)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 6
    started = first.stats["cold_starts"] + first.stats["prefetches"]  # on a call, or ahead of one (prefetch)
    assert started > 0 and first.stats["invocations"] >= first.stats["cold_starts"]
    assert second.stats["cold_starts"] == 0 and second.stats["warm_hits"] == second.stats["invocations"] > 0
    for key in ("load_s", "tokenize_s", "prefill_s", "decode_s", "total_s", "decode_ms_per_token"):
        assert second.stats[key] >= 0
    assert first.finish_reason == "length" and first.prompt_tokens == 1


def test_control_plane_leaves_half_the_cores_to_functions_on_this_machine(tiny, monkeypatch):
    """Its idle OpenMP threads would otherwise spin on the cores the local functions need; remote functions and
    the monolithic model get torch's default back (the setting is process-wide); `threads` overrides. The lm_head,
    after the last layer's calls, takes every core."""
    from faasmoe.engines import base, distributed
    from faasmoe.models import control_plane
    from faasmoe.models.kernels import linear
    from faasmoe.engines.monolithic import MonolithicEngine
    from faasmoe.platforms.local.platform import LocalPlatform

    class Elsewhere(LocalPlatform):  # functions on other machines, as far as the control plane can tell
        def shares_host_cores(self) -> bool:
            return False

    monkeypatch.setattr(base, "DEFAULT_THREADS", 6)
    monkeypatch.setattr(distributed, "DEFAULT_THREADS", 6)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with faasmoe.load(tiny, experts_per_function=4) as e:
            assert torch.get_num_threads() == 3
            head = e.control_plane.lm_head
            seen = []  # torch threads during each lm_head product

            def spy(x, w, b=None):
                if w is head:
                    seen.append(torch.get_num_threads())
                return linear(x, w, b)

            monkeypatch.setattr(control_plane, "linear", spy)
            assert e.generate("Hi", max_tokens=2).stats["threads"] == 3
            assert seen == [6, 6] and torch.get_num_threads() == 3  # the functions are idle by the lm_head
        with faasmoe.load(tiny, experts_per_function=4, platform=Elsewhere()) as e:
            assert torch.get_num_threads() == 6 and e.control_plane.head_threads is None
        with faasmoe.load(tiny, experts_per_function=4, threads=5) as e:
            assert torch.get_num_threads() == 5 and e.control_plane.head_threads is None
        with MonolithicEngine(tiny):
            assert torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(before)


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate("Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate("Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    c = engine.generate("Once upon a time", max_tokens=8, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_ends_generation_and_is_not_returned(engine):
    full = engine.generate("Hi", max_tokens=10, ignore_eos=True)
    assert len(full.text) > 2
    stop = full.text[2:4]
    cut = engine.generate("Hi", max_tokens=10, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "context"),
])
def test_requests_the_model_cannot_serve_are_refused(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("Hi", **kwargs)


def test_empty_prompt_and_unknown_token_ids_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], max_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([10**7], max_tokens=2)


def test_hosts_with_several_threads_answer_exactly(tmp_path):
    """GNU OpenMP's thread pool does not survive fork: hosts forked from a zygote that had run kernels on two
    threads hung in their first parallel region (every call timed out). Experts wide enough for torch to run
    their kernels on both threads."""
    from faasmoe.models.presets import init_model
    from faasmoe.platforms import PlatformConfig

    wide = init_model("tiny", tmp_path / "wide", seed=1, overrides={"moe_intermediate_size": 512}, progress=False)
    with faasmoe.load(wide, experts_per_function=4) as e:
        one = e.generate("Threads", max_tokens=4, ignore_eos=True)
    config = PlatformConfig(threads_per_instance=2, invoke_timeout_s=20, max_retries=0)
    with faasmoe.load(wide, experts_per_function=4, prewarm=True, platform_config=config) as e:
        two = e.generate("Threads", max_tokens=4, ignore_eos=True)
    assert two.token_ids == one.token_ids


def test_instances_killed_between_steps_change_nothing(tiny):
    with faasmoe.load(tiny, experts_per_function=1) as e:
        clean = e.generate("Fault tolerance", max_tokens=8, ignore_eos=True)
        # each host process once: a host runs several functions, and killing one already reaped would raise
        hosts = e.platform.hosts()
        assert hosts
        for pid in hosts:
            os.kill(pid, signal.SIGKILL)
        again = e.generate("Fault tolerance", max_tokens=8, ignore_eos=True)
    assert again.token_ids == clean.token_ids
    assert again.stats["crashes"] > 0 and again.stats["retries"] == again.stats["crashes"]


def test_prewarm_starts_every_function(tiny):
    with faasmoe.load(tiny, experts_per_function=4, prewarm=True) as e:
        assert len(e.platform.instances()) == len(e.specs) == 3 * 2
        result = e.generate("Hello", max_tokens=3)
    assert result.stats["cold_starts"] == 0


def test_prefetch_starts_predicted_functions_ahead_and_changes_no_answer(tiny):
    with faasmoe.load(tiny, experts_per_function=2, prefetch_layers=0) as e:
        plain = e.generate("Prefetch ahead", max_tokens=6, ignore_eos=True)
        assert e.counters()["prefetches"] == 0
    with faasmoe.load(tiny, experts_per_function=2, prefetch_layers=1) as e:
        ahead = e.generate("Prefetch ahead", max_tokens=6, ignore_eos=True)
        deadline = time.monotonic() + 60  # at the first step every function was cold: some were warmed
        while e.counters()["prefetches"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert ahead.token_ids == plain.token_ids


def test_prefetch_predicts_only_while_some_function_of_the_layer_is_cold(tiny):
    """A prediction costs a router product and a top-k per layer: made only while it could warm something."""
    with faasmoe.load(tiny, experts_per_function=2, prefetch_layers=1, prewarm=True) as e:
        e.generate("Everything is loaded", max_tokens=4, ignore_eos=True)
        assert int(e.control_plane.routing_counts().predicted.sum()) == 0
        e.platform.scale_to_zero()
        e.generate("Everything is cold again", max_tokens=4, ignore_eos=True)
        assert int(e.control_plane.routing_counts().predicted.sum()) > 0


def test_prefetch_accuracy_counts_the_predicted_experts_the_router_then_chose(tiny):
    """Per layer: pairs predicted, and per token the predicted experts among those it was routed to, checked
    against the predictions and routings the dispatcher saw."""
    with faasmoe.load(tiny, experts_per_function=2, prefetch_layers=1) as e:
        e.dispatcher.worth_prefetching = lambda i: True  # predict every layer, cold functions or not
        seen: dict[str, list] = {"predicted": [], "routed": []}
        prefetch, send = e.dispatcher.prefetch, e.dispatcher.send
        e.dispatcher.prefetch = lambda i, experts: (seen["predicted"].append((i, experts.tolist())), prefetch(i, experts))[1]
        e.dispatcher.send = lambda i, x, experts, w: (seen["routed"].append((i, experts.tolist())), send(i, x, experts, w))[1]
        out = e.generate("Predict the next layer", max_tokens=5, ignore_eos=True)
        cp = e.control_plane
        assert len(seen["predicted"]) == len(seen["routed"])  # each MoE layer of each step predicted once
        hits = torch.zeros_like(cp.predicted_hits)
        for (i, predicted), (j, routed) in zip(sorted(seen["predicted"], key=lambda p: p[0]),
                                               sorted(seen["routed"], key=lambda p: p[0])):
            assert i == j
            hits[i] += sum(len(set(p) & set(r)) for p, r in zip(predicted, routed))
        assert torch.equal(cp.predicted_hits, hits) and torch.equal(cp.predicted, cp.routed.sum(1))
        assert 0 < out.stats["prefetch_hit_pairs"] <= out.stats["prefetch_predicted_pairs"] == int(cp.routed.sum())


def test_calls_above_the_per_call_token_cap_are_split_and_exact(tiny, monkeypatch):
    """A long prefill routes more tokens to a function than one frame may carry: the calls are split."""
    prompt = "a prompt long enough to route many tokens to every function of a layer " * 2
    with faasmoe.load(tiny, experts_per_function=8) as e:
        whole = e.generate(prompt, max_tokens=4, ignore_eos=True)
    monkeypatch.setenv("FAASMOE_MAX_TOKENS_PER_CALL", "3")  # read by the dispatcher and by every instance
    with faasmoe.load(tiny, experts_per_function=8) as e:
        split = e.generate(prompt, max_tokens=4, ignore_eos=True)
    assert split.token_ids == whole.token_ids
    assert split.stats["invocations"] > whole.stats["invocations"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_picks_the_token_torch_argmax_picks(dtype):
    V = 151_936  # a real vocabulary: long enough for torch's reduction to split it
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(V, generator=g), torch.zeros(V), torch.full((V,), -float("inf"))]
    tie = torch.randn(V, generator=g)
    tie[[7, 150_000]] = tie.max() + 1  # equal maxima far apart: the first
    nan = torch.randn(V, generator=g)
    nan[[90_000, 150_000]] = float("nan")  # NaN counts as the largest: the first NaN
    for row in [*rows, tie, nan]:
        row = row.to(dtype)
        assert greedy_token(row) == int(row.argmax())

"""`faasmoe bench-engine`: the engine against the monolithic transformers model, side by side in one run.

Measured, on the same checkpoint and prompt, interleaved so machine noise hits both:
* warm decode ms/token of faasmoe vs `Qwen2MoeForCausalLM` (and whether greedy tokens match);
* the cost of one MoE layer dispatch: a layer's calls through the platform vs the same
  calls computed in this process, and the decode gap divided by the MoE layers;
* the cold start of one function vs a plain read of its weight bytes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from faasmoe.bench import cleanup
from faasmoe.bench.machine import machine_info
from faasmoe.proctitle import set_title

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def monolithic_decode(model, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """ms/token of greedy decoding with transformers' own KV cache, and the tokens."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        toks = [int(tok)]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(tok.view(1, 1), cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[0, -1].argmax()
            toks.append(int(tok))
        return 1000 * (time.perf_counter() - t0) / (tokens - 1), toks


def dispatch_cost(engine, reps: int = 30) -> dict:
    """A decode step's MoE layer calls: through the platform vs computed in-process, one thread."""
    from faasmoe.functions.expert import ExpertFunction

    engine.generate(PROMPT, max_tokens=2, ignore_eos=True)  # the last dispatch of each layer is a 1-token step
    specs = {s.id: s for s in engine.specs}
    layers = {}
    threads = torch.get_num_threads()
    for layer, calls in engine.dispatcher.last_calls.items():
        fns = [ExpertFunction(specs[fid]) for fid, _ in calls]
        rt = _median_ms(lambda: engine.platform.invoke_many(calls), reps)
        torch.set_num_threads(engine.platform.config.threads_per_instance)
        try:
            local = _median_ms(lambda: [f.handle(frame) for f, (_, frame) in zip(fns, calls)], reps)
        finally:
            torch.set_num_threads(threads)
        layers[layer] = {"calls": len(calls), "platform_ms": rt, "in_process_ms": local, "overhead_ms": rt - local}
    return {"per_layer": layers,
            "overhead_ms": statistics.mean(v["overhead_ms"] for v in layers.values()),
            "platform_ms": statistics.mean(v["platform_ms"] for v in layers.values())}


def cold_start_cost(spec, platform: str = "local", reps: int = 5, options: dict | None = None) -> dict:
    """Cold start of one function on a platform (local: fork from the zygote, map weights, ready) vs a plain
    read of its weight bytes."""
    from faasmoe.engine import prewarm_calls
    from faasmoe.platforms import PlatformConfig, create_platform
    from faasmoe.weights import read_bytes

    read = _median_ms(lambda: read_bytes(spec.tensors), reps)  # page cache warm, as for the cold starts
    frame = prewarm_calls([spec])[0][1]
    p = create_platform(platform, PlatformConfig(keep_alive_s=1.0), **(options or {}))
    p.start()
    try:
        p.deploy(spec)
        stats = p.log.function(spec.id)
        for _ in range(reps + 1):  # the first may wait for imports or deployment: not counted
            evicted = stats.evictions
            p.invoke(spec.id, frame)
            p.scale_to_zero()  # immediate on the embedded platform; Ray scales down on its own clock
            deadline = time.monotonic() + 120
            while stats.evictions == evicted and time.monotonic() < deadline:
                time.sleep(0.05)
        starts = [e for e in p.log.recent if e.kind == "cold_start"][1:]
    finally:
        p.close()
    if not starts:
        return {"bytes": spec.nbytes, "read_ms": read, "cold_start_ms": None, "load_in_instance_ms": None,
                "ratio": None}
    cold = 1000 * statistics.median(e.duration_s for e in starts)
    load = 1000 * statistics.median(e.load_s for e in starts)
    return {"bytes": spec.nbytes, "read_ms": read, "cold_start_ms": cold, "load_in_instance_ms": load,
            "ratio": cold / read, "samples": len(starts)}


def ensure_model(model: Path, layers: int) -> Path:
    from faasmoe.init_model import init_model

    if not (model / "config.json").is_file():
        print(f"creating {model} (Qwen1.5-MoE-A2.7B dimensions, {layers} layers, bf16)")
        init_model("qwen1.5-moe-a2.7b", model, layers=layers)
    return model


def run_engine_bench(model: Path, layers: int = 2, tokens: int = 32, repeats: int = 3,
                     ks: list[int] = (1, 4), platforms: list[str] = ("local",)) -> dict:
    import faasmoe
    from faasmoe.platforms import PlatformConfig
    from transformers import Qwen2MoeForCausalLM

    set_title("bench-engine")
    ensure_model(Path(model), layers)
    mono = Qwen2MoeForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    mono.eval()
    report = {"machine": machine_info(), "model": str(model), "tokens": tokens, "repeats": repeats, "runs": {}}
    # The platforms' temporary folders (instance sockets) go in one the janitor removes even after a SIGKILL.
    workdir, previous_tmp = cleanup.make_workdir("faasmoe-bench-engine-"), tempfile.tempdir
    tempfile.tempdir = str(workdir)
    try:
        for k in ks:
            for platform in platforms:
                set_title("bench-engine", platform, f"k={k}")
                with faasmoe.load(model, experts_per_function=k, platform=platform, prewarm=True,
                                  platform_config=PlatformConfig(keep_alive_s=3600)) as engine:
                    run = _measure(engine, mono, tokens, repeats)
                run["platform"] = platform
                run["cold_start"] = cold_start_cost(engine.specs[0], platform)
                report["runs"][f"{platform}/k{k}"] = run
                _print_run(run)
    finally:
        tempfile.tempdir = previous_tmp
        cleanup.remove_workdir(workdir)
    return report


def _measure(engine, mono, tokens: int, repeats: int) -> dict:
    ids = engine.encode(PROMPT)
    engine.generate(ids, max_tokens=4, ignore_eos=True)  # warm every path once
    mono_ms, faas_ms, same = [], [], []
    for _ in range(repeats):  # interleaved: noise hits both sides alike
        m, mono_tokens = monolithic_decode(mono, ids, tokens)
        g = engine.generate(ids, max_tokens=tokens, ignore_eos=True)
        mono_ms.append(m)
        faas_ms.append(g.stats["decode_ms_per_token"])
        same.append(g.token_ids == mono_tokens)
    moe_layers = len(engine.checkpoint.moe_layers())
    run = {
        "experts_per_function": engine.experts_per_function, "functions": len(engine.specs),
        "monolithic_ms_per_token": statistics.median(mono_ms), "faasmoe_ms_per_token": statistics.median(faas_ms),
        "greedy_tokens_match": all(same),
        "invocations_per_token": g.stats["invocations"] / g.stats["completion_tokens"],
    }
    run["ratio"] = run["faasmoe_ms_per_token"] / run["monolithic_ms_per_token"]
    run["decode_gap_per_moe_layer_ms"] = (run["faasmoe_ms_per_token"] - run["monolithic_ms_per_token"]) / moe_layers
    run["dispatch"] = dispatch_cost(engine)
    return run


def _print_run(r: dict) -> None:
    d, c = r["dispatch"], r["cold_start"]
    print(f"{r['platform']} k={r['experts_per_function']:<3} decode: faasmoe {r['faasmoe_ms_per_token']:.1f} ms/token vs monolithic "
          f"{r['monolithic_ms_per_token']:.1f} ({r['ratio']:.2f}x, greedy tokens match: {r['greedy_tokens_match']}), "
          f"{r['invocations_per_token']:.1f} invocations/token")
    print(f"       MoE layer dispatch: {d['platform_ms']:.2f} ms through the platform, overhead "
          f"{d['overhead_ms']:+.2f} ms vs in-process; decode gap {r['decode_gap_per_moe_layer_ms']:+.2f} ms per MoE layer")
    if c["cold_start_ms"] is None:
        print("       cold start: not observed")
        return
    print(f"       cold start: {c['cold_start_ms']:.1f} ms (weight load {c['load_in_instance_ms']:.1f} ms) vs plain read of "
          f"its {c['bytes'] / 2**20:.1f} MiB {c['read_ms']:.1f} ms ({c['ratio']:.2f}x)")

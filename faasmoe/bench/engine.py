"""`faasmoe bench-engine`: the engine against the monolithic transformers model (and peers), side by side in one run.

Measured, on the same checkpoint and prompt, interleaved so machine noise hits both:
* warm decode ms/token of faasmoe vs the family's transformers model (and whether greedy tokens match);
* with `--peer llama.cpp`, llama.cpp's own `llama-bench` decode on the same checkpoint converted to GGUF (same
  dtype, threads and cached positions), measured first, with nothing else loaded, and again after the engines
  (the ratios use the mean of the two: the machine's speed drifts);
* the cost of one MoE layer dispatch: a layer's calls through the platform vs the same
  calls computed in this process, and the decode gap divided by the MoE layers;
* an int8 checkpoint (`faasmoe quantize`) is compared with transformers on its weights dequantized and with
  llama.cpp's q8_0 conversion of those;
* the cold start of one function vs a plain read of its weight bytes, both with the weights in the
  page cache (warm) and with them evicted first (cold: read from the disk), measured once every
  decode run is done and the monolithic model, which maps part of the checkpoint, is freed.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from faasmoe.bench import cleanup
from faasmoe.bench.machine import machine_info
from faasmoe.engines.base import DEFAULT_THREADS
from faasmoe.models.kernels import torch_threads
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

    engine.dispatcher.keep_calls = True
    engine.generate(PROMPT, max_tokens=2, ignore_eos=True)  # the last dispatch of each layer is a 1-token step
    engine.dispatcher.keep_calls = False
    specs = {s.id: s for s in engine.specs}
    layers = {}
    for layer, calls in engine.dispatcher.last_calls.items():
        fns = [ExpertFunction(specs[fid], compiled=engine.platform.config.compile_experts) for fid, _ in calls]
        rt = _median_ms(lambda: engine.platform.invoke_many(calls), reps)
        with torch_threads(engine.platform.config.threads_per_instance):
            local = _median_ms(lambda: [f.handle(frame) for f, (_, frame) in zip(fns, calls)], reps)
        layers[layer] = {"calls": len(calls), "platform_ms": rt, "in_process_ms": local, "overhead_ms": rt - local}
    return {"per_layer": layers,
            "overhead_ms": statistics.mean(v["overhead_ms"] for v in layers.values()),
            "platform_ms": statistics.mean(v["platform_ms"] for v in layers.values())}


def _resident(ranges) -> int:
    from faasmoe.metering.pagecache import resident_range

    return sum(resident_range(f, off, n) for f, off, n in ranges)


def _set_cache(spec, cold: bool) -> int:
    """Evict the function's weight bytes (cold) or read them in (warm); returns how many are resident after."""
    from faasmoe.metering.pagecache import evict_ranges
    from faasmoe.models.weights import read_bytes

    ranges = spec.ranges
    if cold:  # whole 2 MiB blocks around each tensor: a large folio that straddles a tensor's edge goes too
        evict_ranges(ranges)
    elif _resident(ranges) < spec.nbytes:
        read_bytes(spec.tensors)
    return _resident(ranges)


def _wait_exited(pids: list[int], timeout: float = 30.0) -> None:
    """Until every pid has exited: its mappings (which keep pages in the cache) go with it."""
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.005)


def plain_read_cost(spec, cold: bool, reps: int = 5) -> dict:
    """`preadv` of the function's weight bytes into fresh memory, median of `reps`, from a warm or an evicted
    page cache; `resident_before_bytes` is the most of them that were in the cache before a read."""
    from faasmoe.models.weights import read_bytes

    times, resident = [], []
    for _ in range(reps):
        resident.append(_set_cache(spec, cold))
        t0 = time.perf_counter()
        read_bytes(spec.tensors)
        times.append(time.perf_counter() - t0)
    return {"read_ms": 1000 * statistics.median(times), "resident_before_bytes": max(resident),
            "resident_before_min_bytes": min(resident)}


def cold_start_cost(spec, platform: str = "local", reps: int = 5, options: dict | None = None,
                    neighbour=None) -> dict:
    """Cold start of one function on a platform, with the host it runs in started for it (local: a fork from the
    zygote; ray: a Ray actor), against a plain read of its weight bytes, twice: with the weights in the page
    cache ("warm": a serving host that has read the checkpoint before) and with the function's byte ranges
    evicted first ("cold": posix_fadvise DONTNEED, checked with mincore; the weights come from the disk). Warm
    figures also at the top level. With `neighbour` (another function's spec), also its cold start into a host
    that is running already, holding the neighbour ("on_running_host", warm page cache): a weight load."""
    out = {"bytes": spec.nbytes}
    for state in ("warm", "cold"):
        run = {**plain_read_cost(spec, state == "cold", reps), **_cold_starts(spec, platform, reps, options,
                                                                             state == "cold")}
        run["ratio"] = run["cold_start_ms"] / run["read_ms"] if run["cold_start_ms"] is not None else None
        # the check: a cold run had none of the bytes in the cache, a warm one all of them, before each read or start
        run["page_cache_as_intended"] = (run["resident_before_bytes"] == 0 and run["start_resident_before_bytes"] == 0
                                         if state == "cold" else
                                         run["resident_before_min_bytes"] == spec.nbytes
                                         and run["start_resident_before_min_bytes"] == spec.nbytes)
        out[state] = run
    out.update({key: out["warm"][key] for key in ("read_ms", "cold_start_ms", "load_in_instance_ms", "ratio")})
    if neighbour is not None:
        out["on_running_host"] = _cold_starts_on_running_host(spec, neighbour, platform, reps, options)
    return out


def _cold_starts_on_running_host(spec, neighbour, platform: str, reps: int, options: dict | None) -> dict:
    """The function loaded, called and unloaded again `reps` times in one host kept running by `neighbour`:
    the wall-clock time of the call that loads it (what the caller waits: request, load, compute, reply) and of
    a warm call right after it."""
    from faasmoe.control.deployment import prewarm_calls
    from faasmoe.platforms import PlatformConfig, create_platform

    (_, frame), (_, keep) = prewarm_calls([spec, neighbour])
    p = create_platform(platform, PlatformConfig(keep_alive_s=3600), **(options or {}))
    p.start()
    cold_ms, warm_ms = [], []
    try:
        p.deploy(spec)
        p.deploy(neighbour)
        p.invoke(neighbour.id, keep)  # starts the host
        hosts = set(p.hosts())
        for i in range(reps + 1):  # the first may find the weights' kernels cold: not counted
            _set_cache(spec, cold=False)
            t0 = time.perf_counter()
            p.invoke(spec.id, frame)
            t1 = time.perf_counter()
            p.invoke(spec.id, frame)
            t2 = time.perf_counter()
            if i:
                cold_ms.append(1000 * (t1 - t0))
                warm_ms.append(1000 * (t2 - t1))
            p.scale_to_zero([spec.id])
        loads = [e.load_s for e in p.log.recent if e.kind == "cold_start" and e.function == spec.id][1:]
        same_host = set(p.hosts()) == hosts
    finally:
        p.close()
    return {"samples": len(cold_ms), "same_host": same_host, "cold_start_ms": statistics.median(cold_ms),
            "warm_call_ms": statistics.median(warm_ms),
            "load_in_instance_ms": 1000 * statistics.median(loads) if loads else None}


def _cold_starts(spec, platform: str, reps: int, options: dict | None, cold: bool) -> dict:
    from faasmoe.control.deployment import prewarm_calls
    from faasmoe.platforms import PlatformConfig, create_platform

    frame = prewarm_calls([spec])[0][1]
    resident = []
    p = create_platform(platform, PlatformConfig(keep_alive_s=1.0), **(options or {}))
    p.start()
    try:
        p.deploy(spec)
        stats = p.log.function(spec.id)
        for i in range(reps + 1):  # the first may wait for imports or deployment: not counted
            r = _set_cache(spec, cold)
            if i:
                resident.append(r)
            evicted = stats.evictions
            p.invoke(spec.id, frame)
            pids = [inst.pid for inst in p.instances() if inst.function == spec.id]
            p.scale_to_zero()  # the function unloaded, and its host, holding nothing, stopped
            deadline = time.monotonic() + 120
            while stats.evictions == evicted and time.monotonic() < deadline:
                time.sleep(0.05)
            if cold:
                _wait_exited(pids)
        starts = [e for e in p.log.recent if e.kind == "cold_start"][1:]
    finally:
        p.close()
    out = {"start_resident_before_bytes": max(resident), "start_resident_before_min_bytes": min(resident),
           "samples": len(starts)}
    if not starts:
        return {**out, "cold_start_ms": None, "load_in_instance_ms": None}
    return {**out, "cold_start_ms": 1000 * statistics.median(e.duration_s for e in starts),
            "load_in_instance_ms": 1000 * statistics.median(e.load_s for e in starts)}


def ensure_model(model: Path, layers: int, preset: str = "qwen1.5-moe-a2.7b") -> Path:
    from faasmoe.models.presets import init_model

    if not (model / "config.json").is_file():
        print(f"creating {model} ({preset} dimensions, {layers} layers, bf16)")
        init_model(preset, model, layers=layers)
    return model


def peer_decode(peer: str, model: Path, tokens: int, repeats: int) -> dict:
    """A peer engine's warm single-request decode on the same checkpoint, dtype and threads."""
    from transformers import AutoTokenizer

    from faasmoe.bench import llamacpp

    if peer != "llama.cpp":
        raise ValueError(f"unknown peer {peer!r}; supported: llama.cpp")
    depth = len(AutoTokenizer.from_pretrained(str(model), local_files_only=True).encode(PROMPT))
    gguf = llamacpp.gguf_for(model)
    return {**llamacpp.decode_ms_per_token(gguf, torch.get_num_threads(), tokens, depth, repeats),
            "outtype": gguf.stem.rsplit("-", 1)[-1]}


def own_monolithic_decode(model: Path, tokens: int, repeats: int) -> dict:
    """faasmoe's control plane with every expert resident in the process (the Baseline's engine): where the
    engine stands without any function call."""
    from faasmoe.engines.monolithic import MonolithicEngine

    with MonolithicEngine(model) as engine:
        ids = engine.encode(PROMPT)
        engine.generate(ids, max_tokens=4, ignore_eos=True)
        runs = [engine.generate(ids, max_tokens=tokens, ignore_eos=True) for _ in range(repeats)]
    return {"ms_per_token": statistics.median(g.stats["decode_ms_per_token"] for g in runs),
            "token_ids": runs[0].token_ids}


def run_engine_bench(model: Path, layers: int = 2, tokens: int = 32, repeats: int = 3,
                     ks: list[int] = (1, 4), platforms: list[str] = ("local",), peers: list[str] = (),
                     preset: str = "qwen1.5-moe-a2.7b", compile_experts: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    import faasmoe
    from faasmoe.platforms import PlatformConfig

    from faasmoe.models.checkpoint import Checkpoint
    from faasmoe.models.quantize import dequantize_checkpoint

    set_title("bench-engine")
    ensure_model(Path(model), layers, preset)
    report = {"machine": machine_info(), "model": str(model), "tokens": tokens, "repeats": repeats, "runs": {},
              "peers": {}, "compile_experts": compile_experts}
    # The platforms' temporary folders (instance sockets) go in one the janitor removes even after a SIGKILL.
    workdir, previous_tmp = cleanup.make_workdir("faasmoe-bench-engine-"), tempfile.tempdir
    tempfile.tempdir = str(workdir)
    try:
        for peer in peers:  # first, with nothing else loaded
            set_title("bench-engine", peer)
            report["peers"][peer] = p = peer_decode(peer, Path(model), tokens, repeats)
            print(f"{peer} ({p['outtype']}): {p['ms_per_token']:.1f} ms/token ({p['threads']} threads, {p['depth']} "
                  f"positions cached)" + ("" if p["repack"] else "; its repacked (AMX) kernels die with SIGILL "
                                                                  "here: run with --repack 0"))
        # an int8 checkpoint: transformers runs the same weights dequantized (llama.cpp ran its q8_0 of them)
        reference = Path(model)
        if Checkpoint(model).scales:
            reference = dequantize_checkpoint(model, workdir / "dequantized")
            report["reference"] = "int8 checkpoint: transformers on its weights dequantized, llama.cpp q8_0 of them"
        set_title("bench-engine", "monolithic")
        report["faasmoe_monolithic"] = own_monolithic_decode(Path(model), tokens, repeats)
        print(f"faasmoe's own monolithic model (every expert in-process, as `serve --mode monolithic`): "
              f"{report['faasmoe_monolithic']['ms_per_token']:.1f} ms/token")
        mono = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.bfloat16)
        mono.eval()
        first_specs = {}
        for k in ks:
            for platform in platforms:
                set_title("bench-engine", platform, f"k={k}")
                with faasmoe.load(model, experts_per_function=k, platform=platform, prewarm=True,
                                  platform_config=PlatformConfig(keep_alive_s=3600,
                                                                 compile_experts=compile_experts)) as engine:
                    run = _measure(engine, mono, tokens, repeats)
                run["platform"] = platform
                run.update(_vs_peers(report, run["faasmoe_ms_per_token"]))
                run["vs_faasmoe_monolithic"] = (run["faasmoe_ms_per_token"]
                                                / report["faasmoe_monolithic"]["ms_per_token"])
                report["runs"][f"{platform}/k{k}"] = run
                first_specs[f"{platform}/k{k}"] = engine.specs[:2]
                _print_run(run)
                del engine
        # Cold starts last: pages a live process maps stay in the page cache whatever it is advised, and the
        # monolithic model (and the engines' in-process handlers) map parts of the checkpoint.
        del mono
        gc.collect()
        bracket_peers(report, tokens, repeats)  # again with nothing else loaded, as the first time
        for key, (spec, *neighbour) in first_specs.items():
            run = report["runs"][key]
            set_title("bench-engine", run["platform"], f"k={run['experts_per_function']}", "cold starts")
            run["cold_start"] = cold_start_cost(spec, run["platform"], neighbour=neighbour[0] if neighbour else None)
            _print_cold_start(run)
    finally:
        tempfile.tempdir = previous_tmp
        cleanup.remove_workdir(workdir)
    return report


def bracket_peers(report: dict, tokens: int, repeats: int) -> None:
    """Measure each peer again after the engines, with the threads of its first measurement, and compare the
    engines with the mean of its two figures: this machine's memory bandwidth drifts by tens of percent within
    minutes, and a peer measured only at the start would credit or charge the drift to faasmoe. The report keeps
    `ms_per_token` (the first), `ms_per_token_last` and `ms_per_token_mean`."""
    for peer, p in report["peers"].items():
        set_title("bench-engine", peer, "again")
        try:
            with torch_threads(p["threads"]):  # the engines changed the process's count since the first time
                last = peer_decode(peer, Path(report["model"]), tokens, repeats)["ms_per_token"]
        except Exception as e:  # noqa: BLE001 - the engines' figures stand, against the first figure
            p["again_error"] = f"{type(e).__name__}: {e}"
            print(f"{peer} again after the engines: failed ({p['again_error']}); the ratios keep the first figure")
            continue
        p["ms_per_token_last"], p["ms_per_token_mean"] = last, (p["ms_per_token"] + last) / 2
        print(f"{peer} again after the engines: {last:.1f} ms/token (first {p['ms_per_token']:.1f}); the ratios "
              f"use their mean, {p['ms_per_token_mean']:.1f}")
    mono = report.get("faasmoe_monolithic")
    for run in report["runs"].values():
        run.update(_vs_peers(report, run["faasmoe_ms_per_token"]))
    if mono:
        mono.update(_vs_peers(report, mono["ms_per_token"]))
    for peer in report["peers"]:
        print(f"       x {peer}: " + ", ".join(
            [*(f"{key} {run[f'vs_{peer}']:.2f}x" for key, run in report["runs"].items()),
             *([f"faasmoe's monolithic model {mono[f'vs_{peer}']:.2f}x"] if mono else [])]))


def _vs_peers(report: dict, ms_per_token: float) -> dict[str, float]:
    """`vs_<peer>`: ms_per_token over each peer's figure (the mean of its two, once it has been measured again)."""
    return {f"vs_{peer}": ms_per_token / p.get("ms_per_token_mean", p["ms_per_token"])
            for peer, p in report["peers"].items()}


def _measure(engine, mono, tokens: int, repeats: int) -> dict:
    ids = engine.encode(PROMPT)
    engine.generate(ids, max_tokens=4, ignore_eos=True)  # warm every path once
    mono_ms, faas_ms, same = [], [], []
    for _ in range(repeats):  # interleaved: noise hits both sides alike
        with torch_threads(DEFAULT_THREADS):  # the engine's control plane may take fewer (next to its functions)
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
    d = r["dispatch"]
    print(f"{r['platform']} k={r['experts_per_function']:<3} decode: faasmoe {r['faasmoe_ms_per_token']:.1f} ms/token vs monolithic "
          f"{r['monolithic_ms_per_token']:.1f} ({r['ratio']:.2f}x, greedy tokens match: {r['greedy_tokens_match']}), "
          f"{r['invocations_per_token']:.1f} invocations/token"
          + "".join(f"; {v:.2f}x {k[3:]}" for k, v in r.items() if k.startswith("vs_")))
    print(f"       MoE layer dispatch: {d['platform_ms']:.2f} ms through the platform, overhead "
          f"{d['overhead_ms']:+.2f} ms vs in-process; decode gap {r['decode_gap_per_moe_layer_ms']:+.2f} ms per MoE layer")


def _print_cold_start(r: dict) -> None:
    c = r["cold_start"]
    print(f"{r['platform']} k={r['experts_per_function']:<3} cold start of one function ({c['bytes'] / 2**20:.1f} MiB of weights) "
          f"with its host started for it:")
    for state, what in (("warm", "weights in the page cache"), ("cold", "weights evicted first")):
        s = c[state]
        check = "" if s["page_cache_as_intended"] else (
            f" [page cache not as intended: {s['resident_before_bytes']}/{s['start_resident_before_bytes']} bytes"
            " resident before the reads/starts]")
        if s["cold_start_ms"] is None:
            print(f"       {state} ({what}): not observed; plain read {s['read_ms']:.1f} ms{check}")
            continue
        print(f"       {state} ({what}): {s['cold_start_ms']:.1f} ms (weight load {s['load_in_instance_ms']:.1f} ms)"
              f" vs plain read {s['read_ms']:.1f} ms ({s['ratio']:.2f}x){check}")
    h = c.get("on_running_host")
    if h:
        print(f"       into a running host (weights in the page cache): {h['cold_start_ms']:.1f} ms a call that loads it "
              f"(weight load {h['load_in_instance_ms']:.1f} ms), {h['warm_call_ms']:.2f} ms a warm call "
              f"({h['samples']} samples)")

"""The `faasmoe` command line: serve, generate, init-model, quantize, align, package, bench, bench-engine."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from faasmoe.bench.defaults import DEFAULTS, describe
from faasmoe.platforms.base import PlatformConfig
from faasmoe.serving.config import ServerConfig, TenantConfig

# Plain click-style help: typer's rich panels show flags as `<bool>` and squeeze the text into a column.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
                  help="Serve Mixture-of-Experts models with every expert a scale-to-zero FaaS function.\n\n"
                       "Start with `faasmoe serve` (an OpenAI-compatible server on 127.0.0.1:8000); "
                       "every command explains itself with --help.")

_SERVE = ServerConfig.model_fields
_TENANT = TenantConfig.model_fields
_SCALING = PlatformConfig.model_fields


def _d(field: str) -> Any:
    """A setting's default, shown in --help (the flags default to it, the config file may override it)."""
    for fields in (_TENANT, _SCALING, _SERVE):
        if field in fields:
            return fields[field].default
    raise KeyError(field)


def _print_version(value: bool) -> None:
    if value:
        from faasmoe import __version__

        typer.echo(f"faasmoe {__version__}")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the version and exit.")) -> None:
    """Checks shared by every command."""
    if ctx.invoked_subcommand == "bench" and importlib.util.find_spec("matplotlib") is None:
        _fail("faasmoe bench draws plots with matplotlib, which is not installed: pip install -e '.[bench]'")


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("init-model", short_help="Write a checkpoint with random weights (tests, demos).")
def init_model_cmd(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Directory to write the checkpoint into."),
    preset: str = typer.Option("tiny", metavar="NAME", help="Architecture: tiny (tests, demos), qwen1.5-moe-a2.7b "
                                                            "(the real model's sizes), qwen1.5-moe-a2.7b-quarter "
                                                            "(its structure, every matrix dimension / 4); other "
                                                            "families at published sizes: qwen3-30b-a3b, "
                                                            "mixtral-8x7b, olmoe-1b-7b, deepseek-v2-lite, "
                                                            "moonlight-16b-a3b (DeepSeek-V3); tiny "
                                                            "ones: tiny-qwen3-moe, tiny-mixtral, tiny-olmoe, "
                                                            "tiny-deepseek-v2, tiny-deepseek-v3."),
    layers: Optional[int] = typer.Option(None, metavar="N", show_default="the preset's",
                                         help="Number of decoder layers."),
    seed: int = typer.Option(0, metavar="N", help="Seed of the random weights; the same seed writes the same "
                                                   "weights."),
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="the preset's",
                                        help="float32, bfloat16 or float16."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                                   help="Override a config field (VALUE read as JSON), repeatable; "
                                        "e.g. --set norm_topk_prob=true --set decoder_sparse_step=2."),
    router_skew: str = typer.Option("uniform", "--router-skew", metavar="LEVEL|ALPHA",
                                    help="Synthetic expert popularity per router: uniform, mild, strong or a "
                                         "number >= 0 (0 = uniform random routers)."),
    int8: bool = typer.Option(False, "--int8", help="Store experts, MLPs and lm_head in int8 (as `faasmoe "
                                                     "quantize` does)."),
) -> None:
    """Write a MoE checkpoint with RANDOM weights (config, sharded safetensors, Qwen tokenizer).

    The model generates gibberish: it is for tests, demos and benchmarks, which measure the system, not
    the text. To serve a real model, download a Hugging Face checkpoint directory (e.g.
    Qwen1.5-MoE-A2.7B) and pass it to --model.
    """
    from faasmoe.models.presets import init_model

    overrides = _parse_sets(set_)
    if dtype:
        overrides["dtype"] = dtype
    try:
        path = init_model(preset, out, layers=layers, seed=seed, overrides=overrides, router_skew=router_skew,
                          int8=int8)
    except (ValueError, TypeError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@app.command("quantize", short_help="Write an int8 copy of a checkpoint: half the bytes read per token.")
def quantize_cmd(
    model: Path = typer.Option(..., "--model", metavar="DIR", help="Checkpoint directory to quantize (left as "
                                                                    "it is)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="New directory for the int8 checkpoint."),
    only: list[str] = typer.Option([], "--only", metavar="GROUP", show_default="all three",
                                   help="Quantize only this group, repeatable: experts (routed experts), mlp "
                                        "(shared experts, dense MLPs), lm_head."),
    compare: bool = typer.Option(True, help="Then run both models on a sample text and print how far the int8 "
                                            "model's logits are from the original's (one model in memory at a "
                                            "time, weights mapped)."),
) -> None:
    """Write a copy of a checkpoint with its experts, MLPs and lm_head in int8 (weight-only, one scale per row).

    Every decode step reads these matrices once, and on a CPU that reading is most of the step's time: in int8
    it is half the bytes (attention, routers and embeddings stay as they are). Serve the new directory like any
    checkpoint (`faasmoe serve --model DIR`); functions, metering and memory budgets see its smaller experts.
    It is a different model (each weight rounded to one of 255 levels of its row): --compare reports how
    different. transformers does not read this format (it warns about quant_method "faasmoe" and would take the
    int8 numbers for weights).
    """
    from faasmoe.models.checkpoint import Checkpoint, CheckpointError
    from faasmoe.models.quantize import GROUPS, SAMPLE_TEXT, compare_logits, quantize_checkpoint

    try:
        path = quantize_checkpoint(model, out, tuple(dict.fromkeys(only)) or GROUPS)
    except (CheckpointError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")
    if (dtype := Checkpoint(path).dtype) != "bfloat16":
        typer.echo(f"note: the model computes in {dtype}, where torch has no fast int8 kernel: it will decode "
                   f"slower than the original, not faster (int8 pays in bfloat16)")
    if compare:
        d = compare_logits(model, path, SAMPLE_TEXT)
        typer.echo(f"logits over {d['positions']} positions of a sample text: max |difference| "
                   f"{d['max_abs_logit_difference']:.4g}, mean {d['mean_abs_logit_difference']:.4g} (mean |logit| "
                   f"{d['logit_scale']:.4g}); the same top token at {100 * d['top1_agreement']:.1f} % of them")


@app.command("align", short_help="Rewrite a checkpoint's shards with 64-byte aligned tensors (faster decode).")
def align_cmd(model: Path = typer.Argument(..., metavar="DIR", help="Checkpoint directory, rewritten in place.")) -> None:
    """Rewrite a checkpoint's safetensors shards so that every tensor starts on a 64-byte boundary.

    faasmoe maps the weights straight from these files, and bf16 matrix-vector products run 1.3-2x slower on
    tensors that are not 64-byte aligned (safetensors aligns them to 8 bytes). The tensors' names, shapes and
    values stay the same for every reader (transformers included); their order in the file and the header's
    padding change, and so does the checkpoint's digest (rebuild `faasmoe package` output after). Run it once,
    while nothing serves the checkpoint (a shard some process has open is refused). Checkpoints written by
    init-model are aligned already.
    """
    from faasmoe.models.align import align_checkpoint
    from faasmoe.models.checkpoint import CheckpointError

    try:
        files = align_checkpoint(model)
    except (CheckpointError, OSError) as e:
        _fail(str(e))
    if files:
        typer.echo(f"rewrote {len(files)} shard(s) of {model} with 64-byte aligned tensors")
    else:
        typer.echo(f"{model}: already aligned")


MEMORY_BUDGET_OPTION = typer.Option(
    None, metavar="SIZE", show_default="none",
    help="Expert weight bytes the local platform may hold in memory, e.g. 14GiB: a cold start past it first "
         "unloads idle functions (those of the layers needed last in a decode step) and drops their pages from the "
         "page cache.")

COMPILE_EXPERTS_OPTION = typer.Option(
    _d("compile_experts"), "--compile-experts/--no-compile-experts",
    help="Compute a one-token call's experts as code compiled by torch's inductor (needs a C++ compiler; seconds to "
         "compile once per process, cached in ~/.cache/faasmoe/inductor): a bf16 expert 3-4x faster on the Zen 4 EPYC "
         "measured. Off: eager torch.")

# Where the expert functions run besides the embedded platform: the same flags for generate and serve.
FUNCTIONS_OPTION = typer.Option(None, "--functions", metavar="FILE",
                                help="http platform: the manifest written by `faasmoe package`.")
FUNCTION_TOKEN_OPTION = typer.Option(None, "--function-token", metavar="TOKEN",
                                     help="http platform: token sent as X-Faasmoe-Token.")
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", metavar="HOST:PORT", show_default="start a local Ray on 127.0.0.1",
                                  help="ray platform: the cluster to join.")




@app.command(short_help="Generate once from the command line.")
def generate(
    model: Path = typer.Option(..., metavar="DIR", help="A MoE checkpoint directory (Hugging Face layout): "
                                                        "Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2 or V3."),
    prompt: str = typer.Option(..., metavar="TEXT", help="The prompt text."),
    max_tokens: int = typer.Option(32, metavar="N", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, metavar="T", help="Sampling temperature; 0 decodes greedily."),
    top_p: float = typer.Option(1.0, metavar="P", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, metavar="N", show_default="random",
                                       help="Sampling seed (with temperature > 0)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template as a user message."),
    experts_per_function: int = typer.Option(1, "--experts-per-function", "-k", metavar="K",
                                             help="Experts per function, 1 .. all experts of a layer."),
    platform: str = typer.Option("local", metavar="NAME", help="FaaS platform that runs the expert functions: local "
                                                               "(embedded), http (functions hosted elsewhere, see "
                                                               "--functions) or ray."),
    functions: Optional[Path] = FUNCTIONS_OPTION,
    function_token: Optional[str] = FUNCTION_TOKEN_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    keep_alive: float = typer.Option(_d("keep_alive_s"), metavar="SECONDS",
                                     help="How long an idle function instance stays warm."),
    max_instances: int = typer.Option(_d("max_instances"), metavar="N",
                                      help="Instances per function under concurrent load (local platform: host "
                                           "processes, each of which loads any function)."),
    invoke_timeout: float = typer.Option(_d("invoke_timeout_s"), metavar="SECONDS",
                                         help="A function call taking longer is abandoned and retried."),
    memory_budget: Optional[str] = MEMORY_BUDGET_OPTION,
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="the checkpoint's",
                                        help="Compute dtype: float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print {text, token_ids, stats} as JSON."),
) -> None:
    """Generate text with the experts running as functions on a FaaS platform."""
    import faasmoe
    from faasmoe.models.checkpoint import CheckpointError
    from faasmoe.platforms import platform_options

    try:
        options = platform_options(platform, functions, function_token, ray_address)
        scaling = PlatformConfig(keep_alive_s=keep_alive, max_instances=max_instances,
                                 invoke_timeout_s=invoke_timeout, memory_budget=memory_budget)
        engine = faasmoe.load(model, experts_per_function=experts_per_function, platform=platform, dtype=dtype,
                              platform_config=scaling, platform_options=options)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    with engine:
        text = prompt
        if chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        try:
            result = engine.generate(text, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        except ValueError as e:
            _fail(str(e))
    if as_json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return
    typer.echo(result.text)
    s = result.stats
    typer.secho(f"[{s['completion_tokens']} tokens, prefill {s['prefill_s'] * 1000:.0f} ms, "
                f"decode {s['decode_ms_per_token'] or 0:.1f} ms/token, {s['invocations']} invocations, "
                f"{s['cold_starts']} cold starts, {s['warm_hits']} warm hits]", fg=typer.colors.BRIGHT_BLACK, err=True)


@app.command("bench-engine", short_help="faasmoe vs the monolithic model, one request.")
def bench_engine_cmd(
    model: Path = typer.Option(Path("models/qwen1.5-moe-a2.7b-2l"), metavar="DIR",
                               help="Checkpoint (created with random weights if missing)."),
    layers: int = typer.Option(2, metavar="N", help="Layers of the real preset when the checkpoint must be created."),
    preset: str = typer.Option("qwen1.5-moe-a2.7b", metavar="NAME",
                               help="Preset of the checkpoint when it must be created (`faasmoe init-model --help`)."),
    tokens: int = typer.Option(32, metavar="N", help="Tokens to decode per measured run."),
    repeats: int = typer.Option(3, metavar="N", help="Measured runs of each side, interleaved."),
    experts_per_function: list[int] = typer.Option([1, 4], "--experts-per-function", "-k", metavar="K",
                                                   help="Granularities to measure, repeatable."),
    platform: list[str] = typer.Option(["local"], metavar="NAME", help="Platforms to measure, repeatable: local, ray."),
    peer: list[str] = typer.Option([], metavar="ENGINE",
                                   help="Other engines to measure on the same checkpoint: llama.cpp (build it "
                                        "first with scripts/build-llama-cpp.sh)."),
    compile_experts: bool = typer.Option(False, "--compile-experts",
                                         help="faasmoe's functions: serve --compile-experts."),
    out: Optional[Path] = typer.Option(None, metavar="FILE", help="Write the figures as JSON here."),
) -> None:
    """Side by side in one run: faasmoe (warm) vs the monolithic transformers model on the same weights."""
    unknown = set(peer) - {"llama.cpp"}
    if unknown:
        raise typer.BadParameter(f"unknown peer {sorted(unknown)}; supported: llama.cpp", param_hint="--peer")
    from faasmoe.bench.cleanup import session
    from faasmoe.bench.engine import run_engine_bench

    with session():  # SIGTERM/SIGINT/SIGHUP stop every process and folder it started, then exit 128 + signal
        report = run_engine_bench(model, layers=layers, tokens=tokens, repeats=repeats, ks=experts_per_function,
                                  platforms=platform, peers=peer, preset=preset, compile_experts=compile_experts)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


def _bytes(text: str, name: str) -> int:
    """A size such as 16GiB or 500MB, in bytes."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise typer.BadParameter(f"expected a size such as 16GiB, got {text!r}", param_hint=name) from None


def _range(text: str, name: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise typer.BadParameter(f"{name} expects MIN:MAX, got {text!r}") from None
    if not 1 <= a <= b:
        raise typer.BadParameter(f"{name} expects 1 <= MIN <= MAX, got {text!r}")
    return a, b


@app.command(short_help="Compare five multi-tenant serving strategies.")
def bench(
    out: Path = typer.Option(Path("runs/bench"), metavar="DIR",
                             help="Directory for results.json, results.md and the plots."),
    quick: bool = typer.Option(False, "--quick", help="Tiny model, one short on/off load, short keep-alive: a few "
                                                      "minutes, every strategy, evictions included."),
    model: Optional[Path] = typer.Option(None, metavar="DIR", show_default=describe("model"),
                                         help="Checkpoint (created with random weights from --preset if missing)."),
    preset: Optional[str] = typer.Option(None, metavar="NAME", show_default=describe("preset"),
                                         help="Preset of the checkpoint when it is created."),
    layers: Optional[int] = typer.Option(None, metavar="N", show_default="the preset's",
                                         help="Layers of the preset when the checkpoint is created."),
    tenants: int = typer.Option(6, metavar="N", help="Tenants sending requests."),
    rate: list[float] = typer.Option([], metavar="RPS", show_default=describe("rates"),
                                     help="Mean requests/s per tenant, repeatable: every strategy runs at each "
                                          "(tenants' own rates are weighted 1.5 : 1 : 0.5 around it)."),
    arrival: str = typer.Option("bursty", metavar="KIND",
                                help="bursty (on periods at 3x the rate, then silent off periods), poisson, or "
                                     "concurrent: every tenant at once, sending its --max-requests (default 1) "
                                     "one after another (a closed loop: --rate, --duration and the burst options "
                                     "do not apply)."),
    burst_on: Optional[float] = typer.Option(None, metavar="SECONDS", show_default=describe("burst_on_s"),
                                             help="Mean length of an on period."),
    burst_off: Optional[float] = typer.Option(None, metavar="SECONDS", show_default=describe("burst_off_s"),
                                              help="Mean length of an off period (the tenant is idle)."),
    duration: Optional[float] = typer.Option(None, metavar="SECONDS", show_default=describe("duration_s"),
                                             help="How long requests keep arriving."),
    max_requests: Optional[int] = typer.Option(None, metavar="N", show_default="no limit",
                                               help="Requests per tenant at most."),
    prompt_tokens: Optional[str] = typer.Option(None, metavar="MIN:MAX", show_default=describe("prompt_tokens"),
                                                help="Prompt length range in tokens (English text)."),
    output_tokens: Optional[str] = typer.Option(None, metavar="MIN:MAX", show_default=describe("output_tokens"),
                                                help="Output length range in tokens."),
    seed: int = typer.Option(0, metavar="N", help="Seed of the workload: the same requests for every strategy."),
    experts_per_function: Optional[int] = typer.Option(None, "--experts-per-function", "-k", metavar="K",
                                                       show_default=describe("experts_per_function"),
                                                       help="k of faasmoe's main runs."),
    keep_alive: Optional[float] = typer.Option(None, metavar="SECONDS", show_default=describe("keep_alive_s"),
                                               help="Function keep-alive of the main runs."),
    keep_alive_sweep: list[float] = typer.Option([], metavar="SECONDS", show_default=describe("keep_alive_sweep"),
                                                 help="Keep-alives to run faasmoe-shared at, repeatable (at the "
                                                      "middle rate, for each --keep-alive-k)."),
    keep_alive_k: list[int] = typer.Option([1, 4], metavar="K", help="k values of the keep-alive sweep, repeatable."),
    no_sweep: bool = typer.Option(False, "--no-sweep", help="Skip the keep-alive and granularity sweeps."),
    sweep: list[int] = typer.Option([], metavar="K", show_default="none",
                                    help="k values for a granularity sweep at the middle rate, repeatable."),
    sweep_strategy: list[str] = typer.Option([], metavar="NAME", show_default="faasmoe-private and faasmoe-shared",
                                             help="Strategies of the granularity sweep, repeatable."),
    strategy: list[str] = typer.Option([], metavar="NAME", show_default="all five",
                                       help="Strategies to run, repeatable: baseline, shared-monolithic, "
                                            "faasmoe-private, faasmoe-shared, local-distribution; and "
                                            "llama-cpp (llama.cpp's llama-server, built with "
                                            "scripts/build-llama-cpp.sh) and monolithic-mmap (shared-monolithic "
                                            "with its weights mapped, paged by the kernel), only when named."),
    platform: str = typer.Option("local", metavar="NAME", help="FaaS platform of faasmoe's strategies."),
    memory_budget: Optional[str] = typer.Option(None, metavar="SIZE", show_default="none",
                                                help="faasmoe's servers: the function pool's expert memory budget "
                                                     "(serve --memory-budget)."),
    memory_limit: Optional[str] = typer.Option(None, metavar="SIZE", show_default="none",
                                               help="Run every strategy's processes in a memory cgroup with this "
                                                    "hard limit (page cache included; a server that cannot load "
                                                    "under it is reported, not fatal). Needs a writable cgroup."),
    prefetch_layers: int = typer.Option(0, metavar="N", help="faasmoe's servers: serve --prefetch-layers."),
    compile_experts: bool = typer.Option(False, "--compile-experts",
                                         help="faasmoe's servers: serve --compile-experts."),
    chaos: bool = typer.Option(False, "--chaos", help="Instead: run faasmoe under the load twice, the second time "
                                                      "killing a random function instance every --chaos-interval "
                                                      "seconds; report completed requests and token-id mismatches."),
    chaos_interval: float = typer.Option(0.5, metavar="SECONDS", help="Time between instance kills in --chaos."),
    chaos_mode: str = typer.Option("shared", metavar="MODE", help="Server mode for --chaos: shared or private."),
) -> None:
    """Compare five ways of serving many tenants, one after the other under the same load, metered.

    \b
    baseline            a full-model server per tenant (every expert resident, its own weights, batching)
    shared-monolithic   one such server for every tenant (the strongest resource baseline)
    faasmoe-private     a control plane per tenant, experts as shared scale-to-zero functions
    faasmoe-shared      one control plane batching every tenant's tokens into each function call
    local-distribution  a control plane per tenant, expert blocks as always-on local processes

    Every strategy runs at each --rate; faasmoe-shared also at each keep-alive of the sweep. Reports per
    run: drain time next to the arrival window, physical (PSS) and billed (RSS) memory, page cache, CPU,
    resources per generated token, TTFT and TPOT p50/p99, cold starts, evictions, expert popularity; and
    a headline at the highest rate the Baseline sustains (results.json, results.md, plots under --out).
    """
    from faasmoe.bench.cleanup import session
    from faasmoe.bench.multitenant import KNOWN, make_config, run_bench
    from faasmoe.models.presets import init_model

    for s_ in [*strategy, *sweep_strategy]:
        if s_ not in KNOWN:
            _fail(f"unknown strategy {s_!r}; choose from {', '.join(KNOWN)}")
    if arrival not in ("poisson", "bursty", "concurrent"):
        _fail("--arrival is poisson, bursty or concurrent")
    if arrival == "concurrent" and rate:
        _fail("--rate does not apply to --arrival concurrent (a closed loop: each tenant's next request follows "
              "its previous one)")
    cfg = make_config(
        quick, model=model, tenants=tenants, rates=rate, arrival=arrival, burst_on_s=burst_on, burst_off_s=burst_off,
        duration_s=duration, max_requests=max_requests,
        prompt_tokens=_range(prompt_tokens, "--prompt-tokens") if prompt_tokens else None,
        output_tokens=_range(output_tokens, "--output-tokens") if output_tokens else None, seed=seed,
        experts_per_function=experts_per_function, keep_alive_s=keep_alive, keep_alive_sweep=keep_alive_sweep,
        keep_alive_ks=tuple(keep_alive_k), sweeps=not no_sweep, sweep=sweep, sweep_strategies=tuple(sweep_strategy),
        strategies=tuple(strategy), platform=platform,
        memory_budget=_bytes(memory_budget, "--memory-budget") if memory_budget else None,
        memory_limit=_bytes(memory_limit, "--memory-limit") if memory_limit else None,
        prefetch_layers=prefetch_layers, compile_experts=compile_experts)
    if not (cfg.model / "config.json").is_file():
        typer.echo(f"creating {cfg.model}")
        init_model(preset or DEFAULTS[quick]["preset"], cfg.model, layers=layers)
    if chaos:
        from faasmoe.bench.chaos import run_chaos

        with session():
            r = run_chaos(cfg, out, chaos_interval, chaos_mode)
        typer.echo(f"chaos ({r['mode']} mode, {r['tenants']} tenants, a random instance killed every "
                   f"{r['kill_interval_s']:g} s: {r['instances_killed']} kills, {r['calls_cut_by_kills']} calls "
                   f"cut and retried): {r['requests_sent']} requests sent, {r['completed']} completed "
                   f"({r['completed_percent']:.1f} %), {r['failed']} failed, "
                   f"{r['mismatches']} of {r['compared']} outputs' token ids differ from the fault-free run")
        if r["failed"] or r["mismatches"]:
            raise typer.Exit(1)
        return
    with session():  # SIGTERM/SIGINT/SIGHUP stop every process and folder it started, then exit 128 + signal
        report = run_bench(cfg, out)
    typer.echo((out / "results.md").read_text())
    errors = sum(r["errors"] for r in report["runs"])
    if errors:
        typer.secho(f"{errors} requests failed", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("package", short_help="Package the expert functions for another FaaS platform.")
def package_cmd(
    model: Path = typer.Option(..., metavar="DIR", help="The checkpoint whose experts to package."),
    target: str = typer.Option(..., metavar="NAME", help="tinyfaas, openfaas or knative."),
    out: Path = typer.Option(..., metavar="DIR", help="Directory to write the packages and manifest.json into."),
    experts_per_function: int = typer.Option(1, "--experts-per-function", "-k", metavar="K",
                                             help="Experts per function."),
    base_url: Optional[str] = typer.Option(None, metavar="TEMPLATE", show_default="the target's usual gateway form",
                                           help="URL of each function, with {name}, {port} or {index}."),
    start_port: int = typer.Option(9000, metavar="PORT", help="{port} of the first function (then +1 each)."),
    reference_weights: bool = typer.Option(False, "--reference-weights",
                                           help="Point at the checkpoint's files instead of copying each "
                                                "function's tensors into its package."),
    keep_alive: float = typer.Option(_d("keep_alive_s"), metavar="SECONDS",
                                     help="Scale-to-zero delay written into the deploy files."),
    max_instances: int = typer.Option(_d("max_instances"), metavar="N",
                                      help="Maximum instances written into the deploy files."),
) -> None:
    """Package every expert function for an external FaaS platform, plus a manifest for --platform http."""
    from faasmoe.models.checkpoint import CheckpointError
    from faasmoe.packaging.build import package

    try:
        manifest = package(model, experts_per_function, target, out, base_url=base_url, start_port=start_port,
                           copy_weights=not reference_weights, keep_alive_s=keep_alive, max_instances=max_instances)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    n = len(json.loads(manifest.read_text())["functions"])
    typer.echo(f"wrote {n} {target} function packages under {out / 'functions'} and {manifest}")
    typer.echo(f"the functions require the token in {out / 'function-token'} (0600; keep it out of version "
               f"control): faasmoe serve --platform http --functions {manifest} "
               f"--function-token \"$(cat {out / 'function-token'})\"")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed the flag (or set its environment variable), as opposed to its default, which
    must not override the config file."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _banner(cfg: ServerConfig, port: int, key_source: dict[str, str], admin_source: str) -> str:
    """What a user needs to call the server, printed once it listens, so it is the last thing on screen."""
    from faasmoe.models.align import unaligned_tensors
    from faasmoe.models.presets import has_random_weights
    from faasmoe.models.quantize import int8_groups

    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{host}:{port}"
    lines = ["=" * 78, f"faasmoe is serving {cfg.served_model_name!r} at {base}/v1 (OpenAI API; Ctrl-C stops it)",
             f"  model      {cfg.model}",
             f"  mode       {cfg.mode}; experts on the {cfg.platform} platform, {cfg.experts_per_function} per "
             f"function, keep-alive {cfg.scaling.keep_alive_s:g} s"
             + (", compiled (--compile-experts)" if cfg.scaling.compile_experts and cfg.mode != "monolithic"
                and cfg.platform in ("local", "ray") else "")]
    if unaligned := unaligned_tensors(cfg.model):
        lines += [f"  layout     {unaligned} tensors are not 64-byte aligned: decode is ~10-15 % slower than it could be;",
                  f"             stop the server and run `faasmoe align {cfg.model}` once (then rebuild any",
                  "             `faasmoe package` output: the checkpoint's digest changes)."]
    if groups := int8_groups(cfg.model):
        lines.append(f"  int8       {', '.join(groups)} stored in int8 (`faasmoe quantize`), the rest as it was")
    if has_random_weights(cfg.model):
        lines += ["  weights    RANDOM (written by `faasmoe init-model`): the text is gibberish. For a real model,",
                  "             download a checkpoint directory (Qwen-MoE, Mixtral, OLMoE, DeepSeek) and serve it",
                  "             with --model DIR."]
    lines.append("  tenants    (each sends Authorization: Bearer KEY)")
    for t in cfg.tenants:
        if cfg.key_generated(f"tenant:{t.name}"):
            lines += [f"    {t.name}: key {t.key}",
                      "      (generated anew at every start; choose one with --api-key KEY or FAASMOE_API_KEY)"]
        else:
            lines.append(f"    {t.name}: key {key_source.get(t.name, 'as configured')}")
        lines.append(f"      limits: {t.max_concurrency} requests at once, {t.tokens_per_minute} tokens/minute, "
                     f"{t.max_queued} queued")
    if cfg.key_generated("admin_key"):
        lines += [f"  admin key  {cfg.admin_key}  (for /metrics)", "             (generated; choose one with --admin-key)"]
    else:
        lines.append(f"  admin key  {admin_source}  (for /metrics)")
    first = cfg.tenants[0]
    key = first.key if cfg.key_generated(f"tenant:{first.name}") else "$KEY"
    lines += [f"  try        curl {base}/v1/completions -H \"Authorization: Bearer {key}\" \\",
              f"               -H 'Content-Type: application/json' -d '{{\"model\": \"{cfg.served_model_name}\", "
              f"\"prompt\": \"Hello\", \"max_tokens\": 16}}'"]
    if not _is_loopback(cfg.host):
        lines += [f"  WARNING    listening on {cfg.host} over plain HTTP: API keys and texts cross the network in clear.",
                  "             Put a TLS-terminating proxy in front of it, or listen on 127.0.0.1."]
    lines.append("=" * 78)
    return "\n".join(lines)


@app.command(short_help="Start the OpenAI-compatible server.")
def serve(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", show_default=False,
                                          help="TOML or YAML file with any setting below, tenants, keys and limits "
                                               "(see faasmoe.example.toml). Flags given override it."),
    host: str = typer.Option(_d("host"), metavar="ADDRESS", help="Address to listen on; anything but loopback "
                                                                 "serves plain HTTP beyond this machine."),
    port: int = typer.Option(_d("port"), metavar="PORT", help="Port to listen on."),
    model: Path = typer.Option(_d("model"), metavar="DIR",
                               help="MoE checkpoint directory (Hugging Face layout). If missing, it is created "
                                    "from --preset with RANDOM weights (gibberish text); for a real model, download "
                                    "e.g. Qwen1.5-MoE-A2.7B and point --model at its directory."),
    model_name: Optional[str] = typer.Option(None, metavar="NAME", show_default="the directory name",
                                             help="Model id clients send."),
    preset: str = typer.Option(_d("preset"), metavar="NAME", help="Preset to create at --model if it is missing: "
                                                                  "tiny or qwen1.5-moe-a2.7b."),
    layers: Optional[int] = typer.Option(None, metavar="N", show_default="the preset's",
                                         help="Layers of the created preset."),
    mode: str = typer.Option(_d("mode"), metavar="MODE",
                             help="shared: one orchestrator batching all tenants; private: one orchestrator process "
                                  "per tenant; monolithic: the full model with every expert resident in the "
                                  "server, batched, no functions, for comparison."),
    platform: str = typer.Option(_d("platform"), metavar="NAME",
                                 help="FaaS platform of the expert functions: local (embedded), http or ray."),
    functions: Optional[Path] = FUNCTIONS_OPTION,
    function_token: Optional[str] = FUNCTION_TOKEN_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    keep_alive: float = typer.Option(_d("keep_alive_s"), metavar="SECONDS",
                                     help="How long an idle function instance stays warm."),
    experts_per_function: int = typer.Option(_d("experts_per_function"), "--experts-per-function", "-k", metavar="K",
                                             help="Experts per function, 1 .. all experts of a layer."),
    max_instances: int = typer.Option(_d("max_instances"), metavar="N", help="Instances per function under load."),
    memory_budget: Optional[str] = MEMORY_BUDGET_OPTION,
    compile_experts: bool = COMPILE_EXPERTS_OPTION,
    monolithic_weights: str = typer.Option(_d("monolithic_weights"), metavar="copy|mapped",
                                           help="--mode monolithic: copy the weights into the server, or map them "
                                                "(read on use, paged out by the kernel under memory pressure)."),
    max_batch: int = typer.Option(_d("max_batch"), metavar="N", help="Sequences stepped together."),
    max_queue: int = typer.Option(_d("max_queue"), metavar="N",
                                  help="Requests waiting, all tenants together; more get 429."),
    tenant: list[str] = typer.Option([], "--tenant", metavar="NAME:KEY", show_default=False,
                                     help="A tenant and its API key (at least 8 characters), repeatable. Without "
                                          "any (and no tenants in --config): one tenant, 'default'."),
    api_key: Optional[str] = typer.Option(None, envvar="FAASMOE_API_KEY", metavar="KEY",
                                          show_default="generated at every start",
                                          help="API key of the 'default' tenant (at least 8 characters)."),
    max_concurrency: int = typer.Option(_d("max_concurrency"), metavar="N",
                                        help="Per tenant (each one): requests in flight at once; more get 429."),
    tokens_per_minute: int = typer.Option(_d("tokens_per_minute"), metavar="N",
                                          help="Per tenant: prompt + completion tokens per minute; more get 429."),
    max_queued: int = typer.Option(_d("max_queued"), metavar="N",
                                   help="Per tenant: requests waiting for a batch slot; more get 429."),
    admin_key: Optional[str] = typer.Option(None, metavar="KEY", show_default="generated at every start",
                                            help="Key that guards /metrics (at least 8 characters)."),
    prewarm: bool = typer.Option(_d("prewarm"), "--prewarm/--no-prewarm",
                                 help="Start every function at start-up instead of at its first call."),
    prefetch_layers: int = typer.Option(_d("prefetch_layers"), metavar="N",
                                        help="Warm the functions a layer N ahead is predicted to call (0: off)."),
    dtype: Optional[str] = typer.Option(None, metavar="DTYPE", show_default="the checkpoint's",
                                        help="Compute dtype: float32, bfloat16 or float16."),
    threads: Optional[int] = typer.Option(None, metavar="N",
                                          show_default="half the cores for a control plane next to local "
                                                       "functions, else one per core",
                                          help="Torch threads of the control plane (of each tenant's, in private "
                                               "mode) or of the monolithic model. By default a control plane "
                                               "next to local functions runs its lm_head on every core."),
    log_level: str = typer.Option("info", metavar="LEVEL", help="uvicorn log level: debug, info, warning, error."),
) -> None:
    """Start the OpenAI-compatible server (experts as functions on the embedded FaaS platform by default).

    It prints, once it listens, the URL, the tenants with their keys and limits, and the admin key.
    """
    from faasmoe.models.checkpoint import CheckpointError
    from faasmoe.serving.app import ListenError, check_listen
    from faasmoe.serving.app import serve as run_server
    from faasmoe.serving.config import ConfigError, load_config

    tenants = []
    for t in tenant:
        name, sep, key = t.partition(":")
        if not sep:
            _fail("--tenant expects NAME:KEY (no ':' in what was given)")  # never echo: it may be a key
        tenants.append({"name": name, "key": key})
    flags = {"host": host, "port": port, "model": model, "model_name": model_name, "preset": preset,
             "preset_layers": layers, "mode": mode, "platform": platform, "functions": functions,
             "function_token": function_token, "ray_address": ray_address, "keep_alive_s": keep_alive,
             "experts_per_function": experts_per_function, "max_instances": max_instances, "max_batch": max_batch,
             "max_queue": max_queue, "admin_key": admin_key, "prewarm": prewarm, "prefetch_layers": prefetch_layers,
             "dtype": dtype, "threads": threads, "memory_budget": memory_budget,
             "compile_experts": compile_experts, "monolithic_weights": monolithic_weights}
    params = {"preset_layers": "layers", "keep_alive_s": "keep_alive"}
    overrides = {k: v for k, v in flags.items() if _given(ctx, params.get(k, k))}
    limits = {k: v for k, v in (("max_concurrency", max_concurrency), ("tokens_per_minute", tokens_per_minute),
                                ("max_queued", max_queued)) if _given(ctx, k)}
    key_from_flag = api_key is not None and ctx.get_parameter_source("api_key").name == "COMMANDLINE"
    if key_from_flag and tenants:
        _fail("--api-key is the key of the one 'default' tenant; with --tenant NAME:KEY each tenant has its own")
    try:
        cfg = load_config(config, default_key=api_key, tenant_limits=limits, tenants=tenants or None, **overrides)
    except (ConfigError, OSError) as e:
        _fail(f"invalid configuration: {e}")
    if key_from_flag and [t.key for t in cfg.tenants] != [api_key]:
        _fail(f"--api-key is the key of the one 'default' tenant; {config} lists tenants, each with its own key")
    try:
        check_listen(cfg.host, cfg.port)  # before creating or loading a model, which can take minutes
    except ListenError as e:
        _fail(str(e))
    if not (cfg.model / "config.json").is_file():
        from faasmoe.models.presets import init_model

        typer.echo(f"model {cfg.model} not found: creating it from preset {cfg.preset!r} (random weights)")
        try:
            init_model(cfg.preset, cfg.model, layers=cfg.preset_layers)
        except ValueError as e:
            _fail(str(e))
    try:
        from faasmoe.models.checkpoint import Checkpoint

        Checkpoint(cfg.model)
    except CheckpointError as e:
        _fail(str(e))
    if tenants:
        key_source = {t["name"]: "as given with --tenant" for t in tenants}
    elif api_key is not None and [t.key for t in cfg.tenants] == [api_key]:
        key_source = {"default": "as given with --api-key" if key_from_flag else "from FAASMOE_API_KEY"}
    else:
        key_source = {t.name: f"as set in {config}" for t in cfg.tenants}
    admin_source = "as given with --admin-key" if "admin_key" in overrides else f"as set in {config}"
    from faasmoe.proctitle import set_title

    set_title("serve", f":{cfg.port}")
    try:
        run_server(cfg, log_level, on_ready=lambda bound: typer.echo(_banner(cfg, bound, key_source, admin_source)))
    except ListenError as e:
        _fail(str(e))


if __name__ == "__main__":
    app()

"""The `faasmoe` command line: serve, generate, init-model, bench-engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Serve Mixture-of-Experts models with every expert a scale-to-zero FaaS function.")


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


@app.command("init-model")
def init_model_cmd(
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint into."),
    preset: str = typer.Option("tiny", help="Architecture: 'tiny' (tests) or 'qwen1.5-moe-a2.7b' (real sizes)."),
    layers: Optional[int] = typer.Option(None, help="Number of decoder layers (default: the preset's)."),
    seed: int = typer.Option(0, help="Seed of the random weights; the same seed writes the same weights."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: the preset's)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, KEY=VALUE (JSON value), repeatable; "
                                                     "e.g. --set norm_topk_prob=true --set decoder_sparse_step=2."),
) -> None:
    """Write a random-weight Qwen2-MoE checkpoint (config, sharded safetensors, Qwen tokenizer)."""
    from faasmoe.init_model import init_model

    overrides = _parse_sets(set_)
    if dtype:
        overrides["dtype"] = dtype
    try:
        path = init_model(preset, out, layers=layers, seed=seed, overrides=overrides)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


def _platform_config(keep_alive: float, max_instances: int, invoke_timeout: float):
    from faasmoe.platforms import PlatformConfig

    return PlatformConfig(keep_alive_s=keep_alive, max_instances=max_instances, invoke_timeout_s=invoke_timeout)


@app.command()
def generate(
    model: Path = typer.Option(..., help="A Qwen2-MoE checkpoint directory (Hugging Face layout)."),
    prompt: str = typer.Option(..., help="The prompt text."),
    max_tokens: int = typer.Option(32, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (with temperature > 0)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template as a user message."),
    experts_per_function: int = typer.Option(1, "--experts-per-function", "-k",
                                             help="Experts per function, 1 .. all experts of a layer."),
    platform: str = typer.Option("local", help="FaaS platform that runs the expert functions: local (embedded), "
                                               "http (functions hosted elsewhere, see --functions) or ray."),
    functions: Optional[Path] = typer.Option(None, help="http platform: the manifest written by `faasmoe package`."),
    function_token: Optional[str] = typer.Option(None, help="http platform: token sent as X-Faasmoe-Token."),
    ray_address: Optional[str] = typer.Option(None, help="ray platform: cluster address (default: start a local Ray)."),
    keep_alive: float = typer.Option(30.0, help="Seconds an idle function instance stays warm."),
    max_instances: int = typer.Option(4, help="Instances per function under concurrent load."),
    invoke_timeout: float = typer.Option(60.0, help="Seconds before a function call is abandoned and retried."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype (default: the checkpoint's)."),
    as_json: bool = typer.Option(False, "--json", help="Print {text, token_ids, stats} as JSON."),
) -> None:
    """Generate text with the experts running as functions on a FaaS platform."""
    import faasmoe
    from faasmoe.checkpoint import CheckpointError

    try:
        options = {"local": {}, "http": {"manifest": functions, "token": function_token},
                   "ray": {"address": ray_address}}.get(platform, {})
        engine = faasmoe.load(model, experts_per_function=experts_per_function, platform=platform, dtype=dtype,
                              platform_config=_platform_config(keep_alive, max_instances, invoke_timeout),
                              platform_options=options)
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


@app.command("bench-engine")
def bench_engine_cmd(
    model: Path = typer.Option(Path("models/qwen1.5-moe-a2.7b-2l"), help="Checkpoint (created if missing)."),
    layers: int = typer.Option(2, help="Layers of the real preset when the checkpoint must be created."),
    tokens: int = typer.Option(32, help="Tokens to decode per measured run."),
    repeats: int = typer.Option(3, help="Measured runs of each side, interleaved."),
    experts_per_function: list[int] = typer.Option([1, 4], "--experts-per-function", "-k",
                                                   help="Granularities to measure (repeatable)."),
    platform: list[str] = typer.Option(["local"], help="Platforms to measure (repeatable): local, ray."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON here."),
) -> None:
    """Side by side in one run: faasmoe (warm) vs the monolithic transformers model on the same weights."""
    from faasmoe.bench.cleanup import session
    from faasmoe.bench.engine import run_engine_bench

    with session():  # SIGTERM/SIGINT/SIGHUP stop every process and folder it started, then exit 128 + signal
        report = run_engine_bench(model, layers=layers, tokens=tokens, repeats=repeats, ks=experts_per_function,
                                  platforms=platform)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


def _range(text: str, name: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise typer.BadParameter(f"{name} expects MIN:MAX, got {text!r}") from None
    if not 1 <= a <= b:
        raise typer.BadParameter(f"{name} expects 1 <= MIN <= MAX, got {text!r}")
    return a, b


@app.command()
def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Directory for results.json, results.md and the plots."),
    quick: bool = typer.Option(False, "--quick", help="Tiny preset, short load, small sweep: minutes, not hours."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint (created if missing; default: models/bench-tiny with "
                                                    "--quick, else models/qwen1.5-moe-a2.7b-bench)."),
    layers: Optional[int] = typer.Option(None, help="Layers of the real preset when the checkpoint is created "
                                                    "(default: 1, what 24 GiB allows for 6 Baseline tenants)."),
    tenants: int = typer.Option(6, help="Tenants (the paper's figures imply 6)."),
    rate: list[float] = typer.Option([], help="Requests/s per tenant, repeatable (cycled over tenants)."),
    arrival: str = typer.Option("poisson", help="poisson, or bursty (on/off periods at 3x the rate)."),
    duration: Optional[float] = typer.Option(None, help="Seconds during which requests arrive."),
    max_requests: Optional[int] = typer.Option(None, help="Requests per tenant at most."),
    prompt_tokens: Optional[str] = typer.Option(None, help="Prompt length range MIN:MAX in tokens."),
    output_tokens: Optional[str] = typer.Option(None, help="Output length range MIN:MAX in tokens."),
    seed: int = typer.Option(0, help="Seed of the workload: the same requests for every strategy."),
    experts_per_function: Optional[int] = typer.Option(None, "--experts-per-function", "-k",
                                                       help="k of faasmoe's main runs."),
    sweep: list[int] = typer.Option([], help="k values to sweep for faasmoe's strategies, repeatable "
                                             "(default: 1, 2, 4, ... all)."),
    no_sweep: bool = typer.Option(False, "--no-sweep", help="Skip the granularity sweep."),
    sweep_strategy: list[str] = typer.Option([], help="Strategies to sweep k for, repeatable (default: "
                                                      "faasmoe-shared with --quick, else faasmoe-private and "
                                                      "faasmoe-shared)."),
    keep_alive: Optional[float] = typer.Option(None, help="Function keep-alive in seconds (default: 5 with --quick "
                                                          "on the local platform, else 30)."),
    strategy: list[str] = typer.Option([], help="Strategies to run, repeatable (default: all four)."),
    platform: str = typer.Option("local", help="FaaS platform of faasmoe's strategies."),
    chaos: bool = typer.Option(False, "--chaos", help="Instead: run faasmoe under the load twice, the second time "
                                                      "killing a random function instance every --chaos-interval "
                                                      "seconds; report completed requests and output mismatches."),
    chaos_interval: float = typer.Option(0.5, help="Seconds between instance kills in --chaos."),
    chaos_mode: str = typer.Option("shared", help="Server mode for --chaos: shared or private."),
) -> None:
    """Baseline vs FaaSMoE Private vs FaaSMoE Shared vs Local Distribution, one after the other, same load."""
    from faasmoe.bench.load import Workload
    from faasmoe.bench.cleanup import session
    from faasmoe.bench.multitenant import STRATEGIES, BenchConfig, run_bench
    from faasmoe.checkpoint import Checkpoint
    from faasmoe.init_model import init_model

    for s_ in strategy:
        if s_ not in STRATEGIES:
            _fail(f"unknown strategy {s_!r}; choose from {', '.join(STRATEGIES)}")
    if arrival not in ("poisson", "bursty"):
        _fail("--arrival is poisson or bursty")
    model = model or Path("models/bench-tiny" if quick else "models/qwen1.5-moe-a2.7b-bench")
    if not (model / "config.json").is_file():
        typer.echo(f"creating {model}")
        if quick:
            init_model("tiny", model)
        else:
            init_model("qwen1.5-moe-a2.7b", model, layers=layers or 1)
    experts = Checkpoint(model).config.num_experts
    k = experts_per_function or (2 if quick else 4)
    if not sweep and not no_sweep:
        sweep = sorted({min(2**i, experts) for i in range(experts.bit_length() + 1)})
        if quick:
            sweep = [1, experts]
    workload = Workload(
        tenants=tenants, rates=rate or ([2.0] if quick else [0.2]), arrival=arrival,  # type: ignore[arg-type]
        duration_s=duration or (8.0 if quick else 120.0), max_requests=max_requests,
        prompt_tokens=_range(prompt_tokens, "--prompt-tokens") if prompt_tokens else ((8, 32) if quick else (32, 128)),
        output_tokens=_range(output_tokens, "--output-tokens") if output_tokens else ((8, 16) if quick else (32, 64)),
        seed=seed)
    cfg = BenchConfig(model=model.resolve(), workload=workload, experts_per_function=k, sweep=[] if no_sweep else sweep,
                      sweep_strategies=tuple(sweep_strategy) or (("faasmoe-shared",) if quick
                                                                 else ("faasmoe-private", "faasmoe-shared")),
                      keep_alive_s=keep_alive if keep_alive is not None else (5.0 if quick and platform == "local" else 30.0),
                      strategies=tuple(strategy) or STRATEGIES, platform=platform)
    if chaos:
        from faasmoe.bench.chaos import run_chaos

        with session():
            r = run_chaos(cfg, out, chaos_interval, chaos_mode)
        typer.echo(f"chaos ({r['mode']} mode, {r['tenants']} tenants, a random instance killed every "
                   f"{r['kill_interval_s']:g} s: {r['instances_killed']} kills, {r['calls_cut_by_kills']} calls "
                   f"cut and retried): {r['requests_sent']} requests sent, {r['completed']} completed "
                   f"({r['completed_percent']:.1f} %), {r['failed']} failed, "
                   f"{r['mismatches']} of {r['compared']} outputs differ from the fault-free run")
        if r["failed"] or r["mismatches"]:
            raise typer.Exit(1)
        return
    with session():  # SIGTERM/SIGINT/SIGHUP stop every process and folder it started, then exit 128 + signal
        report = run_bench(cfg, out)
    typer.echo((out / "results.md").read_text())
    errors = sum(r["errors"] for r in report["strategies"].values())
    if errors:
        typer.secho(f"{errors} requests failed", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("package")
def package_cmd(
    model: Path = typer.Option(..., help="The checkpoint whose experts to package."),
    target: str = typer.Option(..., help="tinyfaas, openfaas or knative."),
    out: Path = typer.Option(..., help="Directory to write the packages and manifest.json into."),
    experts_per_function: int = typer.Option(1, "--experts-per-function", "-k", help="Experts per function."),
    base_url: Optional[str] = typer.Option(None, help="URL template per function, with {name}, {port} or {index} "
                                                      "(default: the target's usual gateway form)."),
    start_port: int = typer.Option(9000, help="{port} of the first function (then +1 each)."),
    reference_weights: bool = typer.Option(False, help="Point at the checkpoint's files instead of copying each "
                                                       "function's tensors into its package."),
    keep_alive: float = typer.Option(30.0, help="Scale-to-zero delay written into the deploy files."),
    max_instances: int = typer.Option(4, help="Maximum instances written into the deploy files."),
) -> None:
    """Package every expert function for an external FaaS platform, plus a manifest for --platform http."""
    from faasmoe.checkpoint import CheckpointError
    from faasmoe.package import package

    try:
        manifest = package(model, experts_per_function, target, out, base_url=base_url, start_port=start_port,
                           copy_weights=not reference_weights, keep_alive_s=keep_alive, max_instances=max_instances)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    n = len(json.loads(manifest.read_text())["functions"])
    typer.echo(f"wrote {n} {target} function packages under {out / 'functions'} and {manifest}")


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML or YAML file: tenants, keys, limits, model, "
                                                                       "platform, keep-alive, k, mode. Flags override it."),
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: 8000)."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: models/tiny, created if missing)."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the directory name)."),
    preset: Optional[str] = typer.Option(None, help="Preset to create at --model if it is missing (default: tiny)."),
    layers: Optional[int] = typer.Option(None, help="Layers of the created preset (default: the preset's)."),
    mode: Optional[str] = typer.Option(None, help="shared: one orchestrator batching all tenants; private: one "
                                                  "orchestrator process per tenant; monolithic: transformers' "
                                                  "model with every expert resident, no functions, for "
                                                  "comparison (default: shared)."),
    platform: Optional[str] = typer.Option(None, help="FaaS platform of the expert functions: local, http or ray "
                                                      "(default: local)."),
    functions: Optional[Path] = typer.Option(None, help="http platform: the manifest written by `faasmoe package`."),
    function_token: Optional[str] = typer.Option(None, help="http platform: token sent as X-Faasmoe-Token."),
    ray_address: Optional[str] = typer.Option(None, help="ray platform: cluster address to join (default: start a "
                                                         "local Ray on 127.0.0.1)."),
    keep_alive: Optional[float] = typer.Option(None, help="Seconds an idle function instance stays warm (default: 30)."),
    experts_per_function: Optional[int] = typer.Option(None, "--experts-per-function", "-k",
                                                       help="Experts per function (default: 1)."),
    max_instances: Optional[int] = typer.Option(None, help="Instances per function under load (default: 4)."),
    max_batch: Optional[int] = typer.Option(None, help="Sequences stepped together (default: 16)."),
    max_queue: Optional[int] = typer.Option(None, help="Requests waiting before 429 (default: 64)."),
    tenant: list[str] = typer.Option([], "--tenant", help="NAME:KEY, repeatable; a quick start without a config file "
                                                          "(default limits). Without any, one 'default' tenant "
                                                          "with a fresh key."),
    admin_key: Optional[str] = typer.Option(None, help="Key for /metrics (default: generated and printed)."),
    prewarm: Optional[bool] = typer.Option(None, "--prewarm/--no-prewarm", help="Start every function at start-up."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype (default: the checkpoint's)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Start the OpenAI-compatible server (experts as functions on the embedded FaaS platform by default)."""
    from pydantic import ValidationError

    from faasmoe.checkpoint import CheckpointError
    from faasmoe.serving.app import serve as run_server
    from faasmoe.serving.config import load_config

    tenants = []
    for t in tenant:
        name, sep, key = t.partition(":")
        if not sep:
            _fail(f"--tenant expects NAME:KEY, got {t!r}")
        tenants.append({"name": name, "key": key})
    try:
        cfg = load_config(config, host=host, port=port, model=model, model_name=model_name, preset=preset,
                          preset_layers=layers, mode=mode, platform=platform, functions=functions,
                          function_token=function_token, ray_address=ray_address, keep_alive_s=keep_alive,
                          experts_per_function=experts_per_function, max_instances=max_instances, max_batch=max_batch,
                          max_queue=max_queue, tenants=tenants, admin_key=admin_key, prewarm=prewarm, dtype=dtype)
    except (ValidationError, ValueError, OSError) as e:
        _fail(f"invalid configuration: {e}")
    if not (cfg.model / "config.json").is_file():
        from faasmoe.init_model import init_model

        typer.echo(f"model {cfg.model} not found: creating it from preset {cfg.preset!r}")
        try:
            init_model(cfg.preset, cfg.model, layers=cfg.preset_layers)
        except ValueError as e:
            _fail(str(e))
    try:
        from faasmoe.checkpoint import Checkpoint

        Checkpoint(cfg.model)
    except CheckpointError as e:
        _fail(str(e))
    base = f"http://{cfg.host}:{cfg.port}"
    typer.echo(f"faasmoe: serving {cfg.served_model_name!r} from {cfg.model} in {cfg.mode} mode on the "
               f"{cfg.platform} platform, {cfg.experts_per_function} expert(s) per function, keep-alive {cfg.keep_alive_s:g} s")
    typer.echo(f"listening on {base}  (OpenAI base URL: {base}/v1)")
    for t in cfg.tenants:
        typer.echo(f"  tenant {t.name}: API key {t.key}")
    typer.echo(f"  /metrics admin key: {cfg.admin_key}")
    from faasmoe.proctitle import set_title

    set_title("serve", f":{cfg.port}")
    run_server(cfg, log_level)


if __name__ == "__main__":
    app()

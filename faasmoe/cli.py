"""The `faasmoe` command line: init-model, generate, bench-engine, serve."""

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
    platform: str = typer.Option("local", help="FaaS platform that runs the expert functions."),
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
        engine = faasmoe.load(model, experts_per_function=experts_per_function, platform=platform, dtype=dtype,
                              platform_config=_platform_config(keep_alive, max_instances, invoke_timeout))
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
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON here."),
) -> None:
    """Side by side in one run: faasmoe (warm) vs the monolithic transformers model on the same weights."""
    from faasmoe.bench.engine import run_engine_bench

    report = run_engine_bench(model, layers=layers, tokens=tokens, repeats=repeats, ks=experts_per_function)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()

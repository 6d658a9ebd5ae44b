"""The command line as a user types it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from faasmoe.cli import app
from helpers import unaligned_copy


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faasmoe", *args], capture_output=True, text=True, timeout=300)


def test_init_model_then_generate_json(tmp_path):
    out = tmp_path / "m"
    r = run("init-model", "--preset", "tiny", "--out", str(out), "--layers", "2", "--set", "norm_topk_prob=true")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is True
    r = run("generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "5", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert isinstance(result["text"], str) and len(result["token_ids"]) == 5
    for key in ("invocations", "cold_starts", "warm_hits", "prefill_s", "decode_s", "load_s"):
        assert key in result["stats"]
    assert result["stats"]["invocations"] == result["stats"]["cold_starts"] + result["stats"]["warm_hits"]


def test_clear_errors_instead_of_tracebacks(tmp_path):
    r = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr
    r = run("init-model", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown preset" in r.stderr


def test_help_explains_every_flag():
    r = run("generate", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--prompt", "--max-tokens", "--temperature", "--experts-per-function", "--keep-alive",
                 "--platform", "--json"):
        assert flag in r.stdout


COMMANDS = ["serve", "generate", "init-model", "quantize", "package", "bench", "bench-engine"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_like_a_cli(command):
    """Flags are flags (no `<bool>` to fill in), values have a name (no Python types), defaults are shown."""
    r = CliRunner().invoke(app, [command, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    assert "<" not in r.output and "list[" not in r.output, r.output
    assert "paper" not in r.output
    options = [line for line in r.output.splitlines() if line.lstrip().startswith("-")]
    flags_without_value = [o for o in options if re.match(r"\s*(-\w, )?--[\w-]+( / --[\w-]+)?\s{2,}", o)]
    for line in flags_without_value:  # a flag without a value is a switch, not an option missing its metavar
        name = line.split()[1] if line.split()[0].endswith(",") else line.split()[0]
        assert name in BOOLEAN_FLAGS, f"{command}: {line.strip()} takes no value but is not a switch"


BOOLEAN_FLAGS = {"--json", "--chat", "--prewarm", "--quick", "--no-sweep", "--chaos", "--reference-weights", "--help",
                 "--int8", "--compare", "--compile-experts"}


def test_serve_help_shows_defaults_and_the_random_weights():
    r = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    for text in ("[default: 127.0.0.1]", "[default: 8000]", "[default: 4]", "[default: 60000]", "[default: 16]",
                 "--prewarm / --no-prewarm", "FAASMOE_API_KEY", "RANDOM weights", "Qwen1.5-MoE-A2.7B"):
        assert text in r.output, text


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and re.fullmatch(r"faasmoe \S+\n", r.output)


def test_a_boolean_flag_takes_no_value(tiny):
    r = CliRunner().invoke(app, ["generate", "--model", tiny, "--prompt", "x", "--json", "yes"])
    assert r.exit_code == 2 and "unexpected extra argument" in r.output.lower()


# -- serve: what it is given, what it prints, what it refuses (the server itself is stubbed) ---------------

@pytest.fixture
def served(monkeypatch):
    """Run `faasmoe serve ...` in-process with the server replaced by a stub that reports ready at once."""
    import faasmoe.serving.app as server_app

    seen = {}

    def fake_serve(cfg, log_level="info", on_ready=None):
        seen["config"] = cfg
        on_ready(43210)

    monkeypatch.setattr(server_app, "serve", fake_serve)
    monkeypatch.setattr("faasmoe.proctitle.set_title", lambda *a, **k: None)  # leave pytest's own title alone
    monkeypatch.delenv("FAASMOE_API_KEY", raising=False)

    def invoke(*args: str, env: dict | None = None):
        r = CliRunner().invoke(app, ["serve", *args], env=env, terminal_width=200)
        return r, seen.get("config")

    return invoke


def test_serve_prints_the_banner_last_with_the_generated_key_and_random_weights(served, tiny):
    r, cfg = served("--model", tiny, "--max-concurrency", "64", "--tokens-per-minute", "100000", "--max-queued", "3")
    assert r.exit_code == 0, r.output
    (t,) = cfg.tenants
    assert (t.name, t.max_concurrency, t.tokens_per_minute, t.max_queued) == ("default", 64, 100000, 3)
    banner = r.output.strip().splitlines()
    assert banner[0].startswith("=") and banner[-1].startswith("=")
    assert "http://127.0.0.1:43210/v1" in r.output and t.key in r.output and cfg.admin_key in r.output
    assert "RANDOM" in r.output and "64 requests at once, 100000 tokens/minute, 3 queued" in r.output
    assert "WARNING" not in r.output and "faasmoe align" not in r.output  # init-model writes aligned tensors


def test_serve_compile_experts_reaches_the_platform_config_and_the_banner(served, tiny):
    r, cfg = served("--model", tiny)
    assert r.exit_code == 0 and not cfg.scaling.compile_experts and "compiled" not in r.output
    r, cfg = served("--model", tiny, "--compile-experts")
    assert r.exit_code == 0, r.output
    assert cfg.scaling.compile_experts and "1 per function, keep-alive 30 s, compiled (--compile-experts)" in r.output


def test_serve_says_how_to_align_a_checkpoint_written_by_safetensors(served, tiny, tmp_path):
    path = unaligned_copy(tiny, tmp_path / "unaligned")
    r, _ = served("--model", str(path))
    assert r.exit_code == 0, r.output
    assert f"faasmoe align {path}" in r.output


def test_serve_says_which_weights_are_int8(served, tiny, tmp_path):
    from faasmoe.models.quantize import quantize_checkpoint

    r, _ = served("--model", tiny)
    assert "int8" not in r.output
    path = quantize_checkpoint(tiny, tmp_path / "int8", ("experts", "lm_head"), progress=False)
    r, _ = served("--model", str(path))
    assert r.exit_code == 0, r.output
    assert "int8       experts, lm_head stored in int8" in r.output


def test_serve_takes_the_key_from_the_flag_or_the_environment_and_does_not_print_it(served, tiny):
    r, cfg = served("--model", tiny, "--api-key", "sk-my-key-123")
    assert r.exit_code == 0, r.output
    assert [t.key for t in cfg.tenants] == ["sk-my-key-123"] and "sk-my-key-123" not in r.output
    assert "as given with --api-key" in r.output
    r, cfg = served("--model", tiny, env={"FAASMOE_API_KEY": "sk-env-key-456"})
    assert [t.key for t in cfg.tenants] == ["sk-env-key-456"] and "from FAASMOE_API_KEY" in r.output


def test_serve_api_key_is_for_the_default_tenant_only(served, tiny, tmp_path):
    r, _ = served("--model", tiny, "--api-key", "sk-my-key-123", "--tenant", "a:sk-aaaaaaaa")
    assert r.exit_code == 2 and "default" in r.output
    r, cfg = served("--model", tiny, "--tenant", "a:sk-aaaaaaaa", env={"FAASMOE_API_KEY": "sk-env-key-456"})
    assert r.exit_code == 0 and [t.key for t in cfg.tenants] == ["sk-aaaaaaaa"]  # the environment's is a fallback
    f = tmp_path / "c.toml"
    f.write_text('[[tenants]]\nname = "a"\nkey = "sk-aaaaaaaa"\n')
    r, _ = served("--model", tiny, "--config", str(f), "--api-key", "sk-my-key-123")
    assert r.exit_code == 2 and str(f) in r.output


def test_serve_flags_left_at_their_default_do_not_override_the_config_file(served, tiny, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {tiny}\nport: 9999\nprewarm: true\nadmin_key: sk-admin-from-file\n"
                 "tenants:\n  - {name: a, key: sk-aaaaaaaa, max_concurrency: 2}\n  - {name: b, key: sk-bbbbbbbb}\n")
    r, cfg = served("--config", str(f), "--tokens-per-minute", "5")
    assert r.exit_code == 0, r.output
    assert cfg.port == 9999 and cfg.prewarm is True and cfg.model == Path(tiny)
    assert [(t.max_concurrency, t.tokens_per_minute) for t in cfg.tenants] == [(2, 5), (4, 5)]
    assert "sk-aaaaaaaa" not in r.output and "sk-admin-from-file" not in r.output and f"as set in {f}" in r.output
    r, cfg = served("--config", str(f), "--port", "8000", "--no-prewarm")
    assert cfg.port == 8000 and cfg.prewarm is False  # typed, a flag wins even when it equals the default
    assert cfg.threads is None and cfg.scaling.keep_alive_s == 30
    r, cfg = served("--config", str(f), "--threads", "1", "--keep-alive", "5")
    assert cfg.threads == 1 and cfg.scaling.keep_alive_s == 5


def test_serve_warns_when_listening_beyond_loopback(served, tiny):
    r, _ = served("--model", tiny, "--host", "0.0.0.0")
    assert r.exit_code == 0 and "WARNING" in r.output and "TLS" in r.output


@pytest.mark.parametrize("args", [
    ["--tenant", "a:sk-SEC"], ["--admin-key", "sk-SEC"], ["--api-key", "sk-SEC"], ["--tenant", "sk-SECRET-no-name"],
    ["--tenant", "a:sk-SECRET-1", "--tenant", "b:sk-SECRET-1"], ["--tenant", "a:sk-SECRET-1", "--admin-key", "sk-SECRET-1"],
])
def test_serve_refuses_bad_keys_without_printing_them(served, tiny, args):
    r, _ = served("--model", tiny, *args)
    assert r.exit_code == 2 and "error" in r.output and "SEC" not in r.output, r.output


def test_serve_refuses_an_empty_tenant_list(served, tiny, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("tenants = []\n")
    r, _ = served("--model", tiny, "--config", str(f))
    assert r.exit_code == 2 and "tenants is empty" in r.output


def test_serve_names_a_port_in_use_in_one_line_before_creating_the_model(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--model", str(tmp_path / "m"), "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: port {port} on 127.0.0.1 is already in use; pick another with --port"
    assert not (tmp_path / "m").exists()


def test_bench_says_how_to_install_matplotlib_when_it_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = CliRunner().invoke(app, ["bench", "--quick"])
    assert r.exit_code == 2 and "[bench]" in r.output


def test_serve_creates_a_missing_model_answers_and_stops_everything_on_sigterm(tmp_path):
    import signal
    import socket
    import time

    import httpx
    import psutil

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    model = tmp_path / "fresh"
    proc = subprocess.Popen([sys.executable, "-m", "faasmoe", "serve", "--model", str(model), "--layers", "1",
                             "--port", str(port), "--tenant", "t1:sk-test-key-1", "--keep-alive", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        assert (model / "config.json").is_file()
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": "Bearer sk-test-key-1"},
                       json={"model": "fresh", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # the zygote and at least one function instance
        with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": "Bearer sk-test-key-1"},
                          json={"model": "fresh", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True,
                                "stream": True}, timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # shutdown with a request running: it ends, it does not hang
            rest = list(lines)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        rest = [line for line in rest if line]
        assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "creating it" in out and "key as given with --tenant" in out and "sk-test-key-1" not in out
    assert out.index("Uvicorn running on") < out.index(f"faasmoe is serving 'fresh' at {base}/v1")  # banner last


def test_init_model_marks_its_checkpoints_as_random(tiny, tmp_path):
    from faasmoe.models.presets import RANDOM_WEIGHTS_MARKER, has_random_weights

    assert has_random_weights(tiny) and "random" in (Path(tiny) / RANDOM_WEIGHTS_MARKER).read_text()
    assert not has_random_weights(tmp_path)  # a downloaded checkpoint has no marker


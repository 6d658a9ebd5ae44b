"""Run a real faasmoe server (uvicorn on a free loopback port) for the duration of a test."""

from __future__ import annotations

import contextlib
import shutil
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from faasmoe.serving.app import create_app, uvicorn_options
from faasmoe.serving.config import ServerConfig

ADMIN = "sk-admin-test-0000"


@contextlib.contextmanager
def running_server(**settings):
    """Yield the base URL of a server started with `settings` (ServerConfig fields); stop it after."""
    settings.setdefault("admin_key", ADMIN)
    config = ServerConfig(**settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {**uvicorn_options(config), "timeout_graceful_shutdown": 2}
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", **options))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def metric_sum(base: str, name: str) -> float:
    """Sum of every series of a metric, read from /metrics with the admin key."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def in_threads(fn, jobs: list[tuple]) -> list:
    """fn(*job) for every job, each on its own thread, all at once; the results in the jobs' order."""
    out: list = [None] * len(jobs)

    def go(i: int, job: tuple):
        out[i] = fn(*job)

    threads = [threading.Thread(target=go, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def unaligned_copy(src: str | Path, dest: Path) -> Path:
    """A copy of a checkpoint with its shards as safetensors writes them (tensors aligned to 8 bytes only)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    for shard in dest.glob("*.safetensors"):
        save_file(load_file(str(shard)), str(shard), metadata={"format": "pt"})
    return dest


def wait_gone(pids: list[int], timeout: float) -> None:
    """Assert that these processes exit within `timeout` (one that is gone already counts as gone)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, alive


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """The transformers model's n greedy tokens after `ids`."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()

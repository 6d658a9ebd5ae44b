"""A stopped bench leaves nothing behind: no process it started, no temporary folder (they hold API keys).

The bench runs with its own TMPDIR: its folders land there, and every process it starts inherits
it, which finds an orphan even after it was reparented away from the bench's tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from faasmoe.proctitle import role_of, title_of


def _start_bench(tiny: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = Path(tempfile.mkdtemp(prefix="fbc-", dir="/tmp"))  # short: instance socket paths stay < 108 bytes
    log = (tmp_path / "bench.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "faasmoe", "bench", "--quick", "--model", tiny,
                             "--out", str(tmp_path / "out"), "--strategy", "faasmoe-private", "--no-sweep",
                             "--tenants", "2", "--rate", "4", "--duration", "120"],
                            env=dict(os.environ, TMPDIR=str(marker)), stdout=log, stderr=subprocess.STDOUT)
    return proc, marker


def _wait_until_serving(proc: subprocess.Popen, tmp_path: Path, timeout: float = 240) -> list[psutil.Process]:
    """Poll until the bench's server, zygote, both orchestrators and a function instance are up; its tree then."""
    bench = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "bench.log").read_text()[-3000:]
        tree = bench.children(recursive=True)
        roles = []
        for p in tree:
            try:
                roles.append(role_of(p)[0])
            except psutil.Error:
                pass
        if {"serve", "zygote", "function"} <= set(roles) and roles.count("orchestrator") == 2:
            return [bench, *tree]
        time.sleep(0.2)
    raise AssertionError(f"the bench did not start serving in {timeout} s")


def _living(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone between the two questions
        return False


def _leftovers(started: list[psutil.Process], marker: Path) -> list[str]:
    """Processes of the bench still alive: from its tree, or anywhere with its TMPDIR (orphans)."""
    alive = {p.pid: p for p in started if _living(p)}
    for p in psutil.process_iter():
        try:
            if p.pid not in alive and p.environ().get("TMPDIR") == str(marker) and p.status() != psutil.STATUS_ZOMBIE:
                alive[p.pid] = p
        except psutil.Error:
            continue
    out = []
    for p in alive.values():
        try:
            out.append(f"{p.pid} {title_of(p)[:120]}")
        except psutil.Error:
            pass
    return out


def _assert_clean_within(started: list[psutil.Process], marker: Path, seconds: float) -> float:
    t0 = time.monotonic()
    while True:
        left = _leftovers(started, marker)
        folders = sorted(f.name for f in marker.iterdir() if f.name.startswith("faasmoe"))
        if not left and not folders:
            return time.monotonic() - t0
        if time.monotonic() - t0 > seconds:
            raise AssertionError(f"after {seconds} s: processes {left}, folders {folders}")
        time.sleep(0.1)


@pytest.mark.parametrize("sig, bound", [(signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_bench_leaves_no_process_and_no_folder(tiny, tmp_path, sig, bound):
    proc, marker = _start_bench(tiny, tmp_path)
    try:
        started = _wait_until_serving(proc, tmp_path)
        titles = {role_of(p)[0]: title_of(p) for p in started}
        assert titles["bench"].startswith("faasmoe bench faasmoe-private")
        assert titles["serve"].startswith("faasmoe serve :")
        assert titles["function"].startswith("faasmoe function ")
        assert sorted(role_of(p)[1] for p in started if role_of(p)[0] == "orchestrator") == ["t0", "t1"]
        assert any(f.name.startswith("faasmoe-bench-") for f in marker.iterdir())
        proc.send_signal(sig)
        took = _assert_clean_within(started, marker, bound)
        print(f"{signal.Signals(sig).name}: clean after {took:.1f} s")
        assert proc.wait(5) == (128 + sig if sig != signal.SIGKILL else -sig)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(marker, ignore_errors=True)


def test_a_stop_that_comes_out_as_another_error_still_exits_as_stopped(monkeypatch):
    """A library interrupted by the stop can raise its own error instead (anyio inside an httpx request did:
    "Attempted to exit a cancel scope ..."): the bench still exits 128 + signal. Without a signal, an error is
    the error."""
    import threading

    from faasmoe.bench import cleanup

    monkeypatch.setattr(cleanup, "_stopping", threading.Event())  # this process's other tests are not stopping
    with pytest.raises(SystemExit) as stopped:
        with cleanup.session():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler raises Stopped here
            except cleanup.Stopped:
                raise RuntimeError("a library tripped over the interruption") from None
    assert stopped.value.code == 128 + signal.SIGTERM

    monkeypatch.setattr(cleanup, "_stopping", threading.Event())
    with pytest.raises(RuntimeError):
        with cleanup.session():
            raise RuntimeError("an ordinary failure")
    assert signal.getsignal(signal.SIGTERM) is not None and not cleanup.stopping()

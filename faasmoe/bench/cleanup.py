"""Nothing a bench started outlives it, however the bench ends.

* SIGTERM, SIGINT and SIGHUP (`timeout`, a CI runner, a supervisor, Ctrl-C) become `Stopped` in the
  bench's main thread, so every `finally` on the way out stops what it started; the bench then exits
  with 128 + the signal's number (`session`).
* The servers a bench starts (`spawn`) get SIGTERM from the kernel when the bench dies (parent-death
  signal), so even a SIGKILLed bench stops them, and they stop their own orchestrators, zygote and
  instances as on any SIGTERM.
* A janitor process (this file, run as a script so it does not import torch) watches the bench's
  stdin pipe. When the pipe closes with servers or folders still registered (the bench was SIGKILLed,
  or its own cleanup failed), it kills whatever is left of those servers' process trees and removes
  the folders (they hold the API keys of the run).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JANITOR_GRACE_S = 15.0  # time a server gets to stop its own processes before the janitor kills them
_PR_SET_PDEATHSIG = 1
_stopping = threading.Event()


class Stopped(KeyboardInterrupt):
    """A stop signal reached the bench. A KeyboardInterrupt, so asyncio, threads and futures unwind
    on it as on Ctrl-C and no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stopping() -> bool:
    """Whether a stop signal arrived: cleanup then uses short grace periods."""
    return _stopping.is_set()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The lifetime of a bench command: stop signals unwind it, the janitor covers a SIGKILL, and the
    command exits 128 + signal after it stopped everything."""

    received: list[int] = []

    def handler(signum: int, _frame) -> None:
        if _stopping.is_set():  # already unwinding: let the cleanup finish
            return
        _stopping.set()
        received.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    except BaseException as e:
        # A stop raised inside a library can come out as another exception: anyio, interrupted inside an httpx
        # request, raised "RuntimeError: Attempted to exit a cancel scope ..." in its place (the bench then
        # exited 1 after a SIGTERM). Once a stop signal arrived, the command exits as stopped, whatever unwound.
        if not received:
            raise
        print(f"faasmoe: stopped by {signal.Signals(received[0]).name}; stopped everything it started",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0]) from (None if isinstance(e, Stopped) else e)
    finally:
        close_janitor()
        for s, h in previous.items():
            signal.signal(s, h)


# -- children ------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def spawn(args: list[str], **popen) -> subprocess.Popen:
    """Start a child in its own session (a terminal's Ctrl-C goes to the bench, which stops it in order)
    that gets SIGTERM when the bench dies, registered with the janitor."""
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child, between fork and exec (the setting survives exec)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the bench died before the setting took
            os._exit(1)

    proc = subprocess.Popen(args, preexec_fn=die_with_parent, start_new_session=True, **popen)
    janitor().track_process(proc.pid)
    return proc


def family(pid: int) -> list[psutil.Process]:
    """A process and every descendant it has now (snapshot before stopping it: orphans lose the link)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a child and wait up to grace_s for it (it stops its own children); then SIGKILL what is left
    of its tree and of its process group. Forgets it with the janitor."""
    members = family(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
        _, alive = psutil.wait_procs(members, timeout=1.0 if stopping() else 5.0)  # its children finish stopping
    except subprocess.TimeoutExpired:
        alive = members + family(proc.pid)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # still its group while it is unreaped
    kill_all(alive)
    proc.wait()
    janitor().forget_process(proc.pid)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()  # psutil refuses a pid that was reused by another process
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


# -- folders -------------------------------------------------------------------------------------------
def make_workdir(prefix: str = "faasmoe-bench-") -> Path:
    """A private temporary folder (0700) the janitor removes if the bench cannot."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    janitor().track_dir(path)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    janitor().forget_dir(path)


# -- the janitor ---------------------------------------------------------------------------------------
class Janitor:
    """Client side: register servers and folders with the janitor process over its stdin."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      text=True, start_new_session=True)

    def _send(self, **msg) -> None:
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps(msg) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                pass

    def track_process(self, pid: int) -> None:
        self._send(track=pid)

    def forget_process(self, pid: int) -> None:
        self._send(forget=pid)

    def track_dir(self, path: Path) -> None:
        self._send(dir=str(path))

    def forget_dir(self, path: Path) -> None:
        self._send(forget_dir=str(path))

    def close(self) -> None:
        """Close the pipe: the janitor cleans what is still registered (nothing after a clean run) and exits."""
        with self._lock:
            try:
                self._proc.stdin.close()
            except OSError:
                pass


_janitor: Janitor | None = None


def janitor() -> Janitor:
    global _janitor
    if _janitor is None:
        _janitor = Janitor()
    return _janitor


def close_janitor() -> None:
    global _janitor
    if _janitor is not None:
        _janitor.close()
        _janitor = None


def _janitor_main() -> None:
    """Janitor side: keep a snapshot of every registered server's process tree (refreshed each second, since
    orphans lose the link to their tree); when stdin closes, kill what is left of them, remove the folders."""
    try:
        import setproctitle  # not faasmoe.proctitle: importing faasmoe imports torch

        setproctitle.setproctitle("faasmoe bench-janitor")
    except ImportError:
        pass
    for s in SIGNALS:  # a stop signal to the bench's group is for the bench; we act when it is gone
        signal.signal(s, signal.SIG_IGN)
    lock = threading.Lock()
    trees: dict[int, dict[int, psutil.Process]] = {}
    dirs: set[str] = set()
    closed = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            msg = json.loads(line)
            with lock:
                if "track" in msg:
                    trees[msg["track"]] = {p.pid: p for p in family(msg["track"])}
                elif "forget" in msg:
                    trees.pop(msg["forget"], None)
                elif "dir" in msg:
                    dirs.add(msg["dir"])
                elif "forget_dir" in msg:
                    dirs.discard(msg["forget_dir"])
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    while not closed.wait(1.0):
        with lock:
            for root, tree in trees.items():
                tree.update((p.pid, p) for p in family(root))
    with lock:
        procs = [p for tree in trees.values() for p in tree.values()]
        roots = [tree[root] for root, tree in trees.items() if root in tree]
    for p in roots:
        try:
            p.terminate()  # they already had the parent-death SIGTERM; this covers a bench that closed us early
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=JANITOR_GRACE_S if procs else 0)
    kill_all(alive)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    _janitor_main()

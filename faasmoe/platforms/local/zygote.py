"""The zygote: a process that has imported torch and the handler once, and forks host processes on request.

A host's start then costs a fork, not a new interpreter and a torch import (about 2 s
here). One zygote serves every platform of a process (`Zygote.shared()`). Protocol on its
stdin/stdout, JSON lines: first `{"ready": true}` once imported, then `{"socket": path,
"threads": n, "warm": [spec, ...], "hang_on_request": n, "compiled": bool}` -> `{"pid": n}` per host, or
`{"warm": [spec, ...], "compiled": bool}` alone -> `{"warmed": true}` (kernels warmed, no host). It exits
when its stdin closes (its parent process is gone); its children die with it.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import threading


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """Client side: start the zygote process and ask it for forks."""

    _shared: "Zygote | None" = None
    _shared_lock = threading.Lock()

    def __init__(self):
        self._lock = threading.Lock()
        self._ready = False
        self._proc = subprocess.Popen([sys.executable, "-m", "faasmoe.platforms.local.zygote"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1,
                                      # one thread, whatever the hosts' count: GNU OpenMP's thread pool does
                                      # not survive a fork, and a host forked after the zygote ran a parallel
                                      # region on 2+ threads hangs in its first one; so kernels are warmed (and
                                      # shared) for one-thread hosts, and a host with more builds its own
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))

    @classmethod
    def shared(cls) -> "Zygote":
        """The process-wide zygote, started on first use (and again if it died)."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared.alive:
                cls._shared = cls()
                atexit.register(cls._shared.close)
            return cls._shared

    def wait_ready(self) -> None:
        """Block until the zygote has imported torch and the handler (its first line says so)."""
        with self._lock:
            if not self._ready:
                line = self._proc.stdout.readline()
                if not line or not json.loads(line).get("ready"):
                    raise ZygoteError(f"the zygote process failed to start (exit code {self._proc.poll()})")
                self._ready = True

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def fork(self, socket_path: str, threads: int, warm: list[dict] = (), hang_on_request: int = 0,
             compiled: bool = False) -> int:
        """A new host process serving `socket_path`; returns its pid. `warm`: specs of the functions it may load,
        whose kernels the zygote runs first (once per shape) so that hosts share them (see `_warm_up`);
        `compiled`: its functions' one-token calls through compiled code (`faasmoe.models.compiled`), compiled
        here first the same way."""
        return int(self._request({"socket": socket_path, "threads": threads, "warm": list(warm),
                                  "hang_on_request": hang_on_request, "compiled": compiled}, "pid"))

    def warm(self, warm: list[dict], compiled: bool) -> None:
        """Warm (and with `compiled`, compile) these functions' kernels now, as the first fork would: a platform
        that compiles its experts does so while it starts instead of in its first call."""
        self._request({"warm": list(warm), "compiled": compiled}, "warmed")

    def _request(self, req: dict, answer: str):
        """Send one request line; the reply's `answer` field."""
        self.wait_ready()
        with self._lock:
            if not self.alive:
                raise ZygoteError("the zygote process is not running")
            try:
                self._proc.stdin.write(json.dumps(req) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except OSError as e:
                raise ZygoteError(f"the zygote process died: {e}") from e
        if not line:
            raise ZygoteError("the zygote process died")
        try:
            return json.loads(line)[answer]
        except (ValueError, KeyError):
            raise ZygoteError(f"the zygote answered {line.strip()[:200]!r}, not {answer}") from None

    def close(self) -> None:
        if self.alive:
            self._proc.stdin.close()  # the zygote exits; any instance still alive dies with it
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def run() -> None:
    """Zygote side: import once, then fork on every request line."""
    from faasmoe.platforms.local import host  # the import is the point: torch and the handler, once
    from faasmoe.proctitle import set_title

    set_title("zygote")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which then closes our stdin
    # the protocol gets its own descriptor; anything else written to stdout (a compiler's output) goes to stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    warmed: set[tuple] = set()
    for line in sys.stdin:
        req = json.loads(line)
        threads, compiled = int(req.get("threads", 1)), bool(req.get("compiled", False))
        for spec in req.get("warm", []):
            _warm_up(spec, warmed, compiled)
        if "socket" not in req:  # a warm-up alone
            out.write(json.dumps({"warmed": True}) + "\n")
            out.flush()
            continue
        gc.freeze()  # what the zygote built stays out of the hosts' collections: pages they share, not copy
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)  # the platform's pipes belong to the zygote alone
            os.dup2(devnull, 1)
            os.close(out.fileno())
            set_title("function", "host", os.path.basename(req["socket"]).removesuffix(".sock"))
            host.main(req["socket"], threads, int(req.get("hang_on_request", 0)), compiled)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
    os._exit(0)  # stdin closed: our parent is gone or done; skip the interpreter's slow teardown (torch)


def _warm_up(spec_json: dict, warmed: set[tuple], compiled: bool = False) -> None:
    """Run a function shape's kernels here once (`compiled`: its experts compiled), before forking hosts, so that
    every host inherits them copy-on-write instead of compiling its own (see `ExpertFunction.warm_up`). The
    weights mapped for it are unmapped again; a spec that cannot be warmed is left to fail in the host that loads
    it, which reports why."""
    from faasmoe.functions.expert import ExpertFunction
    from faasmoe.functions.spec import FunctionSpec

    try:
        spec = FunctionSpec.from_json(spec_json)
        if (spec.shape, compiled) in warmed:
            return
        warmed.add((spec.shape, compiled))
        # mapped, not read: only the pages of the expert it runs
        ExpertFunction(spec, paged=True, compiled=compiled).warm_up()
    except Exception:  # noqa: BLE001 - the instance will meet the same problem and report it
        pass


if __name__ == "__main__":
    run()

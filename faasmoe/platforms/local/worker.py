"""An instance of an expert function on the embedded platform: a process serving one Unix socket.

It binds its socket at once (so the platform can connect while it loads), maps its
weights, then answers frames on each accepted connection, the first of which is a
READY frame carrying its load time. A bad frame gets an error frame back and the
instance carries on; only an unreadable stream closes that connection, and so does a
length prefix over what the function can legally get (`spec.max_frame_bytes`), refused
before anything is allocated.

Test hook: a spec JSON carrying `"test_hooks": {"hang_on_frame": n}` (see
`LocalPlatform(test_hooks=...)`) makes the instance hang for good on receiving its n-th
frame, so tests get a timed-out call for sure instead of racing to SIGSTOP it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import time

import torch

from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions.spec import FunctionSpec, max_frame_bytes
from faasmoe.platforms.local.transport import recv_frame, send_frame


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc: prctl, malloc_trim
except OSError:  # another C library: no parent-death signal, no trimming
    _LIBC = None
IDLE_TRIM_S = 0.5  # idle this long, an instance hands its allocator's free pages back to the OS


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent (the zygote) dies: no orphaned instances."""
    if _LIBC is not None:
        _LIBC.prctl(1, sig)  # PR_SET_PDEATHSIG


def serve(spec: FunctionSpec, socket_path: str, threads: int = 1, hang_on_frame: int = 0) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    torch.set_num_threads(threads)
    limit = max_frame_bytes(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(socket_path)
    sock.listen(16)
    t0 = time.perf_counter()
    fn = ExpertFunction(spec)
    ready = wire.encode_ready(time.perf_counter() - t0)
    received = 0
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                send_frame(conn, ready)
                while True:
                    _trim_when_idle(conn)
                    if (frame := recv_frame(conn, limit)) is None:
                        break
                    received += 1
                    if received == hang_on_frame:
                        _hang()
                    send_frame(conn, fn.handle(frame))
            except wire.WireError as e:  # a length we will not read: say so, drop this connection only
                try:
                    send_frame(conn, wire.encode_error(f"{spec.id}: {e}"))
                except OSError:
                    pass
            except OSError:
                pass


def _trim_when_idle(conn: socket.socket) -> None:
    """Wait for the next frame; if none comes within IDLE_TRIM_S, return free heap pages first (malloc_trim).

    glibc keeps what a call freed for the next one; an instance idle between steps would hold its largest
    call's temporaries for good (measured: 5.6 -> 3.5 MB of its own memory after 300 varied calls)."""
    if _LIBC is not None and not select.select([conn], [], [], IDLE_TRIM_S)[0]:
        _LIBC.malloc_trim(0)


def _hang() -> None:
    """Test hook: never answer, never exit on our own (the platform's timeout and SIGKILL end us)."""
    while True:
        signal.pause()


def main(spec_json: dict, socket_path: str, threads: int) -> None:
    """Entry point in a freshly forked child of the zygote."""
    die_with_parent()
    try:
        hooks = spec_json.get("test_hooks") or {}
        serve(FunctionSpec.from_json(spec_json), socket_path, threads, int(hooks.get("hang_on_frame", 0)))
    except BaseException as e:  # noqa: BLE001 - report why the instance could not start, then exit
        print(f"faasmoe instance {socket_path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)

"""A host process of the embedded platform: it maps any number of expert functions and answers their calls.

Functions are stateless, so one process can hold many: a function's cold start on a running
host is the mapping of its weights (milliseconds), not a fork, and the process's own memory
(its Python heap, its torch runtime: ~6-10 MB once forked from the zygote) is paid once per
host instead of once per function, and a MoE layer's calls to a host are one request and one
reply however many of its functions they hit. The host binds its socket at once, sends a
READY frame to each connection, then answers requests (see `protocol`) one at a time: unmap,
map, call, reply. A malformed request gets an error frame back and the connection carries
on; only an unreadable stream (or a length over `wire.MAX_FRAME_BYTES`) closes it.

Test hook: `hang_on_request=n` (from `LocalPlatform(test_hooks={"hang_on_frame": n})`) makes
the host hang for good on receiving its n-th request, so tests get a timed-out call for sure
instead of racing to SIGSTOP it.
"""

from __future__ import annotations

import ctypes
import hmac
import os
import select
import signal
import socket
import sys
import time

import torch

from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions.spec import FunctionSpec, drop_from_page_cache, max_frame_bytes
from faasmoe.platforms.local import protocol
from faasmoe.platforms.local.transport import recv_frame, send_frame

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc: prctl, malloc_trim
except OSError:  # another C library: no parent-death signal, no trimming
    _LIBC = None
IDLE_TRIM_S = 0.5  # idle this long, a host hands its allocator's free pages back to the OS
TOKEN_WAIT_S = 5.0  # a TCP connection that does not present the token within this long is closed


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent (the zygote) dies: no orphaned hosts."""
    if _LIBC is not None:
        _LIBC.prctl(1, sig)  # PR_SET_PDEATHSIG


class Host:
    """The functions one process holds, and the handling of one request."""

    def __init__(self, compiled: bool = False):
        """`compiled`: the functions it loads compute one-token calls through compiled code (`ExpertFunction`)."""
        self.functions: dict[str, tuple[ExpertFunction, int]] = {}  # id -> (function, its largest legal frame)
        self.compiled = compiled

    def handle(self, req: protocol.Request) -> protocol.Reply:
        rep = protocol.Reply()
        for fid, drop in req.unloads:
            self.unload(fid, drop)
        for spec_json in req.loads:
            rep.loads.append(self.load(spec_json))
        for fid, frame in req.calls:
            fn, limit = self.functions.get(fid, (None, 0))
            if fn is None:
                rep.results.append(wire.encode_error(f"{fid}: not loaded in this host"))
            elif len(frame) > limit:
                rep.results.append(wire.encode_error(f"{fid}: frame of {len(frame)} bytes exceeds the {limit}-byte "
                                                     f"limit"))
            else:
                rep.results.append(fn.handle(frame))
        return rep

    def load(self, spec_json: dict) -> tuple[float, str]:
        t0 = time.perf_counter()
        try:
            spec = FunctionSpec.from_json(spec_json)
            if spec.id not in self.functions:
                self.functions[spec.id] = (ExpertFunction(spec, compiled=self.compiled), max_frame_bytes(spec))
        except Exception as e:  # noqa: BLE001 - the platform retries elsewhere and reports why
            return time.perf_counter() - t0, f"{type(e).__name__}: {e}"
        return time.perf_counter() - t0, ""

    def unload(self, fid: str, drop: bool) -> None:
        """Unmap a function's weights (its tensors are the mappings' last references); with `drop`, push its byte
        ranges out of the page cache too, which only works once no process maps them."""
        fn, _ = self.functions.pop(fid, (None, 0))
        if fn is None:
            return
        spec = fn.spec
        del fn
        if drop:
            drop_from_page_cache([spec])


def serve(socket_path: str, threads: int = 1, hang_on_request: int = 0, compiled: bool = False) -> None:
    """A forked host: answer connections on a Unix socket (in the platform's private folder) until killed."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    torch.set_num_threads(threads)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(socket_path)
    sock.listen(16)
    serve_connections(sock, Host(compiled), hang_on_request)


def serve_connections(sock: socket.socket, host: Host, hang_on_request: int = 0, token: bytes | None = None) -> None:
    """Answer one connection at a time on a listening socket, until it is closed (or shut down). With `token` (a
    socket others can reach: TCP), a connection's first frame must be the token, within TOKEN_WAIT_S in all, or
    it is closed unanswered; the first connection admitted is the only one: the listening socket is closed
    then, and the function returns when that connection ends (the platform connects once per host)."""
    ready = wire.encode_ready(0.0)
    received = 0
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # the listening socket was closed
            return
        with conn:
            try:
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if token is not None:
                    if not _admitted(conn, token):
                        continue
                    sock.close()
                send_frame(conn, ready)
                while True:
                    _trim_when_idle(conn)
                    if (msg := recv_frame(conn)) is None:
                        break
                    received += 1
                    if received == hang_on_request:
                        _hang()
                    try:
                        reply = protocol.encode_reply(host.handle(protocol.decode_request(msg)))
                    except wire.WireError as e:
                        reply = wire.encode_error(f"bad host request: {e}")
                    send_frame(conn, reply)
            except wire.WireError as e:  # a length we will not read: say so, drop this connection only
                try:
                    send_frame(conn, wire.encode_error(f"host: {e}"))
                except OSError:
                    pass
            except OSError:
                pass
        if token is not None:
            return


def _admitted(conn: socket.socket, token: bytes) -> bool:
    """Whether the connection's first frame is the token (compared in constant time), all of it within
    TOKEN_WAIT_S: a client trickling bytes cannot hold the host longer."""
    want = 4 + len(token)  # the frame's u32 length, then the token
    got = bytearray()
    deadline = time.monotonic() + TOKEN_WAIT_S
    try:
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            conn.settimeout(left)
            chunk = conn.recv(want - len(got))
            if not chunk:
                return False
            got += chunk
        conn.settimeout(None)
    except OSError:
        return False
    return hmac.compare_digest(bytes(got), len(token).to_bytes(4, "little") + token)


def _trim_when_idle(conn: socket.socket) -> None:
    """Wait for the next request; if none comes within IDLE_TRIM_S, return free heap pages first (malloc_trim).

    glibc keeps what a call freed for the next one; a host idle between steps would hold its largest
    call's temporaries for good (measured: 5.6 -> 3.5 MB of an instance's own memory after 300 varied calls)."""
    if _LIBC is not None and not select.select([conn], [], [], IDLE_TRIM_S)[0]:
        _LIBC.malloc_trim(0)


def _hang() -> None:
    """Test hook: never answer, never exit on our own (the platform's timeout and SIGKILL end us)."""
    while True:
        signal.pause()


def main(socket_path: str, threads: int, hang_on_request: int = 0, compiled: bool = False) -> None:
    """Entry point in a freshly forked child of the zygote."""
    die_with_parent()
    try:
        serve(socket_path, threads, hang_on_request, compiled)
    except BaseException as e:  # noqa: BLE001 - report why the host could not start, then exit
        print(f"faasmoe host {socket_path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)

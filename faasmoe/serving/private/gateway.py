"""Share one platform between processes: a Unix-socket gateway and the `gateway` platform that calls it.

In private mode every tenant's orchestrator is its own process, and all of them use
the one pool of expert functions that the server process hosts. The server runs a
`GatewayServer` in front of its platform; each orchestrator's engine uses
`GatewayPlatform`, which sends a whole MoE layer's calls as one message and reads
the replies as one message.

Message (one transport frame each way):
  request  u8 kind (0 invoke, 1 warm), u32 n, then n x (u16 id length, id, u32 frame length, frame)
  reply    u8 0, u32 n, then n x (u32 length, reply frame)   |   u8 1, UTF-8 error message
A warm request carries empty frames and gets no reply (a hint, sent without a round trip).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Sequence

from faasmoe.functions.spec import FunctionSpec
from faasmoe.functions.wire import WireError
from faasmoe.platforms.base import InvocationError, Platform, PlatformConfig
from faasmoe.platforms.local.transport import recv_frame, send_frame

log = logging.getLogger("faasmoe.gateway")
U16, U32 = struct.Struct("<H"), struct.Struct("<I")


INVOKE, WARM = 0, 1


def encode_batch(calls: Sequence[tuple[str, bytes]], kind: int = INVOKE) -> bytes:
    parts = [bytes([kind]), U32.pack(len(calls))]
    for fid, frame in calls:
        b = fid.encode()
        parts += [U16.pack(len(b)), b, U32.pack(len(frame)), frame]
    return b"".join(parts)


def decode_batch(msg: bytes | bytearray) -> tuple[int, list[tuple[str, bytes]]]:
    """(kind, calls) of a request."""
    view = memoryview(msg)
    try:
        kind = view[0]
        if kind not in (INVOKE, WARM):
            raise WireError(f"unknown gateway request kind {kind}")
        (n,) = U32.unpack_from(view, 1)
        off, calls = 5, []
        for _ in range(n):
            (ln,) = U16.unpack_from(view, off)
            fid = bytes(view[off + 2:off + 2 + ln]).decode()
            off += 2 + ln
            (fl,) = U32.unpack_from(view, off)
            if off + 4 + fl > len(view):
                raise WireError("batch message is truncated")
            calls.append((fid, bytes(view[off + 4:off + 4 + fl])))
            off += 4 + fl
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise WireError(f"malformed batch message: {e}") from e
    if off != len(view):
        raise WireError("batch message has trailing bytes")
    return kind, calls


def encode_replies(replies: Sequence[bytes]) -> bytes:
    return b"".join([b"\0", U32.pack(len(replies))] + [U32.pack(len(r)) + r for r in replies])


def decode_replies(msg: bytes | bytearray) -> list[bytes]:
    if not msg:
        raise InvocationError("empty reply from the gateway")
    if msg[0] == 1:
        raise InvocationError(bytes(msg[1:]).decode("utf-8", "replace"))
    view = memoryview(msg)
    (n,) = U32.unpack_from(view, 1)
    off, out = 5, []
    for _ in range(n):
        (ln,) = U32.unpack_from(view, off)
        out.append(bytes(view[off + 4:off + 4 + ln]))
        off += 4 + ln
    return out


class GatewayServer:
    """Serve `platform` to other processes on a Unix socket (one thread per connection)."""

    def __init__(self, platform: Platform, path: str):
        self.platform, self.path = platform, path
        gateway = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                gateway._serve_connection(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        if os.path.exists(path):
            os.unlink(path)
        self._server = Server(path, Handler)
        os.chmod(path, 0o600)  # only this user's processes may invoke functions
        self._thread = threading.Thread(target=self._server.serve_forever, name="faasmoe-gateway", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve_connection(self, sock: socket.socket) -> None:
        while True:
            try:
                msg = recv_frame(sock)
            except (OSError, WireError):
                return
            if msg is None:
                return
            try:
                kind, calls = decode_batch(msg)
                if kind == WARM:
                    self.platform.warm([fid for fid, _ in calls])
                    continue
                reply = encode_replies(self.platform.invoke_many(calls))
            except (InvocationError, KeyError, WireError) as e:
                reply = b"\1" + str(e).encode()
            except Exception as e:  # never let one bad batch take the gateway down
                log.exception("gateway batch failed")
                reply = b"\1" + f"{type(e).__name__}: {e}".encode()
            try:
                send_frame(sock, reply)
            except OSError:
                return


class GatewayPlatform(Platform):
    """A platform that forwards every call to a `GatewayServer` in another process."""

    name = "gateway"

    def __init__(self, config: PlatformConfig, address: str):
        super().__init__(config)
        self.address = address
        self._free: list[socket.socket] = []
        self._lock = threading.Lock()
        self._warm_sock: socket.socket | None = None
        self._warm_lock = threading.Lock()

    def deploy(self, spec: FunctionSpec) -> None:
        """Functions are deployed by the process that owns the platform; nothing to do here."""
        self.log.deployed(spec.id, spec.nbytes)

    def _connect(self) -> socket.socket:
        with self._lock:
            if self._free:
                return self._free.pop()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # a whole layer may include cold starts and retries on the far side
        s.settimeout(self.config.invoke_timeout_s * (self.config.max_retries + 1) + self.config.cold_start_timeout_s)
        try:
            s.connect(self.address)
        except OSError as e:
            s.close()
            raise InvocationError(f"cannot reach the function gateway at {self.address}: {e}") from e
        return s

    def submit(self, calls: Sequence[tuple[str, bytes]]) -> tuple[socket.socket, int]:
        for fid, _ in calls:
            self.log.invoked(fid)
        s = self._connect()
        try:
            send_frame(s, encode_batch(calls))
        except OSError as e:
            s.close()
            raise InvocationError(f"the function gateway went away: {e}") from e
        return s, len(calls)

    def _reply(self, s: socket.socket) -> bytes | bytearray:
        try:
            msg = recv_frame(s)
        except (OSError, WireError) as e:
            s.close()
            raise InvocationError(f"the function gateway went away: {e}") from e
        if msg is None:
            s.close()
            raise InvocationError("the function gateway closed the connection")
        with self._lock:
            self._free.append(s)
        return msg

    def any_cold(self, function_ids: Sequence[str]) -> bool:
        """Not known here: the platform behind the gateway decides what a hint warms."""
        return True

    def warm(self, function_ids: Sequence[str]) -> int:
        """Forward the hint on a connection of its own (warm requests get no reply); 0: the count is not known
        here."""
        if not function_ids:
            return 0
        with self._warm_lock:
            try:
                if self._warm_sock is None:
                    self._warm_sock = self._connect()
                send_frame(self._warm_sock, encode_batch([(fid, b"") for fid in function_ids], WARM))
            except (OSError, InvocationError):  # a hint: calls will find the gateway's trouble on their own
                if self._warm_sock is not None:
                    self._warm_sock.close()
                self._warm_sock = None
        return 0

    def gather(self, batch: tuple[socket.socket, int]) -> list[bytes]:
        s, n = batch
        replies = decode_replies(self._reply(s))
        if len(replies) != n:
            raise InvocationError(f"the gateway answered {len(replies)} of {n} calls")
        return replies

    def close(self) -> None:
        with self._warm_lock:
            if self._warm_sock is not None:
                self._warm_sock.close()
                self._warm_sock = None
        with self._lock:
            for s in self._free:
                s.close()
            self._free.clear()

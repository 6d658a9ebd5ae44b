"""Frames over a byte stream: a u32 little-endian length, then one wire frame.

Used between the embedded platform and its instances (Unix sockets) and by the
gateway that lets other processes invoke functions. The length is checked
against a limit before anything is allocated: `wire.MAX_FRAME_BYTES` by default, the
function's own `spec.max_frame_bytes` where an instance reads its invocations.
"""

from __future__ import annotations

import socket
import struct

from faasmoe.functions.wire import MAX_FRAME_BYTES, WireError

LEN = struct.Struct("<I")


def _check_length(n: int, limit: int) -> None:
    if n > limit:
        raise WireError(f"frame of {n} bytes exceeds the {limit}-byte limit")


def recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    """n bytes into a writable buffer, or None if the peer closed before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> bytearray | None:
    """The next frame, or None on a clean end of stream; WireError, before allocating, if it is over `limit`."""
    head = recv_exactly(sock, LEN.size)
    if head is None:
        return None
    (n,) = LEN.unpack(head)
    _check_length(n, limit)
    body = recv_exactly(sock, n) if n else bytearray()
    if body is None:
        raise ConnectionError("peer closed the connection inside a frame")
    return body


def send_frame(sock: socket.socket, frame: bytes) -> None:
    """Length and frame in one system call (two writes would wake the reader twice)."""
    head = LEN.pack(len(frame))
    sent = sock.sendmsg([head, frame])
    if sent < LEN.size + len(frame):  # a large frame the socket took in part: the rest as a plain stream
        if sent < LEN.size:
            sock.sendall(head[sent:])
            sent = LEN.size
        sock.sendall(memoryview(frame)[sent - LEN.size:])

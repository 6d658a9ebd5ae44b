"""Messages between the embedded platform and its host processes (private to this package).

A host is a long-lived process that maps any number of expert functions and answers their
calls. One request per host and MoE layer carries everything: functions to unmap (and,
where no other host maps them, to drop from the page cache), functions to map, and the
layer's invocation frames for this host, each the function wire format's own
(`faasmoe.functions.wire`) unchanged. The reply carries each load's time or error and each
call's result frame, in order.

Layout (little-endian), each message one length-prefixed frame of the transport:

    request: "FMhq" u16 unloads, u16 loads, u16 calls
             per unload: u8 drop, str function id
             per load:   str spec JSON
             per call:   str function id, bytes frame
    reply:   "FMhr" u16 loads, u16 calls
             per load:   f64 load seconds, str error ("" when it loaded)
             per call:   bytes result frame
    str/bytes: u32 length, then the bytes

Decoding checks every length against what is left, so a malformed message is a
`WireError`, never a crash or an allocation of what a length prefix claims.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from faasmoe.functions.wire import WireError

REQUEST = struct.Struct("<4sHHH")
REPLY = struct.Struct("<4sHH")
REQUEST_MAGIC, REPLY_MAGIC = b"FMhq", b"FMhr"
U8, U32, F64 = struct.Struct("<B"), struct.Struct("<I"), struct.Struct("<d")


@dataclass
class Request:
    unloads: list[tuple[str, bool]] = field(default_factory=list)  # (function id, drop its pages)
    loads: list[dict] = field(default_factory=list)  # FunctionSpec JSON
    calls: list[tuple[str, bytes | bytearray | memoryview]] = field(default_factory=list)  # (function id, frame)


@dataclass
class Reply:
    loads: list[tuple[float, str]] = field(default_factory=list)  # (load seconds, error or "")
    results: list[memoryview] = field(default_factory=list)  # one result (or error) frame per call


def _blob(b: bytes | bytearray | memoryview) -> list:
    return [U32.pack(len(b)), b]


def encode_request(req: Request) -> bytes:
    parts: list = [REQUEST.pack(REQUEST_MAGIC, len(req.unloads), len(req.loads), len(req.calls))]
    for fid, drop in req.unloads:
        parts += [U8.pack(drop), *_blob(fid.encode())]
    for spec in req.loads:
        parts += _blob(json.dumps(spec).encode())
    for fid, frame in req.calls:
        parts += [*_blob(fid.encode()), *_blob(frame)]
    return b"".join(parts)


def encode_reply(rep: Reply) -> bytes:
    parts: list = [REPLY.pack(REPLY_MAGIC, len(rep.loads), len(rep.results))]
    for load_s, error in rep.loads:
        parts += [F64.pack(load_s), *_blob(error.encode("utf-8", "replace"))]
    for frame in rep.results:
        parts += _blob(frame)
    return b"".join(parts)


class _Reader:
    def __init__(self, buf: bytes | bytearray | memoryview):
        self.view = memoryview(buf)
        self.at = 0

    def take(self, n: int) -> memoryview:
        if n > len(self.view) - self.at:
            raise WireError(f"message truncated: {n} bytes wanted at offset {self.at} of {len(self.view)}")
        out = self.view[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, s: struct.Struct) -> tuple:
        return s.unpack(self.take(s.size))

    def blob(self) -> memoryview:
        return self.take(self.unpack(U32)[0])

    def text(self) -> str:
        try:
            return str(self.blob(), "utf-8")
        except UnicodeDecodeError as e:
            raise WireError(f"a string is not UTF-8: {e}") from None

    def end(self) -> None:
        if self.at != len(self.view):
            raise WireError(f"{len(self.view) - self.at} bytes after the end of the message")


def decode_request(buf: bytes | bytearray | memoryview) -> Request:
    r = _Reader(buf)
    magic, n_unload, n_load, n_call = r.unpack(REQUEST)
    if magic != REQUEST_MAGIC:
        raise WireError("bad magic: not a host request")
    req = Request()
    for _ in range(n_unload):
        (drop,) = r.unpack(U8)
        req.unloads.append((r.text(), bool(drop)))
    for _ in range(n_load):
        try:
            req.loads.append(json.loads(r.text()))
        except (ValueError, RecursionError) as e:  # not JSON, or nested past the parser's depth
            raise WireError(f"a load's spec is not JSON: {e}") from None
    for _ in range(n_call):
        fid = r.text()
        req.calls.append((fid, r.blob()))
    r.end()
    return req


def decode_reply(buf: bytes | bytearray | memoryview) -> Reply:
    r = _Reader(buf)
    magic, n_load, n_call = r.unpack(REPLY)
    if magic != REPLY_MAGIC:
        raise WireError("bad magic: not a host reply")
    rep = Reply()
    for _ in range(n_load):
        (load_s,) = r.unpack(F64)
        rep.loads.append((load_s, r.text()))
    for _ in range(n_call):
        rep.results.append(r.blob())
    r.end()
    return rep

"""The binary wire format of an expert-function invocation (version 1). See docs/wire-format.md.

One frame = a 40-byte little-endian header + raw tensor bytes. The same frame is the
body of an HTTP request, a Ray call or a Unix-socket message (there prefixed by its
u32 length). Decoding never executes anything (no pickle) and checks every size
against the header before it touches a byte, so a malformed frame becomes a
`WireError`, never a crash.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Frames arrive as read-only bytes; decoded tensors are views we only read. torch warns about that, from
# this module's frames: silenced here only, not for the process.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=r"faasmoe\.functions\.wire")

MAGIC = b"FMoE"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sIIIII4x")  # magic, version, kind, dtype, reserved, model, layer, block, T, H, P
HEADER_SIZE = HEADER.size
MAX_FRAME_BYTES = 1 << 30  # 1 GiB: far above any real batch, low enough to refuse garbage lengths

# kinds
INVOKE, RESULT, ERROR, READY = 1, 2, 3, 4

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class WireError(ValueError):
    """A frame that does not follow the format, or does not belong to the function that got it."""


@dataclass
class Invocation:
    """What a function gets: T token rows and P (token, expert, weight) routing pairs.

    T = tokens sent to this function, H = hidden size, P = routing pairs (each token
    has one pair per expert of this block it was routed to).
    """

    model: bytes  # 8-byte model digest
    layer: int
    block: int
    hidden: torch.Tensor  # [T, H] in the model dtype
    token: torch.Tensor  # [P] int32, row of `hidden`
    expert: torch.Tensor  # [P] int32, expert id within the layer
    weight: torch.Tensor  # [P] float32, routing weight


def _header(kind: int, dtype_code: int, model: bytes, layer: int, block: int, T: int, H: int, P: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, dtype_code, 0, model, layer, block, T, H, P)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def encode_invocation(inv: Invocation) -> bytes:
    T, H = inv.hidden.shape
    return encode_invocation_raw(inv.model, inv.layer, inv.block, inv.hidden.dtype, T, H, _raw(inv.hidden),
                                 _raw(inv.token.to(torch.int32)), _raw(inv.expert.to(torch.int32)),
                                 _raw(inv.weight.to(torch.float32)))


def encode_invocation_raw(model: bytes, layer: int, block: int, dtype: torch.dtype, T: int, H: int, hidden,
                          token, expert, weight) -> bytes:
    """The same frame from contiguous buffers (numpy arrays: int32 token and expert, float32 weight, the hidden
    rows' raw bytes): the dispatcher's hot path, one copy into the frame and no tensor op."""
    P = memoryview(token).nbytes // 4
    return b"".join((_header(INVOKE, DTYPE_CODES[dtype], model, layer, block, T, H, P), hidden, token, expert,
                     weight))


def encode_result(model: bytes, layer: int, block: int, out: torch.Tensor) -> bytes:
    T, H = out.shape
    return encode_result_raw(model, layer, block, out.dtype, T, H, _raw(out))


def encode_result_raw(model: bytes, layer: int, block: int, dtype: torch.dtype, T: int, H: int, data) -> bytes:
    """The same frame from the output's contiguous bytes (any buffer: a numpy view of its bits)."""
    return b"".join((_header(RESULT, DTYPE_CODES[dtype], model, layer, block, T, H, 0), data))


def encode_error(message: str, model: bytes = b"\0" * 8, layer: int = 0, block: int = 0) -> bytes:
    body = message.encode("utf-8", "replace")[:65536]
    return _header(ERROR, 0, model, layer, block, 0, 0, len(body)) + body


def encode_ready(load_seconds: float) -> bytes:
    return _header(READY, 0, b"\0" * 8, 0, 0, 0, 0, 8) + struct.pack("<d", load_seconds)


@dataclass
class Header:
    kind: int
    dtype: torch.dtype | None
    model: bytes
    layer: int
    block: int
    T: int
    H: int
    P: int


def decode_header(frame: bytes | memoryview) -> Header:
    if len(frame) < HEADER_SIZE:
        raise WireError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, dcode, _, model, layer, block, T, H, P = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise WireError("bad magic: not a faasmoe frame")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks {VERSION})")
    if kind not in (INVOKE, RESULT, ERROR, READY):
        raise WireError(f"unknown frame kind {kind}")
    if dcode not in CODE_DTYPES:
        raise WireError(f"unknown dtype code {dcode}")
    return Header(kind, CODE_DTYPES[dcode], model, layer, block, T, H, P)


def _expect_size(frame: bytes | memoryview, h: Header, body: int) -> None:
    if len(frame) != HEADER_SIZE + body:
        raise WireError(f"frame has {len(frame) - HEADER_SIZE} body bytes, header says {body}")


def _tensor(frame, offset: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(frame, dtype=dtype, count=count, offset=offset)


def span(a: np.ndarray) -> tuple[int, int]:
    """(min, max) of a non-empty integer array: through a list for a few elements, where each numpy reduction
    costs more than the whole list."""
    if len(a) <= 16:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


def decode_invocation_parts(frame: bytes | memoryview) -> tuple[Header, torch.Tensor, np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """A checked invocation frame as its header, hidden states [T * H] (the rows back to back: one token's row is
    this vector; view more as [T, H]) and routing pairs token, expert (int32) and weight (float32) [P]: views of the
    frame, the pairs as numpy arrays (a function's hot path does its bookkeeping in numpy; one array for the three,
    where a tensor each costs several times as much)."""
    h = decode_header(frame)
    if h.kind != INVOKE:
        raise WireError(f"expected an invocation frame, got kind {h.kind}")
    nx = h.T * h.H
    off = HEADER_SIZE + nx * h.dtype.itemsize
    _expect_size(frame, h, off - HEADER_SIZE + h.P * 12)
    hidden = _tensor(frame, HEADER_SIZE, h.dtype, nx)
    pairs = np.frombuffer(frame, dtype=np.int32, count=3 * h.P, offset=off)
    token, expert, weight = pairs[:h.P], pairs[h.P:2 * h.P], pairs[2 * h.P:].view(np.float32)
    if h.P and not (0 <= (bounds := span(token))[0] and bounds[1] < h.T):
        raise WireError(f"routing pair points at a token outside 0..{h.T - 1}")
    return h, hidden, token, expert, weight


def decode_invocation(frame: bytes | memoryview) -> Invocation:
    h, hidden, _, _, _ = decode_invocation_parts(frame)
    hidden = hidden.view(h.T, h.H)
    off = HEADER_SIZE + hidden.numel() * h.dtype.itemsize  # the pairs again, as tensors (read-only frames allowed)
    return Invocation(h.model, h.layer, h.block, hidden, _tensor(frame, off, torch.int32, h.P),
                      _tensor(frame, off + 4 * h.P, torch.int32, h.P),
                      _tensor(frame, off + 8 * h.P, torch.float32, h.P))


def decode_result(frame: bytes | memoryview, dtype: torch.dtype, T: int, H: int) -> torch.Tensor:
    """The [T, H] output of a function; an ERROR frame raises FunctionError with its message."""
    h = decode_header(frame)
    if h.kind == ERROR:
        raise FunctionError(error_message(frame))
    if h.kind != RESULT:
        raise WireError(f"expected a result frame, got kind {h.kind}")
    if (h.T, h.H, h.dtype) != (T, H, dtype):
        raise WireError(f"result is [{h.T}, {h.H}] {h.dtype}, expected [{T}, {H}] {dtype}")
    _expect_size(frame, h, T * H * dtype.itemsize)
    return _tensor(frame, HEADER_SIZE, dtype, T * H).view(T, H)


def error_message(frame: bytes | memoryview) -> str:
    return bytes(frame[HEADER_SIZE:]).decode("utf-8", "replace")


def decode_ready(frame: bytes | memoryview) -> float:
    h = decode_header(frame)
    if h.kind != READY:
        raise WireError(f"expected a ready frame, got kind {h.kind}")
    _expect_size(frame, h, 8)
    return struct.unpack_from("<d", frame, HEADER_SIZE)[0]


class FunctionError(RuntimeError):
    """A function answered with an error frame (bad input it refused); retrying will not help."""

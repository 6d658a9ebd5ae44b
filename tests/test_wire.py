"""The wire format round-trips exactly and refuses anything malformed with a WireError."""

from __future__ import annotations

import socket
import struct

import pytest
import torch

from faasmoe.control.deployment import Deployment
from faasmoe.functions import wire
from faasmoe.functions.spec import max_frame_bytes
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.platforms.local.transport import recv_frame, send_frame


def invocation(dtype=torch.float32, T=4, H=16, P=6) -> wire.Invocation:
    g = torch.Generator().manual_seed(0)
    return wire.Invocation(b"\x01" * 8, 3, 2, torch.randn(T, H, generator=g).to(dtype),
                           torch.randint(0, T, (P,), generator=g, dtype=torch.int32),
                           torch.randint(0, 8, (P,), generator=g, dtype=torch.int32), torch.rand(P, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_invocation_round_trips(dtype):
    inv = invocation(dtype)
    back = wire.decode_invocation(wire.encode_invocation(inv))
    assert (back.model, back.layer, back.block) == (inv.model, 3, 2)
    for name in ("hidden", "token", "expert", "weight"):
        assert torch.equal(getattr(back, name), getattr(inv, name))
    assert back.hidden.dtype == dtype


def test_frames_built_from_numpy_buffers_equal_the_tensor_encoding():
    inv = invocation(torch.bfloat16)
    raw = wire.encode_invocation_raw(inv.model, inv.layer, inv.block, torch.bfloat16, 4, 16,
                                     inv.hidden.view(torch.uint8).numpy(), inv.token.numpy(), inv.expert.numpy(),
                                     inv.weight.numpy())
    assert raw == wire.encode_invocation(inv)


def test_header_is_40_bytes_and_little_endian():
    frame = wire.encode_invocation(invocation(T=1, H=2, P=1))
    assert wire.HEADER_SIZE == 40 and frame[:4] == b"FMoE" and frame[4] == wire.VERSION and frame[5] == wire.INVOKE
    assert len(frame) == 40 + 1 * 2 * 4 + 1 * 12


def test_result_round_trips_and_error_frames_raise():
    out = torch.randn(4, 16)
    assert torch.equal(wire.decode_result(wire.encode_result(b"\0" * 8, 0, 0, out), torch.float32, 4, 16), out)
    with pytest.raises(wire.FunctionError, match="boom"):
        wire.decode_result(wire.encode_error("boom"), torch.float32, 4, 16)
    with pytest.raises(wire.WireError, match="expected"):
        wire.decode_result(wire.encode_result(b"\0" * 8, 0, 0, out), torch.float32, 5, 16)


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f[:10], "shorter than"),
    (lambda f: b"XXXX" + f[4:], "magic"),
    (lambda f: f[:4] + bytes([9]) + f[5:], "version"),
    (lambda f: f[:5] + bytes([77]) + f[6:], "kind"),
    (lambda f: f[:6] + bytes([9]) + f[7:], "dtype"),
    (lambda f: f[:-1], "body bytes"),
    (lambda f: f + b"\0", "body bytes"),
])
def test_malformed_frames_raise_wire_errors(mutate, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode_invocation(mutate(wire.encode_invocation(invocation())))


@pytest.mark.parametrize("index", [99, 4, -1])
def test_pair_pointing_outside_the_tokens_is_refused(index):
    inv = invocation()  # T = 4
    inv.token[0] = index
    with pytest.raises(wire.WireError, match="outside"):
        wire.decode_invocation(wire.encode_invocation(inv))


def test_max_frame_bytes_is_the_largest_legal_invocation(tiny):
    for dtype in ("float32", "bfloat16"):
        spec = Deployment.plan(Checkpoint(tiny), 4, dtype).specs[0]
        T, k = 5, len(spec.experts)
        inv = wire.Invocation(bytes.fromhex(spec.model), spec.layer, spec.block,
                              torch.ones(T, spec.hidden_size, dtype=getattr(torch, dtype)),
                              torch.arange(T, dtype=torch.int32).repeat_interleave(k),
                              torch.tensor(spec.experts, dtype=torch.int32).repeat(T), torch.ones(T * k))
        assert len(wire.encode_invocation(inv)) == max_frame_bytes(spec, T)  # every token to every expert


def test_transport_refuses_a_length_over_the_limit_before_allocating():
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, b"x" * 100)
        assert recv_frame(b, limit=100) == b"x" * 100
        a.sendall(struct.pack("<I", 101))  # no body follows: only a check before reading can answer
        with pytest.raises(wire.WireError, match="exceeds the 100-byte limit"):
            recv_frame(b, limit=100)

"""The wire format round-trips exactly and refuses anything malformed with a WireError."""

from __future__ import annotations

import pytest
import torch

from faasmoe.functions import wire


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


def test_pair_pointing_outside_the_tokens_is_refused():
    inv = invocation()
    inv.token[0] = 99
    with pytest.raises(wire.WireError, match="outside"):
        wire.decode_invocation(wire.encode_invocation(inv))

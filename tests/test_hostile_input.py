"""Hostile bytes at a function: every malformed frame gets an error reply, never a crash (property-based)."""

from __future__ import annotations

import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faasmoe.control.deployment import Deployment
from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.platforms.local.transport import recv_frame, send_frame


@pytest.fixture(scope="module")
def fn(tiny):
    spec = Deployment.plan(Checkpoint(tiny), 2, "float32").specs[0]
    return ExpertFunction(spec)


def valid_frame(fn, T: int = 3) -> bytes:
    s = fn.spec
    return wire.encode_invocation(wire.Invocation(
        bytes.fromhex(s.model), s.layer, s.block, torch.ones(T, s.hidden_size), torch.arange(T, dtype=torch.int32),
        torch.tensor([s.experts[t % len(s.experts)] for t in range(T)], dtype=torch.int32), torch.full((T,), 0.5)))


def answer_kind(reply: bytes) -> int:
    return wire.decode_header(reply).kind


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_get_an_error_frame(fn, data):
    assert answer_kind(fn.handle(data)) == wire.ERROR


@SETTINGS
@given(st.data())
def test_mutated_valid_frames_get_a_result_or_an_error_never_an_exception(fn, data):
    frame = bytearray(valid_frame(fn, data.draw(st.integers(1, 6))))
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "header"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        frame = frame[: data.draw(st.integers(0, len(frame) - 1))]
    elif op == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=64))
    else:  # rewrite one header field with an arbitrary u32 (T, H, P, layer, block)
        offset = data.draw(st.sampled_from([16, 20, 24, 28, 32]))
        struct.pack_into("<I", frame, offset, data.draw(st.integers(0, 2**32 - 1)))
    reply = fn.handle(bytes(frame))
    kind = answer_kind(reply)
    assert kind in (wire.RESULT, wire.ERROR)
    if kind == wire.RESULT:
        h = wire.decode_header(reply)
        assert torch.isfinite(wire.decode_result(reply, h.dtype, h.T, h.H)).all()


@pytest.mark.parametrize("T", [1, 2])  # one token takes its own path (the frames that pass the checks: NaN, inf)
@pytest.mark.parametrize("case", ["nan", "inf", "nan weight", "wrong dtype", "wrong hidden size",
                                  "expert of another block", "negative expert", "expert past the last",
                                  "token past the last", "other model"])
def test_well_formed_but_wrong_frames_are_refused(fn, case, T):
    s = fn.spec
    hidden = torch.ones(T, s.hidden_size)
    expert = torch.tensor([s.experts[0]] * T, dtype=torch.int32)
    token, weight = torch.arange(T, dtype=torch.int32), torch.full((T,), 0.5)
    model = bytes.fromhex(s.model)
    if case == "nan":
        hidden[0, 0] = float("nan")
    elif case == "inf":
        hidden[T - 1, 3] = float("inf")
    elif case == "nan weight":
        weight[T - 1] = float("nan")
    elif case == "negative expert":
        expert[0] = -1
    elif case == "expert past the last":
        expert[T - 1] = 1 << 20
    elif case == "token past the last":
        token[T - 1] = T
    elif case == "wrong dtype":
        hidden = hidden.to(torch.bfloat16)
    elif case == "wrong hidden size":
        hidden = torch.ones(T, s.hidden_size + 1)
    elif case == "expert of another block":
        expert = torch.tensor([7] * T, dtype=torch.int32)
    else:
        model = b"\x00" * 8
    frame = wire.encode_invocation(wire.Invocation(model, s.layer, s.block, hidden, token, expert, weight))
    reply = fn.handle(frame)
    assert answer_kind(reply) == wire.ERROR and s.id in wire.error_message(reply)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_token_experts_add_exactly_what_the_gathered_path_adds(tiny, dtype):
    """The one-token shortcut (a view in, one row added) against index_select / index_add_, bit for bit."""
    from faasmoe.models.layers import gated_mlp

    f = ExpertFunction(Deployment.plan(Checkpoint(tiny), 4, dtype).specs[1])
    e = f.spec.experts
    g = torch.Generator().manual_seed(3)
    T = 5  # e[0]: tokens 0, 2, 4; e[1]: token 2 only; e[2]: token 4 only; e[3]: none
    token = torch.tensor([0, 2, 2, 4, 4], dtype=torch.int32)
    expert = torch.tensor([e[0], e[0], e[1], e[0], e[2]], dtype=torch.int32)
    weight = torch.rand(5, generator=g)
    inv = wire.Invocation(f.digest, f.spec.layer, f.spec.block, torch.randn(T, f.spec.hidden_size, generator=g).to(
        f.dtype), token, expert, weight)
    with torch.inference_mode():
        out = f.compute(inv)
        ref = torch.zeros_like(inv.hidden)
        w = weight.to(f.dtype)[:, None]
        for j in range(3):
            sel = (expert == e[j]).nonzero().flatten()
            rows = token[sel].long()
            y = gated_mlp(inv.hidden.index_select(0, rows), f.gate_up[j], f.down[j], f.act) * w[sel]
            ref.index_add_(0, rows, y)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_one_token_call_adds_its_experts_in_ascending_order_bit_for_bit(tiny, dtype):
    """A single sequence's decode step: one token routed to several experts of the block, listed in any order."""
    from faasmoe.models.layers import gated_mlp

    f = ExpertFunction(Deployment.plan(Checkpoint(tiny), 4, dtype).specs[1])
    e = f.spec.experts
    g = torch.Generator().manual_seed(5)
    expert = torch.tensor([e[2], e[0], e[3]], dtype=torch.int32)
    weight = torch.rand(3, generator=g)
    inv = wire.Invocation(f.digest, f.spec.layer, f.spec.block, torch.randn(1, f.spec.hidden_size, generator=g).to(
        f.dtype), torch.zeros(3, dtype=torch.int32), expert, weight)
    with torch.inference_mode():
        out = f.compute(inv)
        ref = torch.zeros_like(inv.hidden)
        for p, j in ((1, 0), (0, 2), (2, 3)):  # ascending expert order, as transformers adds them
            ref.index_add_(0, torch.tensor([0]), gated_mlp(inv.hidden, f.gate_up[j], f.down[j], f.act)
                           * weight.to(f.dtype)[p:p + 1, None])
    assert torch.equal(out, ref)
    reply = f.handle(wire.encode_invocation(inv))  # the same through the frame path an instance runs
    assert torch.equal(wire.decode_result(reply, f.dtype, 1, f.spec.hidden_size), ref)


def test_routing_weights_round_to_bf16_as_torch_rounds_them():
    """A one-token call rounds its weights in plain Python: the same bf16 values as torch's conversion, ties to
    even, subnormals, the largest finite values (to inf), inf and NaN included."""
    import math

    from faasmoe.functions.expert import _bf16

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(20000, generator=g) * torch.pow(10.0, torch.randint(-40, 39, (20000,), generator=g).float())
    ties = (torch.arange(-512, 512, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # halfway between two
    edge = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, 3.3895e38, 3.4e38, -3.4e38, float("inf"), -float("inf")])
    values = torch.cat([spread, ties, edge])
    values = values[torch.isfinite(values) | torch.isinf(values)]
    ref = values.to(torch.bfloat16).float().tolist()
    got = [_bf16(v) for v in values.tolist()]
    assert [math.copysign(1, a) for a in got] == [math.copysign(1, b) for b in ref] and got == ref
    assert math.isnan(_bf16(float("nan")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_bf16_one_token_call_with_a_non_finite_weight_is_refused(tiny, bad):
    """A bf16 function rounds a one-token call's weights in plain Python: NaN and inf stay what they are, so the
    output is not finite and the call gets an error frame saying why."""
    f = ExpertFunction(Deployment.plan(Checkpoint(tiny), 4, "bfloat16").specs[0])
    e = f.spec.experts
    weight = torch.tensor([0.5, bad, 0.25])
    inv = wire.Invocation(f.digest, f.spec.layer, f.spec.block, torch.ones(1, f.spec.hidden_size, dtype=f.dtype),
                          torch.zeros(3, dtype=torch.int32), torch.tensor(e[:3], dtype=torch.int32), weight)
    reply = f.handle(wire.encode_invocation(inv))
    assert answer_kind(reply) == wire.ERROR and "routing weights contain NaN or inf" in wire.error_message(reply)


def test_large_finite_outputs_pass_the_finiteness_test_and_nan_or_inf_do_not():
    """The test reads exponent bits: the largest finite values of each dtype pass, NaN and inf of either sign
    anywhere do not."""
    from faasmoe.functions.expert import _bits, _finite_bits

    def _finite(t: torch.Tensor) -> bool:  # what `handle` runs on an output
        return _finite_bits(_bits(t), t.dtype)

    big = torch.full((2, 4), 3e38)
    assert _finite(big) and _finite(big.to(torch.bfloat16)) and _finite(torch.zeros(0, 4))
    assert _finite(torch.full((4,), 6e4).half()) and _finite(torch.full((3,), -65504.0).half())
    assert _finite(torch.full((3,), -3.38e38).to(torch.bfloat16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[1, 2] = bad
        assert not _finite(t) and not _finite(t.to(torch.bfloat16)) and not _finite(t.half())


def test_an_absurd_length_prefix_is_refused_and_the_host_survives(tiny, tmp_path):
    import os
    import signal
    import time

    from faasmoe.platforms.local import protocol
    from faasmoe.platforms.local.zygote import Zygote

    spec = Deployment.plan(Checkpoint(tiny), 2, "float32").specs[0]
    path = str(tmp_path / "fn.sock")
    zygote = Zygote.shared()
    zygote.wait_ready()
    pid = zygote.fork(path, 1)  # a host process, talked to directly

    def connect() -> socket.socket:
        deadline = time.time() + 30
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                assert wire.decode_header(recv_frame(s)).kind == wire.READY
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.time() < deadline
                time.sleep(0.01)

    try:
        s = connect()
        s.sendall(struct.pack("<I", 2**32 - 1))  # a length it must not try to read
        reply = recv_frame(s)
        assert answer_kind(reply) == wire.ERROR and "exceeds" in wire.error_message(reply)
        s.close()
        s = connect()  # the host is still there and still serves
        send_frame(s, os.urandom(100))
        assert answer_kind(recv_frame(s)) == wire.ERROR
        send_frame(s, protocol.encode_request(protocol.Request([], [spec.to_json()], [
            (spec.id, valid_frame(ExpertFunction(spec))), (spec.id, os.urandom(100))])))
        rep = protocol.decode_reply(recv_frame(s))
        assert [answer_kind(r) for r in rep.results] == [wire.RESULT, wire.ERROR]
        s.close()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_token_named_twice_for_one_expert_counts_twice(fn):
    """Pairs are summed as sent, even repeated ones (the fast path for 'every row once' must not take them)."""
    s = fn.spec
    e = s.experts[0]
    hidden = torch.randn(2, s.hidden_size, generator=torch.Generator().manual_seed(0))

    def result(tokens: list[int]) -> torch.Tensor:
        frame = wire.encode_invocation(wire.Invocation(
            bytes.fromhex(s.model), s.layer, s.block, hidden, torch.tensor(tokens, dtype=torch.int32),
            torch.tensor([e] * len(tokens), dtype=torch.int32), torch.full((len(tokens),), 0.5)))
        return wire.decode_result(fn.handle(frame), torch.float32, 2, s.hidden_size)

    once = result([0])
    twice = result([0, 0])
    assert torch.allclose(twice[0], 2 * once[0]) and torch.equal(twice[1], torch.zeros(s.hidden_size))


def test_a_tcp_host_answers_only_connections_that_present_the_token(tiny, monkeypatch):
    """A Ray host listens on its node's network: a connection without its token gets nothing, one that trickles
    bytes is dropped after TOKEN_WAIT_S in all, and once the platform's connection is admitted nobody else can
    connect."""
    import threading
    import time

    from faasmoe.platforms.local import host, protocol

    monkeypatch.setattr(host, "TOKEN_WAIT_S", 1.0)
    spec = Deployment.plan(Checkpoint(tiny), 2, "float32").specs[0]
    token = b"t" * 32
    server = socket.create_server(("127.0.0.1", 0))
    serving = threading.Thread(target=host.serve_connections, args=(server, host.Host(), 0, token), daemon=True)
    serving.start()
    address = server.getsockname()

    def refused(s: socket.socket) -> bool:
        try:  # closed (reset, where the host left bytes unread): no READY, no error frame, nothing to learn
            return s.recv(1) == b""
        except ConnectionResetError:
            return True

    for wrong in (b"x" * 32, b"t" * 31, b"t" * 33):
        s = socket.create_connection(address, timeout=10)
        send_frame(s, wrong)
        assert refused(s)
        s.close()
    s = socket.create_connection(address, timeout=10)
    t0 = time.monotonic()
    frame = struct.pack("<I", len(token)) + token
    try:
        for i in range(len(frame) - 1):  # a byte every 0.2 s: each recv is quick, the whole is too slow
            s.sendall(frame[i:i + 1])
            time.sleep(0.2)
    except OSError:
        pass
    assert refused(s) and time.monotonic() - t0 < 5
    s.close()
    s = socket.create_connection(address, timeout=10)
    send_frame(s, token)
    assert wire.decode_header(recv_frame(s)).kind == wire.READY
    with pytest.raises(OSError):  # the listener is closed once the platform's connection is in
        socket.create_connection(address, timeout=2)
    send_frame(s, protocol.encode_request(protocol.Request([], [spec.to_json()], [
        (spec.id, valid_frame(ExpertFunction(spec)))])))
    rep = protocol.decode_reply(recv_frame(s))
    assert rep.loads[0][1] == "" and answer_kind(rep.results[0]) == wire.RESULT
    s.close()
    serving.join(timeout=10)  # that connection ended: the host has nothing left to serve
    assert not serving.is_alive()

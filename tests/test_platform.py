"""The embedded platform: host processes, scale to zero, cold starts, scale-out, retries, bad frames.

Hung hosts come from the host's test hook (`test_hooks={"hang_on_frame": n}`: a host never
answers its n-th request), never from racing to SIGSTOP a fresh process.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest
import torch

from faasmoe.control.deployment import Deployment
from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions.spec import max_frame_bytes
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.platforms import InvocationError, PlatformConfig
from faasmoe.platforms.local.platform import LocalPlatform
from faasmoe.platforms.local.transport import recv_frame, send_frame
from faasmoe.platforms.local.zygote import Zygote


@pytest.fixture(scope="module")
def specs(tiny):
    return Deployment.plan(Checkpoint(tiny), 2, "float32").specs


def frame_for(spec, tokens: int = 3, seed: int = 0) -> tuple[bytes, wire.Invocation]:
    g = torch.Generator().manual_seed(seed)
    inv = wire.Invocation(bytes.fromhex(spec.model), spec.layer, spec.block, torch.randn(tokens, 64, generator=g),
                          torch.arange(tokens, dtype=torch.int32),
                          torch.tensor([spec.experts[i % len(spec.experts)] for i in range(tokens)], dtype=torch.int32),
                          torch.rand(tokens, generator=g))
    return wire.encode_invocation(inv), inv


def expected(spec, inv) -> torch.Tensor:
    return ExpertFunction(spec).compute(inv)


def platform(**cfg) -> LocalPlatform:
    p = LocalPlatform(PlatformConfig(**cfg))
    p.start()
    return p


def test_result_equals_in_process_computation(specs):
    with LocalPlatform(PlatformConfig()) as p:
        for s in specs[:3]:
            p.deploy(s)
        calls = [(s.id, frame_for(s, seed=i)[0]) for i, s in enumerate(specs[:3])]
        replies = p.invoke_many(calls)
        for i, (s, reply) in enumerate(zip(specs[:3], replies)):
            out = wire.decode_result(reply, torch.float32, 3, 64)
            assert torch.equal(out, expected(s, frame_for(s, seed=i)[1]))
        stats = p.log.stats
        assert all(stats[s.id].cold_starts == 1 for s in specs[:3])
        p.invoke_many(calls)  # the same instances again (keep-alive 30 s): warm
        assert all((stats[s.id].cold_starts, stats[s.id].warm_hits, stats[s.id].instances) == (1, 1, 1)
                   for s in specs[:3])


def test_instance_scales_to_zero_after_keep_alive_and_cold_starts_again(specs):
    s = specs[0]
    frame, _ = frame_for(s)
    p = platform(keep_alive_s=0.3)
    try:
        p.deploy(s)
        p.invoke(s.id, frame)  # one call only: a second could find the instance already evicted on a slow machine
        pid = p.instances()[0].pid
        st = p.log.stats[s.id]
        assert (st.cold_starts, st.instances) == (1, 1)
        deadline = time.time() + 10
        while p.instances() and time.time() < deadline:
            time.sleep(0.05)
        assert p.instances() == [] and st.evictions == 1 and st.instances == 0
        assert _gone(pid)  # the process is gone, its memory returned
        p.invoke(s.id, frame)
        assert st.cold_starts == 2
        events = [e.kind for e in p.log.recent if e.function == s.id]
        assert events == ["cold_start", "eviction", "cold_start"]
        cold = [e for e in p.log.recent if e.kind == "cold_start"]
        assert all(e.duration_s > 0 and e.load_s is not None for e in cold)
        # the loads' read throughput: the function's weight bytes per load, over the loads' own time
        assert st.weight_bytes == s.nbytes and st.loaded_bytes == 2 * s.nbytes
        assert st.load_s == pytest.approx(sum(e.load_s for e in cold))
    finally:
        p.close()


def test_killed_instance_does_not_lose_the_call(specs):
    s = specs[1]
    frame, inv = frame_for(s)
    with LocalPlatform(PlatformConfig(), test_hooks={"hang_on_frame": 2}) as p:
        p.deploy(s)
        p.invoke(s.id, frame)
        pid = p.instances()[0].pid
        batch = p.submit([(s.id, frame)])  # its second frame: it never answers this one
        os.kill(pid, signal.SIGKILL)
        reply = p.gather(batch)[0]
        assert torch.equal(wire.decode_result(reply, torch.float32, 3, 64), expected(s, inv))
        st = p.log.stats[s.id]
        assert st.crashes == 1 and st.retries == 1 and st.cold_starts == 2
        assert pid not in [i.pid for i in p.instances()]


def test_hung_instance_times_out_and_the_call_is_retried(specs):
    s = specs[2]
    frame, inv = frame_for(s)
    with LocalPlatform(PlatformConfig(invoke_timeout_s=0.5), test_hooks={"hang_on_frame": 2}) as p:
        p.deploy(s)
        p.invoke(s.id, frame)
        pid = p.instances()[0].pid
        reply = p.invoke(s.id, frame)  # its second frame hangs it; the retry goes to a fresh instance
        assert _gone(pid)  # the hung instance was killed, not left behind
        assert torch.equal(wire.decode_result(reply, torch.float32, 3, 64), expected(s, inv))
        assert p.log.stats[s.id].timeouts == 1


def test_call_fails_clearly_when_every_attempt_dies(specs):
    s = specs[3]
    frame, _ = frame_for(s)
    # every instance hangs on its first frame, so every attempt times out, however fast it would have answered
    with LocalPlatform(PlatformConfig(invoke_timeout_s=0.3, max_retries=1), test_hooks={"hang_on_frame": 1}) as p:
        p.deploy(s)
        with pytest.raises(InvocationError, match=s.id):
            p.invoke(s.id, frame)
        st = p.log.stats[s.id]
        assert (st.timeouts, st.retries, st.cold_starts) == (2, 1, 0)  # no load was ever confirmed


def _concurrent_calls(p: LocalPlatform, s, threads: int = 6, calls: int = 5) -> None:
    frame, _ = frame_for(s, tokens=64)
    barrier = threading.Barrier(threads)
    errors = []

    def worker():
        barrier.wait()
        try:
            for _ in range(calls):
                p.invoke(s.id, frame)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors
    st = p.log.stats[s.id]
    assert st.invocations == threads * calls and st.cold_starts + st.warm_hits == threads * calls


def test_scales_out_under_concurrent_load_up_to_the_limit(specs):
    s = specs[4]
    with LocalPlatform(PlatformConfig(max_instances=3, scale_out_after_s=0)) as p:
        p.deploy(s)
        _concurrent_calls(p, s)
        assert 2 <= p.log.stats[s.id].peak_instances <= 3


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_warm_starts_an_instance_ahead_of_its_first_call_which_is_a_warm_hit(specs):
    s = specs[5]
    with LocalPlatform(PlatformConfig()) as p:
        p.deploy(s)
        assert p.warm([s.id, "not-deployed"]) == 1
        assert p.warm([s.id]) == 0  # already starting
        _wait_for(lambda: p.log.stats[s.id].prefetches == 1)
        frame, inv = frame_for(s)
        reply = p.invoke(s.id, frame)
        assert torch.equal(wire.decode_result(reply, torch.float32, 3, 64), expected(s, inv))
        st = p.log.stats[s.id]
        assert (st.prefetches, st.cold_starts, st.warm_hits, st.invocations) == (1, 0, 1, 1)
        assert p.warm([s.id]) == 0  # it has an instance


def test_warm_through_the_gateway_starts_the_instance_in_the_platform_process(specs, tmp_path):
    from faasmoe.serving.private.gateway import GatewayPlatform, GatewayServer

    s = specs[5]
    with LocalPlatform(PlatformConfig()) as p:
        p.deploy(s)
        gateway = GatewayServer(p, str(tmp_path / "gateway.sock"))
        gateway.start()
        client = GatewayPlatform(PlatformConfig(), gateway.path)
        try:
            client.warm([s.id])
            _wait_for(lambda: p.log.stats[s.id].prefetches == 1)
            frame, inv = frame_for(s)
            assert torch.equal(wire.decode_result(client.invoke(s.id, frame), torch.float32, 3, 64), expected(s, inv))
            assert p.log.stats[s.id].warm_hits == 1
        finally:
            client.close()
            gateway.close()


def test_calls_queue_for_a_busy_instance_before_another_starts(specs):
    # no call waits a minute for a millisecond-long call, so one instance serves the whole burst
    s = specs[4]
    with LocalPlatform(PlatformConfig(max_instances=3, scale_out_after_s=60)) as p:
        p.deploy(s)
        _concurrent_calls(p, s)
        assert p.log.stats[s.id].peak_instances == 1


def test_malformed_payload_gets_an_error_reply_and_the_instance_survives(specs):
    s = specs[0]
    frame, inv = frame_for(s)
    other = specs[1]
    bad = {
        "truncated": frame[:-5],
        "random bytes": os.urandom(200),
        "empty": b"",
        "wrong function": frame_for(other)[0],
        "nan": wire.encode_invocation(wire.Invocation(inv.model, inv.layer, inv.block, inv.hidden * float("nan"),
                                                      inv.token, inv.expert, inv.weight)),
        "token out of range": wire.encode_invocation(wire.Invocation(inv.model, inv.layer, inv.block, inv.hidden,
                                                                     inv.token + 10, inv.expert, inv.weight)),
    }
    with LocalPlatform(PlatformConfig()) as p:
        p.deploy(s)
        p.invoke(s.id, frame)
        pid = p.instances()[0].pid
        for name, payload in bad.items():
            reply = p.invoke(s.id, payload)
            with pytest.raises(wire.FunctionError):
                wire.decode_result(reply, torch.float32, 3, 64)
        assert p.instances()[0].pid == pid and p.log.stats[s.id].crashes == 0
        assert torch.equal(wire.decode_result(p.invoke(s.id, frame), torch.float32, 3, 64), expected(s, inv))


def test_host_refuses_frames_over_their_limits_and_lives(specs, tmp_path):
    """A call frame over its function's limit gets an error frame without reaching the function; a length prefix
    over any frame's limit is refused before its body is read; the host serves on (new connection)."""
    from faasmoe.platforms.local import protocol

    s = specs[0]
    path = str(tmp_path / "host.sock")
    zygote = Zygote.shared()
    zygote.wait_ready()
    pid = zygote.fork(path, 1)  # a host process, talked to directly

    def connect():
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(60)  # only a failure detector: the refusal comes without waiting for any body
        deadline = time.time() + 60
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.time() < deadline and _alive(pid)
                time.sleep(0.01)
        assert wire.decode_header(recv_frame(sock)).kind == wire.READY
        return sock

    def ask(sock, req):
        send_frame(sock, protocol.encode_request(req))
        return protocol.decode_reply(recv_frame(sock))

    try:
        frame, inv = frame_for(s)
        sock = connect()
        rep = ask(sock, protocol.Request([], [s.to_json()], [(s.id, frame + b"\0" * max_frame_bytes(s))]))
        assert rep.loads[0][1] == "" and "exceeds" in wire.error_message(rep.results[0])
        send_frame(sock, b"garbage")  # a malformed request: an error frame, and the connection goes on
        assert wire.decode_header(recv_frame(sock)).kind == wire.ERROR
        assert torch.equal(wire.decode_result(ask(sock, protocol.Request([], [], [(s.id, frame)])).results[0],
                                              torch.float32, 3, 64), expected(s, inv))
        sock.sendall(struct.pack("<I", wire.MAX_FRAME_BYTES + 1))  # and no body
        reply = recv_frame(sock)
        assert wire.decode_header(reply).kind == wire.ERROR and "exceeds" in wire.error_message(reply)
        assert recv_frame(sock) is None  # that connection is closed; the host serves the next one
        sock.close()
        sock = connect()
        rep = ask(sock, protocol.Request([(s.id, False)], [], [(s.id, frame)]))  # unloaded first: not there
        assert "not loaded" in wire.error_message(rep.results[0])
        sock.close()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_platform_answers_a_frame_over_the_limit_itself(specs, monkeypatch):
    monkeypatch.setenv("FAASMOE_MAX_TOKENS_PER_CALL", "4")
    s = specs[1]
    frame, _ = frame_for(s, tokens=8)
    with LocalPlatform(PlatformConfig()) as p:
        p.deploy(s)
        with pytest.raises(wire.FunctionError, match="FAASMOE_MAX_TOKENS_PER_CALL"):
            wire.decode_result(p.invoke(s.id, frame), torch.float32, 8, 64)
        assert p.instances() == [] and p.log.stats[s.id].cold_starts == 0  # no instance was bothered


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: a batch is never split")
def test_a_batch_of_many_rows_is_split_over_hosts_each_keeping_its_functions(specs):
    with LocalPlatform(PlatformConfig(max_instances=4)) as p:
        for s in specs[:4]:
            p.deploy(s)
        for seed in range(2):
            pairs = [(s, frame_for(s, tokens=8, seed=seed)) for s in specs[:4]]  # 32 rows: over SPREAD_ROWS
            replies = p.invoke_many([(s.id, f) for s, (f, _) in pairs])
            for (s, (_, inv)), reply in zip(pairs, replies):
                assert torch.equal(wire.decode_result(reply, torch.float32, 8, 64), expected(s, inv))
        host_of = {i.function: i.pid for i in p.instances()}
        assert len(p.hosts()) == 2 and len(host_of) == 4  # each function in one host only, on both rounds
        assert {host_of[s.id] for s in specs[:4] if s.block % 2 == 0}.isdisjoint(
            {host_of[s.id] for s in specs[:4] if s.block % 2 == 1})
        p.invoke_many([(s.id, frame_for(s, tokens=1)[0]) for s in specs[:4]])  # 4 rows: one request, one host
        holders: dict[int, set[str]] = {}
        for i in p.instances():
            holders.setdefault(i.pid, set()).add(i.function)
        assert any(len(functions) == 4 for functions in holders.values())


def test_one_host_serves_a_batch_and_close_stops_every_host(specs):
    p = platform(max_instances=2)
    for s in specs[:4]:
        p.deploy(s)
    calls = [(s.id, frame_for(s)[0]) for s in specs[:4]]
    p.invoke_many(calls)
    assert len({i.pid for i in p.instances()}) == 1 and len(p.instances()) == 4  # four functions, one process
    done = threading.Barrier(3)
    threads = [threading.Thread(target=lambda: (p.invoke_many(calls), done.wait())) for _ in range(2)]
    for t in threads:
        t.start()
    done.wait(timeout=60)
    pids = p.hosts()
    roles = sorted(label.role for label in p.processes().values())
    assert 1 <= len(pids) <= 2 and roles == ["function"] * len(pids) + ["zygote"]
    p.close()
    assert all(_gone(x) for x in pids)


def test_instances_die_with_the_zygote(specs):
    """Nothing outlives its platform's process: instances are killed when their zygote goes."""
    zygote = Zygote()
    p = LocalPlatform(PlatformConfig())
    p.start()
    p._zygote = zygote  # a private zygote, so the shared one stays up for the other tests
    try:
        p.deploy(specs[0])
        p.invoke(specs[0].id, frame_for(specs[0])[0])
        pid = p.instances()[0].pid
        zygote.close()
        assert _gone(pid)
    finally:
        p.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def test_zygote_warms_each_function_shape_once(tiny, specs):
    """The zygote runs a shape's kernels once before forking its instances (which then share them)."""
    from faasmoe.platforms.local.zygote import _warm_up

    ExpertFunction(specs[0]).warm_up(max_rows=8)  # raises if a path it warms is broken (the zygote would not say)
    warmed: set[tuple] = set()
    _warm_up(specs[0].to_json(), warmed)
    _warm_up(specs[1].to_json(), warmed)  # another function, same shape
    assert len(warmed) == 1
    _warm_up(Deployment.plan(Checkpoint(tiny), 1, "float32").specs[0].to_json(), warmed)  # k=1: another shape
    assert len(warmed) == 2
    _warm_up({"not": "a spec"}, warmed)  # left to fail in the instance, which says why
    assert len(warmed) == 2


def test_two_calls_to_one_function_in_a_batch_leave_it_idle_and_unloadable(specs):
    """A batch may call a function twice (a block over the per-call token cap): it counts as in use once."""
    s = specs[2]
    with LocalPlatform(PlatformConfig()) as p:
        p.deploy(s)
        pairs = [frame_for(s, seed=1), frame_for(s, seed=2)]
        replies = p.invoke_many([(s.id, f) for f, _ in pairs])
        for (_, inv), reply in zip(pairs, replies):
            assert torch.equal(wire.decode_result(reply, torch.float32, 3, 64), expected(s, inv))
        assert p.scale_to_zero() == 1 and p.instances() == []


def test_a_function_that_cannot_load_fails_clearly_and_stops_counting(specs):
    import dataclasses

    s = specs[4]
    broken = dataclasses.replace(s, tensors=tuple(dataclasses.replace(t, file="/nonexistent/shard.safetensors")
                                                  for t in s.tensors))
    with LocalPlatform(PlatformConfig(memory_budget=10 * s.nbytes, max_retries=1)) as p:
        p.deploy(broken)
        with pytest.raises(InvocationError, match="failed to load"):
            p.invoke(broken.id, frame_for(s)[0])
        assert p.log.stats[broken.id].retries == 1
        _wait_for(lambda: p.memory()["resident_bytes"] == 0)  # its bytes were counted while it loaded, not after


def test_two_batches_in_flight_only_where_neither_can_wait_for_the_other(monkeypatch):
    """A batch holds its hosts until gathered, and a large one spreads over min(cores, max_instances) of them:
    a caller's second batch is sure of a host only with fewer cores than max_instances (else the first could
    hold every host and the second wait for ever); under a memory budget it could wait for room the first
    batch's functions hold; on one core it would have nothing to run on."""
    import faasmoe.platforms.local.platform as local

    def batches(**config) -> int:
        p = LocalPlatform(PlatformConfig(**config))
        try:
            return p.concurrent_batches()
        finally:
            p.close()

    monkeypatch.setattr(local, "_CORES", 2)
    assert batches() == 2  # max_instances 4
    assert batches(max_instances=3) == 2
    assert batches(max_instances=2) == 1
    assert batches(memory_budget="1GiB") == 1
    monkeypatch.setattr(local, "_CORES", 4)
    assert batches() == 1
    assert batches(max_instances=5) == 2
    monkeypatch.setattr(local, "_CORES", 1)
    assert batches() == 1

"""A hostile tenant, through the real server: it cannot fail, slow, see or out-spend another tenant."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from helpers import ADMIN, running_server

from faasmoe.control.sequence import SamplingParams
from faasmoe.engines.distributed import Engine

ALICE, BOB, DAVE, EVE = "sk-alice-0001", "sk-bob-0000002", "sk-dave-000004", "sk-eve-0000005"
TENANTS = [
    {"name": "alice", "key": ALICE},
    {"name": "bob", "key": BOB},
    {"name": "dave", "key": DAVE, "max_concurrency": 1, "max_queued": 1},
    {"name": "eve", "key": EVE, "tokens_per_minute": 300, "max_concurrency": 2},
]


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=4, max_tokens_limit=2000,
                        max_prompt_chars=5000, body_timeout_s=1.0, header_timeout_s=1.0, max_connections=64,
                        meter_interval_s=0.5) as base:
        yield base


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(base: str, key: str, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers=auth(key), json={"model": "tiny", **body}, timeout=timeout)


def usage(base: str, key: str) -> dict:
    return httpx.get(f"{base}/v1/usage", headers=auth(key)).json()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def completion_tokens_metric(base: str, tenant: str) -> float:
    text = httpx.get(f"{base}/metrics", headers=auth(ADMIN)).text
    line = f'faasmoe_tokens_total{{kind="completion",tenant="{tenant}"}}'
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


# -- 1. one tenant's sampling settings never fail another's request ---------------------------------------------


def test_a_failing_sequence_fails_alone_in_the_batch(tiny):
    with Engine(tiny, experts_per_function=8) as engine:
        ids = engine.encode("two sequences share a step")
        good = engine.new_sequence(ids, SamplingParams(max_tokens=3))
        bad = engine.new_sequence(ids, SamplingParams(max_tokens=3, temperature=float("nan")))
        engine.step([good, bad])
        assert bad.finish_reason == "error" and "distribution" in bad.error
        assert good.finish_reason is None and len(good.output_ids) == 1
        engine.step([good, bad])
        assert len(good.output_ids) == 2


@pytest.mark.parametrize("settings", [{"temperature": 1e-40}, {"top_p": 1e-46}, {"temperature": 1e-40, "top_p": 1e-46},
                                      {"temperature": 5e-324}])
def test_degenerate_sampling_values_neither_fail_nor_touch_another_tenant(server, settings):
    body = {"model": "tiny", "prompt": "a long answer", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth(BOB), json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)  # bob's request is running: the hostile ones share its batch
        hostile = [post(server, ALICE, prompt="degenerate", max_tokens=8, seed=1, **settings) for _ in range(2)]
        rest = [line for line in lines if line]
    assert all(r.status_code == 200 for r in hostile), [r.text for r in hostile]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    greedy = post(server, ALICE, prompt="degenerate", max_tokens=8, temperature=0).json()["choices"][0]["text"]
    if "temperature" in settings:  # below 1e-5 a temperature samples greedily
        assert hostile[0].json()["choices"][0]["text"] == greedy


def test_nan_or_infinite_sampling_values_are_refused(server):
    for raw in (b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "x", "top_p": Infinity}'):
        r = httpx.post(f"{server}/v1/completions", headers={**auth(ALICE), "Content-Type": "application/json"},
                       content=raw)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("temperature", "top_p")


# -- 2. every generated token is counted, however the request ends ------------------------------------------------


def test_a_stream_closed_early_is_counted_in_usage_metrics_and_rate(server):
    before = usage(server, EVE)
    body = {"model": "tiny", "prompt": "go", "max_tokens": 250, "ignore_eos": True, "stream": True}
    received = 0
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth(EVE), json=body, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received >= 5:
                break  # the client goes away mid-stream
    wait_for(lambda: usage(server, EVE)["in_flight"] == 0)
    after = usage(server, EVE)["usage"]
    generated = after["completion_tokens"] - before["usage"]["completion_tokens"]
    assert generated >= received and after["errors"] == before["usage"]["errors"] + 1
    assert completion_tokens_metric(server, "eve") == after["completion_tokens"]


def test_the_token_rate_covers_completion_tokens(server):
    wait_for(lambda: usage(server, EVE)["in_flight"] == 0)  # eve: 300 tokens a minute
    r = post(server, EVE, prompt="spend", max_tokens=2000, ignore_eos=True)
    assert r.status_code == 429 and "at once" in r.json()["error"]["message"]  # more than a minute's worth
    first = post(server, EVE, prompt="spend", max_tokens=200, ignore_eos=True, timeout=120)
    second = post(server, EVE, prompt="spend", max_tokens=200, ignore_eos=True, timeout=120)
    assert 429 in (first.status_code, second.status_code)  # prompt tokens alone would have let both through
    refused = first if first.status_code == 429 else second
    assert "tokens per minute" in refused.json()["error"]["message"] and int(refused.headers["Retry-After"]) >= 1


# -- 3 and 6. nothing is read or tokenized before the key and the tenant's room are checked -----------------------


def raw_request(base: str, head: bytes, body: bytes = b"", wait: float = 10.0) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"}" in out:
                break
        return out


def headers_for(key: str, length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_wrong_key_is_refused_before_the_body_is_sent(server):
    reply = raw_request(server, headers_for("sk-nobody-at-all", 900_000))  # the body never comes
    assert reply.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in reply


def test_a_tenant_without_room_is_refused_before_its_body_is_sent(server):
    body = {"model": "tiny", "prompt": "hold", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth(DAVE), json=body, timeout=60) as s1:
        lines = s1.iter_lines()  # (kept referenced: a dropped iterator closes the stream)
        next(lines)  # dave's one slot is taken ...
        waiting = threading.Thread(target=post, args=(server, DAVE), kwargs={"prompt": "queued", "max_tokens": 2})
        waiting.start()
        wait_for(lambda: usage(server, DAVE)["waiting"] == 1)  # ... and his one queue place
        reply = raw_request(server, headers_for(DAVE, 900_000))
        assert reply.startswith(b"HTTP/1.1 429") and b"retry-after" in reply.lower()
    waiting.join(60)


def test_a_slow_body_gets_408_and_slow_headers_are_cut(server):
    reply = raw_request(server, headers_for(ALICE, 100), b'{"model": ')  # then nothing
    assert reply.startswith(b"HTTP/1.1 408")
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never complete
        assert s.recv(1024) == b""  # the server closed the connection


def test_refused_requests_are_counted_and_long_prompts_are_refused_before_tokenizing(server):
    before = usage(server, ALICE)["usage"]
    r = post(server, ALICE, prompt="x" * 5001)
    assert r.status_code == 400 and "5000" in r.json()["error"]["message"]
    assert post(server, ALICE, prompt="x", max_tokens=-1).status_code == 400
    assert post(server, ALICE, prompt="x", tools=[{"type": "function"}]).status_code == 400
    after = usage(server, ALICE)["usage"]
    assert after["invalid"] == before["invalid"] + 3 and after["requests"] == before["requests"]


def test_tokenizing_does_not_block_the_event_loop(server, monkeypatch):
    """A prompt being tokenized must leave the server answering: the tokenizer runs off the event loop."""
    import faasmoe.serving.app as app_module

    calls = []
    real = app_module.asyncio.to_thread

    async def spy(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", str(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(app_module.asyncio, "to_thread", spy)
    assert post(server, ALICE, prompt="tokenize me elsewhere", max_tokens=1).status_code == 200
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(ALICE), timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert r.status_code == 200
    assert calls.count("encode") == 2 and "apply_chat_template" in calls


# -- 5. usage shows a tenant nothing of another ------------------------------------------------------------------


def test_usage_reveals_no_other_tenants_totals(server):
    u = usage(server, BOB)
    assert set(u["bill"]) == {"cpu_seconds", "gb_seconds", "own_cpu_seconds", "own_gb_seconds",
                              "shared_cpu_seconds", "shared_gb_seconds"}
    assert "share" not in json.dumps(u).replace("shared_", "")


# -- 7. smaller ones ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "stop", "messages"])
def test_a_lone_surrogate_is_a_400(server, field):
    bad = "bad \ud800 text"
    if field == "messages":
        body = {"model": "tiny", "messages": [{"role": "user", "content": bad}]}
        path = "/v1/chat/completions"
    else:
        body = {"model": "tiny", "prompt": bad if field == "prompt" else "x", "max_tokens": 2}
        body.update({"stop": [bad]} if field == "stop" else {})
        path = "/v1/completions"
    raw = json.dumps(body).encode()  # json escapes the surrogate as \ud800: legal JSON, invalid Unicode
    r = httpx.post(f"{server}{path}", headers={**auth(ALICE), "Content-Type": "application/json"}, content=raw)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_max_queued_is_per_tenant_and_queues_beyond_concurrency(server):
    wait_for(lambda: usage(server, DAVE)["in_flight"] == 0)
    body = {"model": "tiny", "prompt": "hold", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    results: list[httpx.Response] = []
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth(DAVE), json=body, timeout=60) as s1:
        lines = s1.iter_lines()
        next(lines)
        waiter = threading.Thread(target=lambda: results.append(post(server, DAVE, prompt="wait", max_tokens=2)))
        waiter.start()
        wait_for(lambda: usage(server, DAVE)["waiting"] == 1)
        third = post(server, DAVE, prompt="no room", max_tokens=2)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
        assert post(server, ALICE, prompt="alice has room", max_tokens=2).status_code == 200
    waiter.join(60)  # dave's first request went away: the waiting one took its slot
    assert results and results[0].status_code == 200


def test_a_tenant_named_gateway_in_private_mode_breaks_nothing(tiny):
    tenants = [{"name": "gateway", "key": "sk-gateway-0001"}, {"name": "alice", "key": ALICE}]
    with running_server(model=tiny, tenants=tenants, experts_per_function=8, mode="private") as base:
        assert post(base, "sk-gateway-0001", prompt="I am a tenant", max_tokens=3).status_code == 200
        assert post(base, ALICE, prompt="so am I", max_tokens=3).status_code == 200


def test_too_many_connections_get_503(tiny):
    with running_server(model=tiny, tenants=TENANTS[:1], max_connections=2) as base:
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=10)
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, timeout=10)

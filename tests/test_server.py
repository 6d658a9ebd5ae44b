"""The OpenAI-compatible server, called as users call it: the openai client, curl-like raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from helpers import ADMIN, in_threads, metric_sum, running_server

ALICE, BOB, CAROL = "sk-alice-0001", "sk-bob-0000002", "sk-carol-00003"
TENANTS = [
    {"name": "alice", "key": ALICE},
    {"name": "bob", "key": BOB},
    {"name": "carol", "key": CAROL, "max_concurrency": 1, "tokens_per_minute": 400, "max_queued": 0},
]


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=2, keep_alive_s=1.5,
                        max_tokens_limit=256) as base:
        yield base


def client(base: str, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def complete(base: str, key: str, prompt: str, max_tokens: int = 10) -> dict:
    r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_completions_and_chat_with_the_openai_client(server, tiny):
    from transformers import AutoTokenizer

    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok = AutoTokenizer.from_pretrained(tiny)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chatml
    assert chat.usage.prompt_tokens == len(tok.encode(chatml, add_special_tokens=False))


def test_streaming_equals_the_non_streamed_answer(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt="Stream me", max_tokens=8, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt="Stream me", max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].usage.completion_tokens <= 4


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_with_seed_is_reproducible_and_stop_is_honoured(server):
    c = client(server)
    a = c.completions.create(model="tiny", prompt="Seeded", max_tokens=8, temperature=1.0, seed=11)
    b = c.completions.create(model="tiny", prompt="Seeded", max_tokens=8, temperature=1.0, seed=11)
    assert a.choices[0].text == b.choices[0].text
    full = c.completions.create(model="tiny", prompt="Stop here", max_tokens=10, temperature=0).choices[0].text
    if len(full) >= 4:
        cut = c.completions.create(model="tiny", prompt="Stop here", max_tokens=10, temperature=0, stop=[full[2:4]])
        assert cut.choices[0].text == full[: full.index(full[2:4])] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_key_is_401(server, headers):
    r = httpx.post(f"{server}/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", headers=headers).status_code == 401


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 257}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "word " * 3000, "max_tokens": 8}, 400, None),
])
def test_bad_requests_get_openai_style_4xx(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"}, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param


def test_malformed_json_oversized_body_and_bad_chat_are_refused(server):
    h = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/completions", headers=h, content=b'{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/completions", headers=h, content=b"[" + b"1," * 600_000 + b"1]")
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(f"{server}/v1/chat/completions", headers=h, json={"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = httpx.post(f"{server}/v1/chat/completions", headers=h,
                   json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.get(f"{server}/v1/nothing-here", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_concurrency_limit_gives_429_with_retry_after_and_a_dropped_stream_frees_the_slot(server):
    body = {"model": "tiny", "prompt": "hold", "max_tokens": 256, "ignore_eos": True, "stream": True}
    h = {"Authorization": f"Bearer {CAROL}"}
    with httpx.stream("POST", f"{server}/v1/completions", headers=h, json=body, timeout=60) as r:
        lines = r.iter_lines()  # (kept referenced: a dropped iterator closes the stream)
        next(lines)  # carol's one slot is taken while this stream is open
        second = httpx.post(f"{server}/v1/completions", headers=h, json={"model": "tiny", "prompt": "x"})
        assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
        assert second.json()["error"]["type"] == "rate_limit_exceeded"
    deadline = time.time() + 10  # the client went away: its slot comes back
    while time.time() < deadline:
        r = httpx.post(f"{server}/v1/completions", headers=h, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200


def test_token_rate_limit_gives_429(server):
    h = {"Authorization": f"Bearer {CAROL}"}
    statuses = []
    for _ in range(10):  # carol may spend 400 tokens a minute; each of these costs about 60
        r = httpx.post(f"{server}/v1/completions", headers=h, timeout=60,
                       json={"model": "tiny", "prompt": "word " * 50, "max_tokens": 2})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert "tokens per minute" in r.json()["error"]["message"] and "Retry-After" in r.headers
            break
    assert statuses[0] == 200 and statuses[-1] == 429


def test_usage_is_per_tenant_and_metrics_need_the_admin_key(server):
    before = httpx.get(f"{server}/v1/usage", headers={"Authorization": f"Bearer {BOB}"}).json()
    complete(server, ALICE, "only alice", 4)
    alice = httpx.get(f"{server}/v1/usage", headers={"Authorization": f"Bearer {ALICE}"}).json()
    bob = httpx.get(f"{server}/v1/usage", headers={"Authorization": f"Bearer {BOB}"}).json()
    assert alice["tenant"] == "alice" and bob["tenant"] == "bob"
    assert bob["usage"] == before["usage"]  # alice's request is nowhere in bob's answer
    assert "alice" not in json.dumps(bob) and "carol" not in json.dumps(bob)
    assert alice["usage"]["completion_tokens"] > 0
    bill = alice["bill"]  # metered: its part of the shared processes' cost, as amounts only
    assert bill["cpu_seconds"] > 0 and bill["gb_seconds"] > 0 and "token_share" not in bill
    assert httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 403
    assert httpx.get(f"{server}/metrics").status_code == 401
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    for name in ("faasmoe_requests_total", "faasmoe_tokens_total", "faasmoe_time_to_first_token_seconds",
                 "faasmoe_time_per_output_token_seconds", "faasmoe_function_invocations_total",
                 "faasmoe_function_cold_starts_total", "faasmoe_function_warm_hits_total",
                 "faasmoe_function_warm_instances", "faasmoe_queue_depth", "faasmoe_process_cpu_seconds_total",
                 "faasmoe_process_gb_seconds_total", "faasmoe_process_memory_bytes"):
        assert name in text
    assert 'role="control-plane"' in text and 'role="zygote"' in text
    assert 'tenant="alice"' in text


def _run_together(base: str, jobs: list[tuple[str, str]], max_tokens: int) -> list[str]:
    barrier = threading.Barrier(len(jobs))

    def go(key: str, prompt: str) -> str:
        barrier.wait()
        return complete(base, key, prompt, max_tokens)["choices"][0]["text"]

    return in_threads(go, jobs)


def test_shared_mode_batches_tenants_into_the_same_invocations(server):
    jobs = [(ALICE, "The first tenant asks about experts"), (BOB, "The second tenant asks about functions")]
    inv0 = metric_sum(server, "faasmoe_function_invocations_total")
    alone = [complete(server, key, prompt, 16)["choices"][0]["text"] for key, prompt in jobs]
    inv1 = metric_sum(server, "faasmoe_function_invocations_total")
    together = _run_together(server, jobs, 16)
    inv2 = metric_sum(server, "faasmoe_function_invocations_total")
    assert together == alone  # batched greedy output equals unbatched
    assert inv2 - inv1 < inv1 - inv0  # one invocation served both tenants at once
    assert metric_sum(server, "faasmoe_batch_size_sum") > metric_sum(server, "faasmoe_batch_size_count")


def test_functions_scale_to_zero_through_the_server(server):
    complete(server, ALICE, "wake the functions", 4)
    assert metric_sum(server, "faasmoe_function_warm_instances") > 0
    deadline = time.time() + 15
    while time.time() < deadline and metric_sum(server, "faasmoe_function_warm_instances") > 0:
        time.sleep(0.25)
    assert metric_sum(server, "faasmoe_function_warm_instances") == 0
    assert httpx.get(f"{server}/health").json()["warm_instances"] == 0
    cold = metric_sum(server, "faasmoe_function_cold_starts_total")
    complete(server, ALICE, "wake the functions", 4)  # and they come back on demand
    assert metric_sum(server, "faasmoe_function_cold_starts_total") > cold


def test_private_mode_one_orchestrator_per_tenant_same_answers(tiny, server):
    jobs = [(ALICE, "Private orchestrators"), (BOB, "share one function pool")]
    shared = [complete(server, key, prompt, 8)["choices"][0]["text"] for key, prompt in jobs]
    with running_server(model=tiny, tenants=TENANTS[:2], experts_per_function=2, mode="private") as base:
        health = httpx.get(f"{base}/health").json()
        assert health["mode"] == "private"
        private = _run_together(base, jobs, 8)
        assert private == shared
        assert metric_sum(base, "faasmoe_function_invocations_total") > 0
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                       json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert r.status_code == 400


def test_private_mode_prefetch_hints_reach_the_shared_platform(tiny):
    with running_server(model=tiny, tenants=TENANTS[:1], experts_per_function=2, mode="private",
                        prefetch_layers=2) as base:  # two layers ahead: a hint precedes its calls by a layer
        complete(base, ALICE, "Prefetch through the gateway", 4)  # from zero instances: every layer is cold
        deadline = time.time() + 60  # hints are fire-and-forget: their loads finish on their own
        while metric_sum(base, "faasmoe_function_prefetches_total") == 0:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_full_queue_answers_429_instead_of_growing(tiny):
    with running_server(model=tiny, tenants=TENANTS[:2], max_batch=1, max_queue=1, max_tokens_limit=512) as base:
        h = {"Authorization": f"Bearer {ALICE}"}
        body = {"model": "tiny", "prompt": "long", "max_tokens": 512, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", headers=h, json=body, timeout=60) as running:
            first = running.iter_lines()
            next(first)  # the one batch slot is busy
            with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {BOB}"},
                              json=body, timeout=60) as queued:  # waits in the one queue place
                deadline = time.time() + 10
                while httpx.get(f"{base}/health").json()["queue_depth"] < 1 and time.time() < deadline:
                    time.sleep(0.02)
                r = httpx.post(f"{base}/v1/completions", headers=h, json={"model": "tiny", "prompt": "x"})
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and "Retry-After" in r.headers
                queued.close()
        usage = httpx.get(f"{base}/v1/usage", headers=h).json()["usage"]
        assert usage["rejected"] == 1


def test_return_token_ids_extension_gives_the_same_ids_streamed_or_not(server):
    body = {"model": "tiny", "prompt": "ids please", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"}, json=body,
                       timeout=60).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == 6 and all(isinstance(t, int) for t in ids)
    streamed, usage_chunk = [], None
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                msg = json.loads(line[6:])
                if msg["choices"]:
                    streamed += msg["choices"][0].get("token_ids", [])
                else:
                    usage_chunk = msg
    assert streamed == ids
    assert isinstance(usage_chunk["faasmoe"]["cold_start_in_prefill"], bool)
    plain = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"}, timeout=60,
                       json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]

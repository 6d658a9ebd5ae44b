"""Faults and overload through the real server: nothing lost, nothing hangs, no tenant starves another."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import psutil
from helpers import in_threads, running_server

from faasmoe.platforms.local.platform import LocalPlatform
from faasmoe.proctitle import role_of

A, B = "sk-alice-0001", "sk-bob-0000002"
TENANTS = [{"name": "alice", "key": A, "max_concurrency": 16}, {"name": "bob", "key": B, "max_concurrency": 16}]


def complete(base: str, key: str, prompt: str, max_tokens: int = 12, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True})


def instances_of(role: str) -> list[psutil.Process]:
    """Processes under this test process with the given role, read from their titles (function, orchestrator...)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if role_of(p)[0] == role:
                out.append(p)
        except psutil.Error:
            continue
    return out


def run_jobs(base: str, jobs: list[tuple[str, str]]) -> list[httpx.Response]:
    return in_threads(lambda key, prompt: complete(base, key, prompt), jobs)


def test_hosts_killed_under_multitenant_load_lose_nothing(tiny):
    """Function hosts are killed mid-load (two, one at a time: a call gets at most two failed attempts, within its
    retries, whatever the timing); every request completes with the fault-free output."""
    jobs = [(A if i % 2 else B, f"request number {i} about experts") for i in range(8)]
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=2) as base:
        clean = [r.json()["choices"][0]["text"] for r in run_jobs(base, jobs)]
        stop, kills = threading.Event(), []

        def killer():
            rng = random.Random(0)
            while len(kills) < 2 and not stop.wait(0.05):
                victims = [p for p in instances_of("function") if p.pid not in kills]
                if victims:
                    v = rng.choice(victims)
                    try:
                        v.send_signal(signal.SIGKILL)
                        kills.append(v.pid)
                    except psutil.Error:
                        pass

        t = threading.Thread(target=killer)
        t.start()
        try:
            faulty = run_jobs(base, jobs)
        finally:
            stop.set()
            t.join()
    assert len(kills) == 2
    assert [r.status_code for r in faulty] == [200] * len(jobs)
    assert [r.json()["choices"][0]["text"] for r in faulty] == clean  # greedy outputs identical to no faults


def test_hung_function_fails_the_request_clearly_and_the_server_goes_on(tiny, monkeypatch):
    platforms: list[LocalPlatform] = []
    real_init = LocalPlatform.__init__

    def hanging(self, config=None, test_hooks=None):  # every host hangs on its first request (a host test hook)
        real_init(self, config, test_hooks={"hang_on_frame": 1})
        platforms.append(self)

    monkeypatch.setattr(LocalPlatform, "__init__", hanging)
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=8, invoke_timeout_s=0.5,
                        cold_start_timeout_s=2.0, max_retries=1) as base:
        r = complete(base, A, "this one hangs", 4, timeout=60)
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["code"] == "function_failed" and ".L" in err["message"]
        assert "timed out" in err["message"] or "did not start" in err["message"]
        platforms[0]._hang_on = 0  # hosts started from now on answer
        assert complete(base, B, "the server still serves", 4).status_code == 200


def test_a_dead_private_orchestrator_errors_its_requests_and_is_restarted(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=4, mode="private",
                        max_tokens_limit=2000) as base:
        h = {"Authorization": f"Bearer {A}"}
        body = {"model": "tiny", "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        bob: list = []
        with httpx.stream("POST", f"{base}/v1/completions", headers=h, json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            orchestrators = {role_of(p)[1]: p for p in instances_of("orchestrator")}
            bob_thread = threading.Thread(target=lambda: bob.append(complete(base, B, "bob is fine", 6)))
            bob_thread.start()
            orchestrators["alice"].send_signal(signal.SIGKILL)
            rest = [line for line in lines if line]
        bob_thread.join()
        assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][6:])  # an error, not a hang
        assert bob[0].status_code == 200
        r = complete(base, A, "alice again", 4)  # her orchestrator is back
        assert r.status_code == 200


def test_a_flooding_tenant_does_not_starve_another(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=8, max_batch=2,
                        max_tokens_limit=200) as base:
        done: dict[str, float] = {}

        def alice(i):
            complete(base, A, f"flood {i}", 60)
            done[f"alice{i}"] = time.perf_counter()

        threads = [threading.Thread(target=alice, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # alice fills both batch slots and the queue
        t0 = time.perf_counter()
        r = complete(base, B, "bob needs one answer", 10)
        done["bob"] = time.perf_counter()
        for t in threads:
            t.join()
        assert r.status_code == 200
        finished_before_bob = sum(1 for k, v in done.items() if k != "bob" and v < done["bob"])
        assert finished_before_bob <= 4, done  # bob took the next free slot, not the end of alice's queue
        assert done["bob"] - t0 < max(done.values()) - t0


def test_overload_answers_429_and_the_server_recovers(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=8, max_batch=2, max_queue=2,
                        max_tokens_limit=200) as base:
        results: list = []
        barrier = threading.Barrier(12)

        def one(i):
            barrier.wait()  # all at once: 2 run, 2 wait, the rest must be turned away
            results.append(complete(base, A if i % 2 else B, f"burst {i}", 150))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert set(codes) <= {200, 429} and codes.count(429) >= 4 and codes.count(200) >= 2
        assert all("Retry-After" in r.headers for r in results if r.status_code == 429)
        assert httpx.get(f"{base}/health").json()["queue_depth"] == 0
        assert complete(base, A, "after the storm", 4).status_code == 200


def test_request_ids_are_private_to_their_tenant(tiny):
    with running_server(model=tiny, tenants=TENANTS, experts_per_function=8, max_tokens_limit=2000) as base:
        body = {"model": "tiny", "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {A}"}, json=body,
                          timeout=60) as stream:
            rid = stream.headers["X-Request-Id"]
            lines = stream.iter_lines()
            next(lines)
            mine = httpx.get(f"{base}/v1/requests/{rid}", headers={"Authorization": f"Bearer {A}"})
            assert mine.status_code == 200 and mine.json()["status"] == "running"
            theirs = httpx.get(f"{base}/v1/requests/{rid}", headers={"Authorization": f"Bearer {B}"})
            assert theirs.status_code == 404 and rid in theirs.json()["error"]["message"]
            assert "alice" not in theirs.text
            assert httpx.delete(f"{base}/v1/requests/{rid}", headers={"Authorization": f"Bearer {B}"}).status_code == 404
            assert httpx.get(f"{base}/v1/requests/{rid}").status_code == 401
            r = httpx.delete(f"{base}/v1/requests/{rid}", headers={"Authorization": f"Bearer {A}"})
            assert r.status_code == 200
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"

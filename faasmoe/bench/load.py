"""A multi-tenant load generator for any OpenAI-compatible server.

Each tenant has its own arrival process (Poisson at its own rate, or bursty: on periods
at 3x its rate, then silent off periods; or concurrent: a closed loop, every tenant sending
its requests one after another from the start, so that as many requests as tenants are in
flight at once), prompt and output lengths drawn from uniform
ranges, all from one seed: every strategy of a benchmark receives exactly the same
requests at the same offsets. Prompts are English text cut from a shipped corpus (so the
routing is a real text's, see `corpus`) when a tokenizer is given, else random token ids;
outputs use `ignore_eos` (so every strategy generates the same number of tokens).
Requests stream, so time to first token and time per output token are measured at the
client, with the generated token ids (to compare runs exactly).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import httpx


@dataclass
class Workload:
    tenants: int = 6
    rates: list[float] = field(default_factory=lambda: [0.5])  # requests/s per tenant (cycled over tenants)
    arrival: Literal["poisson", "bursty", "concurrent"] = "poisson"
    burst_on_s: float = 5.0  # bursty: mean length of an on period (3x the rate)
    burst_off_s: float | None = None  # bursty: mean length of a silent off period (default: burst_on_s)
    duration_s: float = 60.0  # requests arrive during this window
    max_requests: int | None = None  # per tenant (concurrent: 1 unless given)
    prompt_tokens: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (16, 32)
    seed: int = 0

    def rate(self, tenant: int) -> float:
        return self.rates[tenant % len(self.rates)]


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    tenant: int
    prompt: tuple[int, ...] | str  # token ids, or text
    max_tokens: int
    after_previous: bool = False  # closed loop: sent when the tenant's previous request has ended (`at` is 0)


def schedule(w: Workload, tokenizer=None) -> list[Arrival]:
    """Every request of the run, in time order; the same for the same workload and seed.

    Poisson: exponential gaps at the tenant's rate over the whole window. Bursty: on and off
    periods (exponential, means `burst_on_s` and `burst_off_s`) with Poisson arrivals at 3x the
    rate while on. Concurrent: `max_requests` (default 1) per tenant, each after the tenant's previous one,
    rates and window ignored. With a tokenizer, prompts are corpus text of the drawn token length.
    """
    out: list[Arrival] = []
    for t in range(w.tenants):
        rng = random.Random(f"{w.seed}:{t}")
        if w.arrival == "concurrent":
            for n in range(w.max_requests or 1):
                plen = rng.randint(*w.prompt_tokens)
                prompt = tuple(rng.randint(1000, 30000) for _ in range(plen))
                out.append(Arrival(0.0, t, prompt, rng.randint(*w.output_tokens), after_previous=n > 0))
            continue
        if w.arrival == "bursty":
            windows, start = [], 0.0
            while start < w.duration_s:
                on = rng.expovariate(1 / w.burst_on_s)
                windows.append((start, min(start + on, w.duration_s), 3 * w.rate(t)))
                start += on + rng.expovariate(1 / (w.burst_off_s or w.burst_on_s))
        else:
            windows = [(0.0, w.duration_s, w.rate(t))]
        n = 0
        for begin, end, rate in windows:
            now = begin + rng.expovariate(rate)
            while now < end and (w.max_requests is None or n < w.max_requests):
                plen = rng.randint(*w.prompt_tokens)
                prompt = tuple(rng.randint(1000, 30000) for _ in range(plen))
                out.append(Arrival(now, t, prompt, rng.randint(*w.output_tokens)))
                n += 1
                now += rng.expovariate(rate)
    out.sort(key=lambda a: a.at)
    if tokenizer is None:
        return out
    from faasmoe.bench.corpus import prompt_texts

    texts = prompt_texts(len(out), tokenizer, *w.prompt_tokens, seed=w.seed)
    return [replace(a, prompt=text) for a, text in zip(out, texts)]


@dataclass
class Result:
    tenant: int
    at: float
    ok: bool
    status: int
    prompt_tokens: int
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float = 0.0
    end_s: float = 0.0  # when it ended, seconds after the load started
    error: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cold_prefill: bool | None = None  # the server saw a function cold-start while making its first token


@dataclass
class Target:
    """Where one tenant's requests go."""

    base_url: str
    key: str
    model: str


async def _one(client: httpx.AsyncClient, a: Arrival, target: Target, t0: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + a.at - time.perf_counter()))
    start = time.perf_counter()
    res = Result(a.tenant, a.at, False, 0, len(a.prompt) if isinstance(a.prompt, tuple) else 0)
    body = {"model": target.model, "prompt": a.prompt if isinstance(a.prompt, str) else list(a.prompt),
            "max_tokens": a.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    first = None
    try:
        async with client.stream("POST", f"{target.base_url}/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {target.key}"}) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:500]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    res.error = msg["error"].get("message", "error")
                    return res
                if msg.get("usage"):
                    res.completion_tokens = msg["usage"]["completion_tokens"]
                    res.prompt_tokens = msg["usage"]["prompt_tokens"]
                    res.cold_prefill = (msg.get("faasmoe") or {}).get("cold_start_in_prefill")
                elif msg["choices"]:
                    choice = msg["choices"][0]
                    if choice.get("text") or choice.get("token_ids"):
                        first = first or time.perf_counter()
                    res.text += choice.get("text") or ""
                    res.token_ids += choice.get("token_ids") or []
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    end = time.perf_counter()
    res.end_s = end - t0
    res.ok = res.completion_tokens == a.max_tokens
    if not res.ok:
        res.error = f"{res.completion_tokens} of {a.max_tokens} tokens"
    res.latency_s = end - start
    if first is not None:
        res.ttft_s = first - start
        if res.completion_tokens > 1:
            res.tpot_s = (end - first) / (res.completion_tokens - 1)
    return res


async def run_load(arrivals: list[Arrival], targets: dict[int, Target], timeout_s: float = 600.0,
                   progress=None) -> list[Result]:
    """Send every arrival at its time to its tenant's target (one `after_previous` once the tenant's previous
    arrival has ended); one Result each, in the order of `arrivals`."""
    # a fresh connection per request: with pooled keep-alive connections, 3 of llama-server's 12 requests in a
    # closed loop failed with "Server disconnected without sending a response" (a reused connection it had closed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def tracked(a: Arrival, before: asyncio.Task | None) -> Result:
            if before is not None:
                await before
            r = await _one(client, a, targets[a.tenant], t0)
            if progress is not None:
                progress(r)
            return r

        tasks: list[asyncio.Task] = []
        last: dict[int, asyncio.Task] = {}  # each tenant's latest request
        for a in arrivals:
            tasks.append(task := asyncio.ensure_future(tracked(a, last.get(a.tenant) if a.after_previous else None)))
            last[a.tenant] = task
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "completion_tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "throughput_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "tpot_p50_ms": _ms(percentile(tpot, 0.5)), "tpot_p99_ms": _ms(percentile(tpot, 0.99)),
        "latency_mean_s": statistics.mean(r.latency_s for r in ok) if ok else None,
        "error_examples": [r.error for r in results if not r.ok][:3],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def workload_json(w: Workload) -> dict:
    return asdict(w)

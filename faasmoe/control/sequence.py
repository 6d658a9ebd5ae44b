"""A request being generated: its tokens, KV cache, sampling settings, text and stop rules."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from faasmoe.control.kv_cache import KVCache
from faasmoe.control.model import Chunk

_ids = itertools.count()

SAMPLING_EPS = 1e-5  # a temperature below this samples greedily (as vLLM does): dividing by it overflows


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # below SAMPLING_EPS: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    cache: KVCache
    eos_ids: frozenset[int]
    tenant: str = "default"
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed to a stream
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_chunk(self) -> Chunk:
        """The prompt on the first step, the last sampled token afterwards."""
        if self.cache.length == 0:
            return Chunk(self.cache, torch.tensor(self.prompt_ids, dtype=torch.long), 0)
        return Chunk(self.cache, torch.tensor(self.output_ids[-1:], dtype=torch.long), self.cache.length)

    def append(self, token: int, decode) -> None:
        """Add a sampled token; update the text and decide whether the sequence is done."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.output_ids.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish("stop")
        text = decode(self.output_ids)
        for s in self.params.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
                self.finish("stop")
        self.text = text
        if not self.finished and len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self.finished_at = time.perf_counter()

    def new_text(self) -> str:
        """Text that is safe to stream now: never a partial character or the start of a stop string."""
        safe = len(self.text)
        if not self.finished:
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence the next token will finish
                safe -= 1
            for s in self.params.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta


class SamplingError(ValueError):
    """This sequence's settings gave no distribution to sample from; only this sequence fails."""


def sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    """One token from one sequence's logits [V], with its own settings and generator."""
    p = seq.params
    if p.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)  # [V]
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p
        keep[0] = True  # the most likely token, whatever rounding does to a tiny top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError(f"no valid distribution to sample from (temperature {p.temperature:g}, top_p {p.top_p:g})")
    return int(torch.multinomial(probs, 1, generator=seq.generator))

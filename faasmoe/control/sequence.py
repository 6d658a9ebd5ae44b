"""A request being generated: its token ids, KV cache and sampling settings.

The control plane deals in token ids: a sequence ends on an end-of-sequence token or at max_tokens.
Text (detokenising, stop strings) is the output side's (`engines/output.py`), which ends a sequence
whose text reached a stop string through `stop_at_text`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from faasmoe.control.kv_cache import Chunk, KVCache

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

    def append(self, token: int) -> None:
        """Add a sampled token; end the sequence on an end-of-sequence token or at max_tokens."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish("stop")
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self.finished_at = time.perf_counter()

    def stop_at_text(self) -> None:
        """Its text reached a stop string with the latest token: it ends with 'stop', even where that token
        was also its last allowed one."""
        if self.finish_reason in (None, "length"):
            self.finish_reason, self.error = "stop", None
            self.finished_at = self.finished_at or time.perf_counter()


class SamplingError(ValueError):
    """This sequence's settings gave no distribution to sample from; only this sequence fails."""


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest logit, as torch.argmax picks it (the first of equals; a NaN counts as the
    largest), by numpy's argmax: over a 151,936-token vocabulary on one core torch's took 280 us in fp32 and
    700 in bf16, numpy's 11 (plus 20 to convert bf16 logits to fp32, exactly)."""
    return int(logits.to(torch.float32).numpy().argmax())


def sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    """One token from one sequence's logits [V], with its own settings and generator."""
    p = seq.params
    if p.greedy:
        return greedy_token(logits)
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)  # [V]
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p
        keep[0] = True  # the most likely token, whatever rounding does to a tiny top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError(f"no valid distribution to sample from (temperature {p.temperature:g}, top_p {p.top_p:g})")
    return int(torch.multinomial(probs, 1, generator=seq.generator))

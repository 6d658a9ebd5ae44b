"""The usual way, for comparison: transformers' Qwen2MoeForCausalLM with every expert resident.

`MonolithicEngine` has the interface the scheduler and the server use, so the Baseline
strategy runs behind the very same OpenAI API (`faasmoe serve --mode monolithic`).
Its sequences step one after another (transformers' own forward and cache per
sequence): a full model per tenant, as the Baseline is deployed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2MoeForCausalLM

from faasmoe.control.model import Chunk
from faasmoe.engine import BaseEngine
from faasmoe.platforms.base import Platform, PlatformConfig


class NoPlatform(Platform):
    """No functions: every expert lives inside the model."""

    name = "none"

    def deploy(self, spec) -> None:
        raise RuntimeError("a monolithic model has no functions to deploy")

    def submit(self, calls):
        raise RuntimeError("a monolithic model has no functions to invoke")

    def gather(self, batch):
        raise RuntimeError("a monolithic model has no functions to invoke")

    def close(self) -> None:
        pass


class HFCache:
    """transformers' cache for one sequence, with the `length` the sequence logic reads."""

    def __init__(self, config):
        self.cache = DynamicCache(config=config)
        self.length = 0


class _Model:
    def __init__(self, hf: Qwen2MoeForCausalLM):
        self.hf = hf

    def new_cache(self, capacity: int) -> HFCache:
        return HFCache(self.hf.config)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        rows = []
        for ch in chunks:
            out = self.hf(input_ids=ch.tokens[None], cache=ch.cache.cache, use_cache=True, logits_to_keep=1)
            ch.cache.length = ch.start + len(ch.tokens)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)  # [B, V]


class MonolithicEngine(BaseEngine):
    def __init__(self, model: str | Path, dtype: str | None = None, threads: int | None = None):
        t0 = time.perf_counter()
        super().__init__(model, dtype, threads)
        self.model = _Model(Qwen2MoeForCausalLM.from_pretrained(self.checkpoint.path, dtype=self.dtype).eval())
        self.platform = NoPlatform(PlatformConfig())
        self.load_s = time.perf_counter() - t0

    def describe(self) -> dict:
        return {"engine": "monolithic transformers"}

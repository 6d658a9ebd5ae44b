"""The distributed model as one object: control plane here, experts as functions on a platform.

    engine = faasmoe.load("models/tiny", experts_per_function=2)
    result = engine.generate("Hello", max_tokens=16)
    engine.close()

`step` advances any set of sequences by one token together; `generate` is a loop
of steps over one sequence, and the server's scheduler calls `step` with all of
its running requests.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from faasmoe.checkpoint import Checkpoint
from faasmoe.control.dispatch import ExpertDispatcher
from faasmoe.control.model import ControlPlane
from faasmoe.control.sequence import SamplingParams, Sequence, sample_one
from faasmoe.functions import wire
from faasmoe.functions.packing import contiguous_blocks
from faasmoe.functions.spec import FunctionSpec, function_specs
from faasmoe.platforms import PlatformConfig, create_platform
from faasmoe.platforms.base import totals
from faasmoe.weights import torch_dtype


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class BaseEngine:
    """What every engine shares: tokenizer, stop ids, request checks, sampling, the generate loop.

    A subclass provides `model` with `new_cache(capacity)` and `forward(chunks) -> logits [B, V]`,
    and `counters()`.
    """

    def __init__(self, model: str | Path, dtype: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.checkpoint = ckpt = Checkpoint(model)
        self.config = ckpt.config
        self.dtype = torch_dtype(dtype or ckpt.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
        self.eos_ids = frozenset(_eos_ids(ckpt.path, self.config, self.tokenizer))
        self.load_s = 0.0

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def counters(self) -> dict[str, float]:
        """Cumulative counters (invocations, ...); `generate` reports their change over a call."""
        return {}

    def cold_starts(self) -> int:
        """Function instances started so far, on a call or ahead of one (read at every step: cheap)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Fixed facts about the deployment, reported with every generation."""
        return {}

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, V] logits at every position of a fresh sequence (what transformers' forward returns)."""
        seq = self.new_sequence(list(token_ids), SamplingParams(max_tokens=1))
        chunk = seq.next_chunk()
        return self.model.forward([chunk], all_logits=True)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, saying why, for a request this model cannot serve."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_context} tokens")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, tenant: str = "default") -> Sequence:
        """A sequence ready to step, with its KV cache allocated for prompt + max_tokens."""
        self.check_request(prompt_ids, params)
        return Sequence(list(prompt_ids), params, self.model.new_cache(len(prompt_ids) + params.max_tokens),
                        self.eos_ids, tenant)

    def step(self, seqs: list[Sequence]) -> None:
        """Advance every unfinished sequence by one token, all in one batched forward pass."""
        seqs = [s for s in seqs if not s.finished]
        if not seqs:
            return
        logits = self.model.forward([s.next_chunk() for s in seqs])  # [B, V]
        for seq, row in zip(seqs, logits):
            try:  # a failure that is one sequence's own (its sampling, its text) ends that sequence alone
                seq.append(sample_one(row, seq), self.decode)
            except (ValueError, RuntimeError) as e:
                seq.finish("error", str(e))

    def generate(self, prompt: str | list[int], max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | tuple[str, ...] = (), ignore_eos: bool = False) -> Generation:
        t0 = time.perf_counter()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        t_tok = time.perf_counter()
        params = SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop), ignore_eos)
        seq = self.new_sequence(ids, params)
        before = self.counters()
        self.step([seq])  # prefill + first token
        t_prefill = time.perf_counter()
        while not seq.finished:
            self.step([seq])
        t_end = time.perf_counter()
        after = self.counters()
        n = len(seq.output_ids)
        stats = {k: after[k] - before[k] for k in after}
        stats.update(self.describe())
        stats.update(
            prompt_tokens=len(ids), completion_tokens=n, load_s=self.load_s, tokenize_s=t_tok - t0, prefill_s=t_prefill - t_tok,
            decode_s=t_end - t_prefill, total_s=t_end - t0,
            decode_ms_per_token=1000 * (t_end - t_prefill) / (n - 1) if n > 1 else None,
        )
        return Generation(seq.text, seq.output_ids, len(ids), seq.finish_reason, stats)

class Engine(BaseEngine):
    """The distributed model: this process runs the control plane, a FaaS platform runs the experts."""

    def __init__(self, model: str | Path, *, experts_per_function: int = 1, platform: str = "local",
                 platform_config: PlatformConfig | None = None, dtype: str | None = None, prewarm: bool = False,
                 threads: int | None = None, platform_options: dict[str, Any] | None = None,
                 prefetch_layers: int = 0):
        t0 = time.perf_counter()
        super().__init__(model, dtype, threads)
        ckpt, c = self.checkpoint, self.config
        self.blocks = contiguous_blocks(c.num_experts, experts_per_function)
        self.experts_per_function = experts_per_function
        self.specs: list[FunctionSpec] = function_specs(ckpt, self.blocks, str(self.dtype).removeprefix("torch."))
        self.platform = create_platform(platform, platform_config, **(platform_options or {}))
        self.platform.start()
        try:
            for spec in self.specs:
                self.platform.deploy(spec)
            self.platform.finish_deploy()
            self.dispatcher = ExpertDispatcher(self.platform, ckpt.digest, self.blocks, c.num_experts, self.dtype)
            self.model = ControlPlane(ckpt, self.dtype, self.dispatcher, prefetch_layers=prefetch_layers)
            if prewarm:
                self.prewarm()
        except BaseException:
            self.platform.close()
            raise
        self.load_s = time.perf_counter() - t0

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self.platform.close()

    def prewarm(self) -> None:
        """Cold-start one instance of every function now, so the first request finds them warm."""
        self.platform.invoke_many(prewarm_calls(self.specs))

    def describe(self) -> dict[str, Any]:
        return {"experts_per_function": self.experts_per_function, "functions": len(self.specs),
                "platform": self.platform.name}

    def cold_starts(self) -> int:
        return self.platform.log.cold_starts + self.platform.log.prefetches

    def counters(self) -> dict[str, float]:
        """Cumulative invocation, cold start, warm hit and dispatch counters of this engine."""
        t = totals(self.platform.log.stats)
        d = self.dispatcher.stats
        return {"invocations": int(t.get("invocations", 0)), "cold_starts": int(t.get("cold_starts", 0)),
                "prefetches": int(t.get("prefetches", 0)),
                "warm_hits": int(t.get("warm_hits", 0)), "evictions": int(t.get("evictions", 0)),
                "retries": int(t.get("retries", 0)), "crashes": int(t.get("crashes", 0)),
                "dispatches": d.dispatches, "dispatch_wait_s": d.wait_s, "tokens_sent": d.tokens_sent,
                "bytes_sent": d.bytes_sent, "bytes_received": d.bytes_received}


def _eos_ids(path: Path, config, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json, the config and the tokenizer."""
    import json

    ids: set[int] = set()
    for v in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    gen = path / "generation_config.json"
    if gen.is_file():
        v = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    return ids


def prewarm_calls(specs: list[FunctionSpec]) -> list[tuple[str, bytes]]:
    """One call per function with no routing pairs (the function answers zeros): enough to cold-start it."""
    calls = []
    for s in specs:
        dtype = torch_dtype(s.dtype)
        empty = torch.zeros(0, dtype=torch.int32)
        inv = wire.Invocation(bytes.fromhex(s.model), s.layer, s.block, torch.zeros(1, s.hidden_size, dtype=dtype),
                              empty, empty, torch.zeros(0))
        calls.append((s.id, wire.encode_invocation(inv)))
    return calls


def load(model: str | Path, **options) -> Engine:
    """Open a checkpoint directory and deploy its experts as functions. Options: see `Engine`."""
    return Engine(model, **options)

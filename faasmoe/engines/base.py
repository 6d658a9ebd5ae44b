"""What every engine shares: tokenizer, stop ids, request checks, sampling, the generate loop.

An engine is a model that steps many sequences at once. `Engine` (engines/distributed.py) runs the
control plane here and the experts as functions; `MonolithicEngine` keeps every expert resident.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from faasmoe.control.sequence import SamplingParams, Sequence, sample_one
from faasmoe.engines.output import TextOutput
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.weights import torch_dtype

DEFAULT_THREADS = torch.get_num_threads()  # torch's own (a thread per physical core), read before any engine sets it


class InvalidRequest(ValueError):
    """A request this model cannot serve (400); `code` is the OpenAI error code and `param` the request field at
    fault, where they fit."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


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

    A subclass provides `control_plane` with `new_cache(capacity)` and `forward(chunks) -> logits [B, V]`,
    and `counters()`.
    """

    def __init__(self, model: str | Path, dtype: str | None = None, threads: int | None = None):
        torch.set_num_threads(threads or DEFAULT_THREADS)  # process-wide: an earlier engine's count must not stay
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
        return self.control_plane.forward([chunk], all_logits=True)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest, saying why, for a request this model cannot serve: the one check of a request
        against the model (the server calls it once, when a request is submitted)."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise InvalidRequest(f"this model's context is {self.max_context} tokens; the prompt has "
                                 f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens}",
                                 "context_length_exceeded")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})",
                                 param="prompt")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, tenant: str = "default") -> Sequence:
        """A sequence ready to step, with its KV cache allocated for prompt + max_tokens (a request that passed
        `check_request`)."""
        return Sequence(list(prompt_ids), params, self.control_plane.new_cache(len(prompt_ids) + params.max_tokens),
                        self.eos_ids, tenant)

    def step(self, seqs: list[Sequence]) -> None:
        """Advance every unfinished sequence by one token, all in one batched forward pass."""
        seqs = [s for s in seqs if not s.finished]
        if not seqs:
            return
        logits = self.control_plane.forward([s.next_chunk() for s in seqs])  # [B, V]
        for seq, row in zip(seqs, logits):
            try:  # a failure that is one sequence's own (its sampling) ends that sequence alone
                seq.append(sample_one(row, seq))
            except (ValueError, RuntimeError) as e:
                seq.finish("error", str(e))

    def generate(self, prompt: str | list[int], max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | tuple[str, ...] = (), ignore_eos: bool = False) -> Generation:
        t0 = time.perf_counter()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        t_tok = time.perf_counter()
        params = SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop), ignore_eos)
        self.check_request(ids, params)
        seq = self.new_sequence(ids, params)
        output = TextOutput(self.decode, params.stop)
        before = self.counters()
        self.step([seq])  # prefill + first token
        output.update(seq)
        t_prefill = time.perf_counter()
        while not seq.finished:
            self.step([seq])
            output.update(seq)
        t_end = time.perf_counter()
        after = self.counters()
        n = len(seq.output_ids)
        stats = {k: after[k] - before[k] for k in after}
        stats.update(self.describe(), threads=torch.get_num_threads())
        stats.update(
            prompt_tokens=len(ids), completion_tokens=n, load_s=self.load_s, tokenize_s=t_tok - t0, prefill_s=t_prefill - t_tok,
            decode_s=t_end - t_prefill, total_s=t_end - t0,
            decode_ms_per_token=1000 * (t_end - t_prefill) / (n - 1) if n > 1 else None,
        )
        return Generation(output.text, seq.output_ids, len(ids), seq.finish_reason, stats)


def _eos_ids(path: Path, config, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json, the config and the tokenizer."""
    ids: set[int] = set()
    for v in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    gen = path / "generation_config.json"
    if gen.is_file():
        v = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(v if isinstance(v, list) else [v] if v is not None else [])
    return ids

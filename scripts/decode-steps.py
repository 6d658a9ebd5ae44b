"""Milliseconds per decode step of faasmoe's engines, for A/B runs of two versions of the code.

    .venv/bin/python scripts/decode-steps.py MODEL K SEQUENCES STEPS ROUNDS [PROMPT_TOKENS]   # K = 0: monolithic

Each round starts SEQUENCES greedy sequences (ignore_eos), runs their prefill, then times STEPS decode steps
of all of them together; it prints each round's ms a step and a hash of the generated ids (equal hashes:
the same tokens). Without PROMPT_TOKENS the prompts are one sentence differing in a number (their sequences
route alike: few distinct experts a layer); with it, each sequence's prompt is that many token ids drawn at
random (seeded), so that the sequences route as different requests do. The thread count is process-wide, so
compare versions in separate processes, alternating them (the machine's speed drifts: see
docs/benchmarks.md, section 5). FAASMOE_COMPILE_EXPERTS=1: the functions compute their experts as
inductor-compiled code (`compile_experts`).
"""

from __future__ import annotations

import os
import sys
import time

import torch

import faasmoe
from faasmoe.control.sequence import SamplingParams
from faasmoe.engines.monolithic import MonolithicEngine
from faasmoe.platforms import PlatformConfig


def main(model: str, k: int, sequences: int, steps: int, rounds: int, prompt_tokens: int = 0) -> None:
    compiled = os.environ.get("FAASMOE_COMPILE_EXPERTS") == "1"
    t = time.perf_counter()
    engine = (MonolithicEngine(model) if k == 0 else
              faasmoe.load(model, experts_per_function=k, prewarm=True,
                           platform_config=PlatformConfig(compile_experts=compiled)))
    print(f"loaded in {time.perf_counter() - t:.1f} s (compile_experts: {compiled})", flush=True)
    try:
        if prompt_tokens:
            vocab = engine.config.vocab_size
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(sequences)]
        else:
            prompts = [engine.encode(f"The quick brown fox {i} jumps over the lazy dog and keeps running")
                       for i in range(sequences)]
        times = []
        for _ in range(rounds):
            seqs = [engine.new_sequence(p, SamplingParams(steps + 1, ignore_eos=True)) for p in prompts]
            engine.step(seqs)  # prefill and first token
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step(seqs)
            times.append((time.perf_counter() - t0) / steps * 1000)
        ids = hash(tuple(tuple(s.output_ids) for s in seqs)) % 10000
        print(f"k={k} nseq={sequences}: " + " ".join(f"{t:.1f}" for t in times), "tokens", ids, flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__)
    main(sys.argv[1], *map(int, sys.argv[2:]))

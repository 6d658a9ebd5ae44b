"""English prompts for benchmarks, cut from a public-domain corpus shipped with the package.

Random token ids route unlike text: a router sees hidden states of real tokens in context. The corpus
(data/factbook-backgrounds.txt, see data/README.md) is real English prose, so prompts cut from it route
the way a served model's requests would, and every machine has it (nothing is downloaded).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib.resources import files
from typing import Any

import torch

CORPUS_FILE = "factbook-backgrounds.txt"
# A sentence ends at . ! or ? followed by space and a capital, digit, quote or parenthesis.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"(])")


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The corpus's sentences in order (paragraphs concatenated; '#' header lines skipped)."""
    text = files("faasmoe.bench").joinpath("data", CORPUS_FILE).read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return tuple(out)


def _count(tokenizer: Any, text: str) -> int:
    """Token count with either a `transformers` tokenizer or a `tokenizers.Tokenizer`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(getattr(ids, "ids", ids))


def _cut(tokenizer: Any, sents: tuple[str, ...], start: int, target: int, lo: int, hi: int) -> str | None:
    """The text from sentence `start` whose token count is nearest `target` within [lo, hi].

    Whole sentences when a sentence boundary lands in range, else the sentence that crosses
    `target` is cut at a word boundary; None if neither fits (a word spans the whole range).
    """
    text, n = "", 0
    i = start
    while n < target:  # sentences until the count reaches the target
        nxt = f"{text} {sents[i % len(sents)]}".lstrip()
        m = _count(tokenizer, nxt)
        if m >= target:
            options = [(abs(c - target), t) for c, t in ((n, text), (m, nxt)) if lo <= c <= hi]
            if options:
                return min(options, key=lambda o: o[0])[1]
            break
        text, n = nxt, m
        i += 1
    words = sents[i % len(sents)].split(" ")
    best = None
    for w in range(1, len(words) + 1):  # words of the crossing sentence, the last one that fits
        cand = f"{text} {' '.join(words[:w])}".lstrip()
        c = _count(tokenizer, cand)
        if c > hi:
            break
        if c >= lo:
            best = cand
        if c >= target:
            break
    return best


def prompt_texts(n: int, tokenizer: Any, min_tokens: int, max_tokens: int, seed: int = 0) -> list[str]:
    """`n` English prompts of min_tokens..max_tokens tokens each, the same for the same arguments.

    Each prompt draws a length uniformly in the range and a start sentence, and runs on through the
    following sentences to the sentence boundary nearest that length (a word boundary when no sentence
    boundary falls in the range), so lengths spread over the range like the random-id prompts did.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    sents = sentences()
    rng = random.Random(f"corpus:{seed}")
    out: list[str] = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens)
        for _try in range(100):
            text = _cut(tokenizer, sents, rng.randrange(len(sents)), target, min_tokens, max_tokens)
            if text is not None:
                out.append(text)
                break
        else:
            raise ValueError(f"no prompt of {min_tokens}..{max_tokens} tokens found in the corpus")
    return out


def expert_top_share(counts: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of routed (token, expert) pairs taken by the most-used `fraction` of experts.

    `counts` holds one count per expert (one layer). The top max(1, round(fraction * experts)) experts
    count, so 60 experts give the top 6; a uniform router gives about `fraction`, a skewed one more.
    """
    counts = counts.flatten().to(torch.float64)
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    k = max(1, round(fraction * counts.numel()))
    return float(counts.topk(k).values.sum()) / total

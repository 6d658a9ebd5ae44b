"""The bundled English corpus: deterministic prompts within a token range, and the expert-share helper."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from faasmoe.bench.corpus import expert_top_share, prompt_texts, sentences
from faasmoe.models.presets import tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def test_corpus_is_english_prose():
    s = sentences()
    assert len(s) > 1000 and not any(x.startswith("#") for x in s)
    assert sum(len(x) for x in s) > 100_000 and all(x.isascii() for x in s)


@pytest.mark.parametrize("lo,hi", [(16, 64), (4, 8), (20, 20), (200, 400)])
def test_prompts_fall_in_the_token_range(tok, lo, hi):
    prompts = prompt_texts(40, tok, lo, hi, seed=1)
    counts = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    assert len(prompts) == 40 and all(lo <= c <= hi for c in counts)
    assert len(set(prompts)) > 30
    if hi - lo >= 40:  # lengths spread over the range; wide ranges end at sentence boundaries
        assert max(counts) - min(counts) > (hi - lo) / 2
        assert sum(p.endswith((".", "!", "?")) for p in prompts) > 30


def test_prompts_are_deterministic(tok):
    assert prompt_texts(10, tok, 16, 64, seed=5) == prompt_texts(10, tok, 16, 64, seed=5)
    assert prompt_texts(10, tok, 16, 64, seed=5) != prompt_texts(10, tok, 16, 64, seed=6)
    with pytest.raises(ValueError):
        prompt_texts(1, tok, 10, 5, seed=0)


def test_expert_top_share():
    assert expert_top_share(torch.ones(60)) == pytest.approx(0.1)
    assert expert_top_share(torch.tensor([5.0, 1, 1, 1, 1, 1, 0, 0])) == pytest.approx(0.5)  # top 1 of 8
    assert expert_top_share(torch.zeros(4)) == 0.0
    assert expert_top_share(torch.tensor([0.0] * 54 + [10.0] * 6)) == 1.0

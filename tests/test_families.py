"""Every supported MoE family, served end to end: the OpenAI API's answers are transformers' answers."""

from __future__ import annotations

import httpx
import pytest
from conftest import FAMILY_VARIANTS
from helpers import greedy_reference, running_server

from faasmoe.models import FAMILIES, family_class
from faasmoe.models.checkpoint import Checkpoint, CheckpointError

KEY = "sk-family-test-0001"


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_each_family_is_served_through_the_openai_api_exactly(checkpoint, reference, variant):
    from transformers import AutoTokenizer

    path = checkpoint(variant)
    messages = [{"role": "user", "content": "Name three colours."}]
    with running_server(model=path, tenants=[{"name": "t", "key": KEY}], experts_per_function=2) as base:
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": variant, "messages": messages, "max_tokens": 8, "temperature": 0,
                             "return_token_ids": True})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    assert ids == greedy_reference(reference(path), prompt, 8)


def test_every_family_names_its_transformers_classes():
    import transformers

    for model_type, target in FAMILIES.items():
        family = family_class(model_type)
        assert family.model_type == model_type, target
        assert hasattr(transformers, family.architecture) and hasattr(transformers, family.config_class)
        assert getattr(transformers, family.config_class).model_type == model_type


def test_an_unsupported_family_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported; supported: deepseek_v2, "
                                              "deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe"):
        Checkpoint(tmp_path)


def test_mixtral_gate_and_up_map_apart_without_a_copy(checkpoint):
    """w1, w2, w3 in name order: gate and up are never adjacent, so an expert keeps them as two mapped matrices."""
    from faasmoe.control.deployment import Deployment
    from faasmoe.functions.expert import ExpertFunction

    ckpt = Checkpoint(checkpoint("mixtral"))
    fn = ExpertFunction(Deployment.plan(ckpt, 2).specs[0])
    gate, up = fn.gate_up[0]
    assert gate.shape == up.shape == (32, 64)
    assert not gate.untyped_storage().resizable()  # a file mapping, not a tensor of its own


def test_deepseek_caches_one_latent_per_position(checkpoint):
    """MLA's cache holds kv_lora_rank + rope dims per position and layer, not every head's keys and values."""
    import faasmoe

    with faasmoe.load(checkpoint("deepseek-v2"), experts_per_function=8) as engine:
        cache = engine.control_plane.new_cache(10)
        c = engine.config
        assert cache.nbytes == c.num_hidden_layers * 10 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_a_model_without_a_chat_template_gets_a_clear_400_on_chat(tiny, tmp_path):
    """Base models (Mixtral-8x7B, OLMoE-1B-7B) ship no chat template: chat says so, completions still work."""
    import json
    import os

    for f in os.listdir(tiny):
        os.symlink(os.path.join(tiny, f), tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_server(model=tmp_path, model_name="base", tenants=[{"name": "t", "key": KEY}]) as base:
        r = httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "no chat template" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/completions", headers=auth, timeout=60,
                       json={"model": "base", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text

"""init-model writes a standard checkpoint; a broken one is refused at load time, naming file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest

from faasmoe.models.checkpoint import Checkpoint, CheckpointError
from faasmoe.models.presets import init_model, make_config


def test_init_model_writes_a_standard_sharded_checkpoint(tmp_path):
    path = init_model("tiny", tmp_path / "m", layers=2, overrides={"num_experts": 4}, progress=False)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt"} <= files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_hidden_layers"] == 2
    ck = Checkpoint(path)
    assert len(ck.control_plane_tensors()) + 2 * 4 * 3 == len(ck.tensors)
    assert not any(".experts." in t.name for t in ck.control_plane_tensors())


def test_same_seed_writes_the_same_weights(tmp_path):
    a = init_model("tiny", tmp_path / "a", layers=1, progress=False)
    b = init_model("tiny", tmp_path / "b", layers=1, progress=False)
    assert Checkpoint(a).digest == Checkpoint(b).digest
    assert (a / "model-00001-of-00001.safetensors").read_bytes() == (b / "model-00001-of-00001.safetensors").read_bytes()


def test_real_preset_has_qwen1_5_moe_dimensions():
    c = make_config("qwen1.5-moe-a2.7b", layers=3)
    assert (c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.num_attention_heads, c.vocab_size, c.num_hidden_layers) == (
        2048, 60, 4, 1408, 5632, 16, 151936, 3)
    assert c.rope_parameters["rope_theta"] == 1e6 and not c.norm_topk_prob


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny, dst)
    return dst


def test_missing_shard_is_named(copy):
    (copy / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors"):
        Checkpoint(copy)


def test_truncated_shard_names_file_and_tensor(copy):
    shard = copy / "model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001.safetensors: tensor .* truncated"):
        Checkpoint(copy)


def test_corrupt_header_is_named(copy):
    shard = copy / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors"):
        Checkpoint(copy)


def test_config_that_does_not_match_the_tensors_is_refused(copy):
    config = json.loads((copy / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight has shape"):
        Checkpoint(copy)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)

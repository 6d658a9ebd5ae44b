"""Weight-only int8 checkpoints: the int8 model faasmoe serves is exactly transformers' model on the same int8
weights (dequantized), distributed equals monolithic, and the checkpoint is what `quantize` says it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import greedy_reference

import faasmoe
from faasmoe.models import kernels
from faasmoe.models.checkpoint import Checkpoint, CheckpointError
from faasmoe.models.presets import init_model
from faasmoe.models.quantize import dequantize_checkpoint, quantize_checkpoint, quantize_int8

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="session")
def int8(checkpoint, models_dir):
    """int8(variant) -> (the variant quantized, transformers' fp32 model on its weights dequantized)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple[str, object]] = {}

    def get(variant: str):
        if variant not in cache:
            q = quantize_checkpoint(checkpoint(variant), models_dir / f"{variant}-int8", progress=False)
            deq = dequantize_checkpoint(q, models_dir / f"{variant}-int8-dequantized")
            cache[variant] = str(q), AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
        return cache[variant]

    return get


def test_int8_values_are_the_rows_rounded_to_255_levels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    w[3] = 0  # a row of zeros stays zeros
    q, scale = quantize_int8(w, torch.bfloat16)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    assert int(q.abs().max()) == 127 and not q[3].any()
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert bool((error <= scale.float()[:, None] / 2 + 1e-6).all())  # within half a step of its row


@pytest.mark.parametrize("width", [64, 24, 40])  # torch's kernel reads K in steps of 16: 24 and 40 must avoid it
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_products_equal_the_dequantized_product(rows, dtype, width, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, scale = quantize_int8(torch.randn(300, width, generator=g), dtype)
    w = kernels.Int8Weight(q, scale)
    x = torch.randn(rows, width, generator=g).to(dtype)
    monkeypatch.setattr(kernels, "CHUNK", width * 7)  # the converting path in slices of 7 rows, the last one short
    out = kernels.linear(x, w)
    ref = x.double() @ w.dequantize().double().t()
    assert out.dtype == dtype and out.shape == (rows, 300)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert float((out.double() - ref).abs().max()) <= tolerance * float(ref.abs().max())


def test_int8_products_take_rows_at_any_address():
    """torch's int8 kernel faults on input rows that are not 32-byte aligned (a frame's hidden states can be at
    any even address): run in a child process, so that a regression fails this test instead of killing pytest."""
    code = """
import torch
from faasmoe.models.kernels import Int8Weight, linear
from faasmoe.models.quantize import quantize_int8
w = Int8Weight(*quantize_int8(torch.randn(64, 64), torch.bfloat16))
for offset in (2, 16, 34):
    x = torch.zeros(200, dtype=torch.uint8)[offset:offset + 128].view(torch.bfloat16).view(1, 64)
    assert torch.equal(linear(x, w), linear(x.clone(), w))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


CASES = [("tiny", 1), ("tiny", 8), ("mixtral", 2), ("deepseek-v2", 2), ("tied-mlponly-window", 3)]


@pytest.mark.parametrize("variant,k", CASES, ids=[f"{v}-k{k}" for v, k in CASES])
def test_an_int8_checkpoint_serves_transformers_model_on_its_dequantized_weights(int8, variant, k):
    """Mixtral's gate and up lie apart (two products), DeepSeek-V2 has shared experts and a dense layer, the tied
    variant keeps its lm_head (the embedding) unquantized and has an MLP-only layer."""
    path, ref = int8(variant)
    with faasmoe.load(path, experts_per_function=k) as engine:
        ids = engine.encode(PROMPT)
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        greedy = greedy_reference(ref, ids, 10)
        assert (engine.logits(ids) - expected).abs().max().item() < 1e-4
        assert engine.generate(ids, max_tokens=10).token_ids == greedy


def test_init_model_int8_writes_what_quantize_writes_and_leaves_no_scratch(checkpoint, models_dir, tmp_path):
    direct = init_model("tiny", tmp_path / "direct", seed=1, progress=False, int8=True)
    assert [p.name for p in tmp_path.iterdir()] == ["direct"]  # the unquantized scratch copy is gone
    made = quantize_checkpoint(checkpoint("tiny"), tmp_path / "after", progress=False)
    assert Checkpoint(direct).digest == Checkpoint(made).digest
    for shard in direct.glob("*.safetensors"):
        assert shard.read_bytes() == (made / shard.name).read_bytes()


def test_int8_bf16_distributed_equals_monolithic_bit_for_bit(models_dir):
    from faasmoe.engines.monolithic import MonolithicEngine

    path = init_model("tiny", models_dir / "tiny-bf16-int8", seed=3, overrides={"dtype": "bfloat16"},
                      progress=False, int8=True)
    with MonolithicEngine(path) as mono:
        ids = mono.encode(PROMPT)
        expected, greedy = mono.logits(ids), mono.generate(ids, max_tokens=10, ignore_eos=True).token_ids
    with faasmoe.load(path, experts_per_function=2) as engine:
        assert torch.equal(engine.logits(ids), expected)
        assert engine.generate(ids, max_tokens=10, ignore_eos=True).token_ids == greedy


def test_the_int8_checkpoint_holds_what_was_asked_and_functions_map_half_the_bytes(checkpoint, int8, tmp_path):
    original, quantized = Checkpoint(checkpoint("tiny")), Checkpoint(int8("tiny")[0])
    config = json.loads((quantized.path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "faasmoe"
    assert set(quantized.scales) == {n for group in original.family.quantizable().values() for n in group}
    assert quantized.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == original.tensors[
        "model.layers.0.self_attn.q_proj.weight"].dtype  # attention stays
    q_tensors, tensors = quantized.expert_tensors(0, [1, 2]), original.expert_tensors(0, [1, 2])
    assert len(q_tensors) == 12 and [t.name for t in q_tensors[:6]] == [t.name for t in tensors]
    assert [t.name for t in q_tensors[6:]] == [t.name + "_scale" for t in tensors]
    assert sum(t.nbytes for t in q_tensors) < 0.3 * sum(t.nbytes for t in tensors)  # fp32 -> int8 + scales
    assert (quantized.path / "tokenizer.json").is_file()

    only = Checkpoint(quantize_checkpoint(checkpoint("tiny"), tmp_path / "experts-only", ("experts",),
                                          progress=False))
    assert set(only.scales) == set(original.family.quantizable()["experts"])
    with pytest.raises(CheckpointError, match="quantized already"):
        quantize_checkpoint(only.path, tmp_path / "twice", progress=False)
    with pytest.raises(FileExistsError):
        quantize_checkpoint(checkpoint("tiny"), only.path, progress=False)
    with pytest.raises(ValueError, match="unknown quantization group"):
        quantize_checkpoint(checkpoint("tiny"), tmp_path / "x", ("attention",), progress=False)


def test_a_broken_int8_checkpoint_is_refused_naming_the_tensor(int8, tmp_path):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(int8("tiny")[0], copy)
    shard = next(copy.glob("*.safetensors"))
    tensors = load_file(shard)
    router = "model.layers.0.mlp.gate.weight"
    tensors[router] = tensors[router].to(torch.int8)  # a router in int8: never written by quantize
    tensors[router + "_scale"] = torch.ones(tensors[router].shape[0])
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"{router} is int8"):
        Checkpoint(copy)
    del tensors[router + "_scale"], tensors[router]
    tensors[router] = load_file(next(copy.glob("*.safetensors")))[router].float()
    del tensors["lm_head.weight_scale"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="lm_head.weight needs"):
        Checkpoint(copy)
    tensors["lm_head.weight_scale"] = torch.ones(tensors["lm_head.weight"].shape[0])
    up = "model.layers.0.mlp.experts.1.up_proj.weight"
    tensors[up] = tensors[up].float() * tensors.pop(up + "_scale")[:, None]  # one matrix of an expert not int8
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="partly int8"):
        Checkpoint(copy)


def test_quantize_command_reports_how_far_the_int8_model_is(checkpoint, tmp_path):
    out = tmp_path / "q"
    command = [sys.executable, "-m", "faasmoe", "quantize", "--model", checkpoint("tiny"), "--out", str(out)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "the same top token at" in r.stdout
    assert "decode slower than the original" in r.stdout  # the tiny preset is fp32
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not an empty directory" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "faasmoe", "init-model", "--int8", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # refused before writing anything
    assert r.returncode == 2 and "not an empty directory" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_an_interrupted_quantize_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch):
    from faasmoe.models import quantize

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    mount = tmp_path / "mount"  # an empty directory given as the output (a mount point: written in place)
    mount.mkdir()
    monkeypatch.setattr(quantize, "save_aligned", disk_full)
    for out in (tmp_path / "q", mount):
        with pytest.raises(OSError, match="No space"):
            quantize_checkpoint(checkpoint("tiny"), out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["mount"] and not any(mount.iterdir())  # a retry is not refused
    monkeypatch.undo()
    quantize_checkpoint(checkpoint("tiny"), mount, progress=False)
    assert (mount / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["mount"]


def test_shards_are_written_with_the_umask_or_the_mode_they_had(tmp_path):
    import os

    from faasmoe.models.align import save_aligned

    before = os.umask(0o077)
    try:
        save_aligned({"w": torch.ones(4)}, tmp_path / "private.safetensors")
    finally:
        os.umask(before)
    assert (tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o600
    (tmp_path / "private.safetensors").chmod(0o640)
    save_aligned({"w": torch.zeros(4)}, tmp_path / "private.safetensors")  # rewritten: its mode kept
    assert (tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o640
    assert torch.equal(load_file(tmp_path / "private.safetensors")["w"], torch.zeros(4))


def test_packaged_int8_functions_ship_their_int8_weights_and_compute_the_same(int8, tmp_path):
    """`faasmoe package` copies a function's int8 matrices and scales as they are (no conversion)."""
    import dataclasses

    from faasmoe.control.deployment import Deployment
    from faasmoe.functions import wire
    from faasmoe.functions.expert import ExpertFunction
    from faasmoe.functions.spec import FunctionSpec
    from faasmoe.packaging.build import package

    path = int8("tiny")[0]
    manifest = json.loads(package(path, 4, "tinyfaas", tmp_path).read_text())
    spec = Deployment.plan(Checkpoint(path), 4, torch.float32).specs[1]
    d = tmp_path / "functions" / manifest["functions"][spec.id]["name"]
    shipped = FunctionSpec.from_json(json.loads((d / "spec.json").read_text()))
    shipped = dataclasses.replace(shipped, tensors=tuple(dataclasses.replace(t, file=str(d / t.file))
                                                         for t in shipped.tensors))
    assert [t.dtype for t in shipped.tensors] == [t.dtype for t in spec.tensors]
    assert shipped.nbytes == spec.nbytes and (d / "weights.safetensors").stat().st_size < 1.1 * spec.nbytes + 4096
    g = torch.Generator().manual_seed(0)
    inv = wire.Invocation(bytes.fromhex(spec.model), spec.layer, spec.block,
                          torch.randn(3, spec.hidden_size, generator=g),
                          torch.tensor([0, 1, 2, 2], dtype=torch.int32),
                          torch.tensor(spec.experts[:2] * 2, dtype=torch.int32), torch.rand(4, generator=g))
    assert torch.equal(ExpertFunction(shipped).compute(inv), ExpertFunction(spec).compute(inv))

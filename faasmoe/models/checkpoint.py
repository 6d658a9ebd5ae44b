"""Read a Hugging Face Qwen2-MoE checkpoint directory without loading it.

The control plane and every expert function need different slices of the same
checkpoint. This module parses the safetensors headers once, so each of them can
map exactly its own tensors (`weights.map_tensors`) and nothing else. It imports
transformers (for the config class) only when a checkpoint is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers costs seconds to import; function instances never need it
    from transformers import Qwen2MoeConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F32": (4, "float32"),
    "BF16": (2, "bfloat16"),
    "F16": (2, "float16"),
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's raw bytes lie: enough to map it without parsing anything again."""

    name: str
    file: str
    offset: int  # absolute byte offset in `file`
    nbytes: int
    dtype: str  # safetensors name: F32, BF16, F16
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "offset": self.offset, "nbytes": self.nbytes,
                "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorLocation":
        return cls(d["name"], d["file"], int(d["offset"]), int(d["nbytes"]), d["dtype"], tuple(d["shape"]))


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def is_moe_layer(config: "Qwen2MoeConfig", layer: int) -> bool:
    """Same rule as transformers' Qwen2MoeDecoderLayer."""
    return (layer not in config.mlp_only_layers and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


def read_safetensors_header(file: Path) -> dict[str, TensorLocation]:
    """Parse one shard's header; raise CheckpointError naming the file if it is corrupt."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CheckpointError(f"{file}: corrupt safetensors header length {hlen}")
            header = json.loads(f.read(hlen))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors header: {e}") from e
    base = 8 + hlen
    out: dict[str, TensorLocation] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = meta.get("dtype")
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype!r}")
        start, end = meta["data_offsets"]
        shape = tuple(int(s) for s in meta["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * DTYPES[dtype][0] or base + end > size:
            raise CheckpointError(f"{file}: tensor {name} is truncated or its size does not match shape {shape}")
        out[name] = TensorLocation(name, str(file), base + start, end - start, dtype, shape)
    return out


def tensor_shapes(c: "Qwen2MoeConfig") -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape, derived from the config alone."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    H = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for L in range(c.num_hidden_layers):
        p = f"model.layers.{L}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
        })
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if is_moe_layer(c, L):
            S, I = c.shared_expert_intermediate_size, c.moe_intermediate_size
            shapes.update({
                p + "mlp.gate.weight": (c.num_experts, H),
                p + "mlp.shared_expert.gate_proj.weight": (S, H), p + "mlp.shared_expert.up_proj.weight": (S, H),
                p + "mlp.shared_expert.down_proj.weight": (H, S), p + "mlp.shared_expert_gate.weight": (1, H),
            })
            for e in range(c.num_experts):
                shapes.update({expert_key(L, e, "gate_proj"): (I, H), expert_key(L, e, "up_proj"): (I, H),
                               expert_key(L, e, "down_proj"): (H, I)})
        else:
            F = c.intermediate_size
            shapes.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                           p + "mlp.down_proj.weight": (H, F)})
    return shapes


class Checkpoint:
    """A checkpoint directory: its config, where each tensor lies, and a digest naming it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: not a checkpoint directory (no config.json)")
        from faasmoe.models import FAMILIES, supported

        try:
            model_type = json.loads((self.path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.path / 'config.json'}: {e}") from e
        if model_type not in FAMILIES:
            raise CheckpointError(f"{self.path / 'config.json'}: model_type {model_type!r} is not supported; "
                                  f"supported: {supported()}")
        from transformers import Qwen2MoeConfig

        try:
            self.config = Qwen2MoeConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers raises several types for a bad config
            raise CheckpointError(f"{self.path / 'config.json'}: {e}") from e
        self.tensors = self._read_locations()
        self.digest = self._digest()
        self.validate()

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index: {e}") from e
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}")
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: missing shard file(s) {', '.join(missing)}")
        return [self.path / f for f in files]

    def _read_locations(self) -> dict[str, TensorLocation]:
        out: dict[str, TensorLocation] = {}
        for f in self._shard_files():
            out.update(read_safetensors_header(f))
        return out

    def _digest(self) -> str:
        """Names the model in function ids and on the wire: config plus tensor layout."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}:{Path(t.file).name}:{t.offset}:{t.nbytes}:{t.dtype}".encode())
        return h.hexdigest()[:16]

    def validate(self) -> None:
        """Fail at load time, naming file and tensor, rather than during serving."""
        for name, shape in tensor_shapes(self.config).items():
            loc = self.tensors.get(name)
            if loc is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
            if loc.shape != shape:
                raise CheckpointError(f"{loc.file}: tensor {name} has shape {loc.shape}, config says {shape}")

    def control_plane_tensors(self) -> list[TensorLocation]:
        """Every tensor the model needs except the routed experts."""
        return [self.tensors[n] for n in tensor_shapes(self.config) if ".mlp.experts." not in n]

    def expert_tensors(self, layer: int, experts: list[int]) -> list[TensorLocation]:
        return [self.tensors[expert_key(layer, e, p)] for e in experts for p in EXPERT_PROJS]

    def moe_layers(self) -> list[int]:
        return [L for L in range(self.config.num_hidden_layers) if is_moe_layer(self.config, L)]

    @property
    def dtype(self) -> str:
        """The checkpoint's own torch dtype name (config `dtype`, else its tensors')."""
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if d is not None:
            return str(d).removeprefix("torch.")
        return DTYPES[next(iter(self.tensors.values())).dtype][1]

"""Read a Hugging Face MoE checkpoint directory without loading it.

The control plane and every expert function need different slices of the same
checkpoint. This module parses the safetensors headers once, so each of them can
map exactly its own tensors (`weights.map_tensors`) and nothing else; the family
(`faasmoe.models.family`) says which tensors there must be. It imports transformers
(for the config class) only when a checkpoint is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from faasmoe.models.family import Family

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F32": (4, "float32"),
    "BF16": (2, "bfloat16"),
    "F16": (2, "float16"),
    "I8": (1, "int8"),  # weight-only quantized matrices (`faasmoe.models.quantize`)
}
SCALE_SUFFIX = "_scale"  # `X.weight` stored in int8 has its per-row scales in `X.weight_scale`


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


class Checkpoint:
    """A checkpoint directory: its config, where each tensor lies, and a digest naming it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.family, self.config_bytes = open_family(self.path / "config.json")
        self.config = self.family.config
        self.tensors = self._read_locations()
        self.digest = self._digest()
        self.validate()
        # weights stored in int8: name -> its scales' location
        self.scales = {n: self.tensors[n + SCALE_SUFFIX] for n, t in self.tensors.items() if t.dtype == "I8"}

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
        h = hashlib.sha256(self.config_bytes)
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}:{Path(t.file).name}:{t.offset}:{t.nbytes}:{t.dtype}".encode())
        return h.hexdigest()[:16]

    def validate(self) -> None:
        """Fail at load time, naming file and tensor, rather than during serving."""
        for name, shape in self.family.tensor_shapes().items():
            loc = self.tensors.get(name)
            if loc is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
            if loc.shape != shape:
                raise CheckpointError(f"{loc.file}: tensor {name} has shape {loc.shape}, config says {shape}")
        groups = self.family.quantizable()
        quantizable = {n for group in groups.values() for n in group}
        for group in (groups["experts"], groups["mlp"]):  # gate, up, down of one MLP: all int8 or none
            for triple in zip(group[0::3], group[1::3], group[2::3]):
                if len({self.tensors[n].dtype == "I8" for n in triple}) > 1:
                    raise CheckpointError(f"{self.path}: {', '.join(triple)} are partly int8: all three or none")
        for name, loc in self.tensors.items():
            if loc.dtype != "I8":
                continue
            if name not in quantizable:
                raise CheckpointError(f"{loc.file}: tensor {name} is int8; only experts, MLPs and lm_head may be")
            scale = self.tensors.get(name + SCALE_SUFFIX)
            if len(loc.shape) != 2 or scale is None or scale.shape != loc.shape[:1] or scale.dtype == "I8":
                raise CheckpointError(f"{loc.file}: int8 tensor {name} needs a floating-point {name}{SCALE_SUFFIX} "
                                      f"of shape {loc.shape[:1]} (one scale per row)")

    def control_plane_tensors(self) -> list[TensorLocation]:
        """Every tensor the model needs except the routed experts."""
        routed = {name for L in self.family.moe_layers() for e in range(self.num_experts)
                  for name in self.family.expert_names(L, e)}
        names = [n for n in self.family.tensor_shapes() if n not in routed]
        return [self.tensors[n] for n in names] + [self.scales[n] for n in names if n in self.scales]

    def expert_tensors(self, layer: int, experts: list[int]) -> list[TensorLocation]:
        """Each expert's gate, up and down projections, in that order (what an expert function maps), followed
        where the experts are stored in int8 by their scales in the same order (six tensors an expert)."""
        names = [name for e in experts for name in self.family.expert_names(layer, e)]
        return [self.tensors[n] for n in names] + [self.scales[n] for n in names if n in self.scales]

    def moe_layers(self) -> list[int]:
        return self.family.moe_layers()

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        return self.family.num_experts

    @property
    def dtype(self) -> str:
        """The checkpoint's own torch dtype name (config `dtype`, else its tensors')."""
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if d is not None:
            return str(d).removeprefix("torch.")
        return DTYPES[next(t for t in self.tensors.values() if t.dtype != "I8").dtype][1]


def open_family(config_file: Path) -> tuple["Family", bytes]:
    """The family of a config.json, holding its config, and the file's bytes: refused with the supported list if faasmoe does not
    serve its model_type (transformers would accept any config.json for any config class)."""
    from faasmoe.models import FAMILIES, family_class, supported

    if not config_file.is_file():
        raise CheckpointError(f"{config_file.parent}: not a checkpoint directory (no config.json)")
    try:
        raw = config_file.read_bytes()
        model_type = json.loads(raw).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    if model_type not in FAMILIES:
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported; supported: {supported()}")
    family = family_class(model_type)
    import transformers

    try:
        config = getattr(transformers, family.config_class).from_dict(json.loads(raw))
    except Exception as e:  # transformers raises several types for a bad config
        raise CheckpointError(f"{config_file}: {e}") from e
    return family(config), raw

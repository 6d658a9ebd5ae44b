"""Weight-only int8 quantization of a checkpoint: half the bytes every decode step reads.

A decode step on a CPU is bound by the bytes its matrix-vector products read (the control
plane's and each function's), so storing the big matrices in int8 makes them cheaper to
read, to cold-start and to keep resident. `quantize_checkpoint` writes a new checkpoint
directory where the chosen matrices (routed experts, shared experts and dense MLPs, an
untied lm_head; never attention, routers or embeddings) are stored as

    X.weight        int8 [N, K]   q = round(w / scale), in [-127, 127]
    X.weight_scale  [N]           scale = max |w| of the row / 127, in the model's dtype

(symmetric, one scale per output row; the compressed-tensors naming). Everything else is
copied as it is, and config.json records the scheme in `quantization_config` with
quant_method "faasmoe". transformers does not know this method: it warns and would read the
int8 numbers as weights (`dequantize_checkpoint` writes what it can load). The files are plain
safetensors, 64-byte aligned, mapped by functions as any checkpoint is. The model computes in its own dtype: the products
run torch's int8 kernels (`faasmoe.models.kernels.Int8Weight`).

This is a different model from the original (it rounds every weight to 255 levels per row):
`compare_logits` measures how different, and exactness tests compare faasmoe on the int8
checkpoint with transformers on the same int8 weights, dequantized.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from faasmoe.models.align import save_aligned, umask
from faasmoe.models.checkpoint import (INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, Checkpoint, CheckpointError,
                                      read_safetensors_header)
from faasmoe.models.weights import torch_dtype

GROUPS = ("experts", "mlp", "lm_head")  # what may be quantized (`Family.quantizable`)
METHOD = "faasmoe"
SAMPLE_TEXT = ("The cat sat on the mat. Mixture-of-experts models route each token to a few of their experts, so "
               "most of their weights are idle at any moment.")


def int8_groups(path: str | os.PathLike) -> list[str]:
    """The groups a checkpoint directory stores in int8, from its config.json (empty for any other)."""
    try:
        q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return list(q.get("groups", [])) if isinstance(q, dict) and q.get("quant_method") == METHOD else []


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale [N] in scale_dtype) with w ~ q * scale[:, None]: the scale is rounded to its dtype
    first and q computed from the rounded scale, so that q * scale is as close to w as the stored numbers allow."""
    wf = w.float()
    smallest = torch.finfo(scale_dtype).tiny * torch.finfo(scale_dtype).eps  # the smallest subnormal: rows of zeros
    scale = (wf.abs().amax(dim=1) / 127).clamp(min=smallest).to(scale_dtype)
    q = torch.round(wf / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, groups: tuple[str, ...] = GROUPS,
                        progress: bool = True, consume: bool = False) -> Path:
    """Write `src` to the new directory `out` with the matrices of `groups` in int8 (see the module's docstring).
    `consume`: delete each shard of `src` once its int8 copy is written, so that the disk holds one model and a
    shard, not two; only for a scratch copy of the caller's own (its shards are gone even if the run fails)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"unknown quantization group(s) {unknown}: choose from {', '.join(GROUPS)}")
    ckpt = Checkpoint(src)
    if ckpt.scales:
        raise CheckpointError(f"{src} is quantized already")
    refuse_existing(out)
    chosen = {n for g in groups for n in ckpt.family.quantizable()[g]}
    if not chosen:
        raise ValueError(f"{src}: nothing to quantize in {', '.join(groups)} (a tied lm_head stays as it is)")
    dtype = torch_dtype(ckpt.dtype)

    def convert(name: str, t: torch.Tensor, shard) -> dict[str, torch.Tensor]:
        return dict(zip((name, name + SCALE_SUFFIX), quantize_int8(t, dtype))) if name in chosen else {name: t}

    with _new_directory(out) as tmp:
        weight_map = _rewrite_shards(ckpt, tmp, convert, f"quantizing into {out.name}" if progress else None,
                                     consume)
        _write_metadata(src, tmp, weight_map, lambda config: config.update(quantization_config={
            "quant_method": METHOD, "weights": "int8", "groups": list(groups),
            "scheme": "symmetric, one scale per output row (max |w| / 127)"}))
    return out


def dequantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the int8 checkpoint `src` back in its model dtype (each matrix q * scale, no scales, no
    quantization_config): the very model faasmoe serves from `src`, in a form transformers and any other
    reader load (the exactness tests' reference)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    ckpt = Checkpoint(src)
    dtype = torch_dtype(ckpt.dtype)
    refuse_existing(out)
    with _new_directory(out) as tmp:
        _dequantize_into(ckpt, src, tmp, dtype)
    return out


def _dequantize_into(ckpt: Checkpoint, src: Path, out: Path, dtype: torch.dtype) -> None:
    scales = {loc.name for loc in ckpt.scales.values()}

    def convert(name: str, t: torch.Tensor, shard) -> dict[str, torch.Tensor]:
        if name in scales:
            return {}
        if name in ckpt.scales:
            t = (t.float() * shard.get_tensor(name + SCALE_SUFFIX).float()[:, None]).to(dtype)
        return {name: t}

    weight_map = _rewrite_shards(ckpt, out, convert)
    _write_metadata(src, out, weight_map, lambda config: config.pop("quantization_config", None))


def _rewrite_shards(ckpt: Checkpoint, out: Path, convert, progress: str | None = None,
                    consume: bool = False) -> dict[str, str]:
    """Each shard of `ckpt` written anew into `out` under its name, every tensor replaced by what
    `convert(name, tensor, the open shard)` returns (nothing: dropped); the new weight map. `progress`: a bar
    with this title. `consume`: see `quantize_checkpoint`."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, loc in ckpt.tensors.items():
        by_file[loc.file].append(name)
    weight_map: dict[str, str] = {}
    with tqdm(total=sum(t.nbytes for t in ckpt.tensors.values()), unit="B", unit_scale=True, desc=progress,
              disable=progress is None) as bar:
        for file, names in sorted(by_file.items()):
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(file, framework="pt") as shard:
                for name in names:
                    tensors |= convert(name, shard.get_tensor(name), shard)
                    bar.update(ckpt.tensors[name].nbytes)
            save_aligned(tensors, out / Path(file).name)
            weight_map |= {name: Path(file).name for name in tensors}
            if consume:
                del tensors
                Path(file).unlink()
    return weight_map


def refuse_existing(out: Path) -> None:
    """A checkpoint is written into a new (or empty) directory only: never over another one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: give a new one")


@contextlib.contextmanager
def _new_directory(out: Path) -> Iterator[Path]:
    """Where to write the checkpoint `out`: a scratch directory next to it, renamed to `out` when the block
    succeeds and removed when it fails, so that an interrupted write leaves no half checkpoint behind; or, where
    `out` is an empty directory already (a mount point, say, which a rename cannot replace), `out` itself,
    emptied again on failure. A failed final rename leaves the scratch directory, named in the error."""
    if out.is_dir():
        try:
            yield out
        except BaseException:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            raise
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".writing"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o777 & ~umask())  # mkdtemp made it private
    tmp.rename(out)


def _write_metadata(src: Path, out: Path, weight_map: dict[str, str], edit) -> None:
    """config.json (after `edit(config)`), the index where `src` has one, and every other file of `src`."""
    if (src / INDEX_FILE).is_file():
        total = sum(loc.nbytes for f in sorted(set(weight_map.values())) for loc in
                    read_safetensors_header(out / f).values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():  # tokenizer, generation config, notes: as they are
        if f.is_file() and f.name not in ("config.json", INDEX_FILE, SINGLE_FILE) and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)


def quantize_in_place_of(write, out: str | os.PathLike, groups: tuple[str, ...] = GROUPS,
                         progress: bool = True) -> Path:
    """`write(dir)` a checkpoint into a scratch directory next to `out`, then quantize it into `out`."""
    out = Path(out).resolve()
    refuse_existing(out)  # before writing a whole model
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".unquantized"))
    try:
        write(scratch)
        return quantize_checkpoint(scratch, out, groups, progress, consume=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare_logits(original: str | os.PathLike, quantized: str | os.PathLike, text: str) -> dict:
    """How far the quantized model's logits are from the original's on `text` (every position), each model run
    by faasmoe's monolithic engine with its weights mapped (paged: one model in memory at a time, at most)."""
    from faasmoe.engines.monolithic import MonolithicEngine

    logits = []
    for path in (original, quantized):
        with MonolithicEngine(path, paged=True) as engine:
            ids = engine.encode(text)
            logits.append(engine.logits(ids).float())
    a, b = logits
    return {"positions": a.shape[0], "max_abs_logit_difference": float((a - b).abs().max()),
            "mean_abs_logit_difference": float((a - b).abs().mean()),
            "logit_scale": float(a.abs().mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}

"""64-byte aligned checkpoints: init-model writes them, `faasmoe align` rewrites others, nothing else changes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from faasmoe.cli import app
from faasmoe.models.align import ALIGNMENT, align_checkpoint, align_file, unaligned_tensors
from faasmoe.models.checkpoint import Checkpoint, read_safetensors_header
from helpers import unaligned_copy


def _header_end(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_init_model_writes_aligned_shards(tiny):
    ck = Checkpoint(tiny)
    assert unaligned_tensors(tiny) == 0
    assert all(t.offset % ALIGNMENT == 0 for t in ck.tensors.values() if t.nbytes % ALIGNMENT == 0)


def test_align_file_keeps_every_tensor_and_puts_odd_sizes_last(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"odd": torch.randn(3, 5, generator=g),  # 60 bytes of fp32, written first: shifts what follows
               "a": torch.randn(64, 8, generator=g).to(torch.bfloat16),
               "f32": torch.randn(16, 16, generator=g),
               "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
               "b": torch.randn(32, 32, generator=g).to(torch.bfloat16)}
    file = tmp_path / "x.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    file.chmod(0o640)
    before = read_safetensors_header(file)
    assert before["odd"].offset < before["a"].offset  # safetensors put it before the others (else this is moot)
    assert align_file(file)
    assert file.stat().st_mode & 0o777 == 0o640
    loc = read_safetensors_header(file)
    assert _header_end(file) % ALIGNMENT == 0
    assert all(loc[n].offset % ALIGNMENT == 0 for n in ("a", "f32", "b"))
    assert loc["odd"].offset == max(t.offset for t in loc.values() if t.nbytes)  # odd sizes go last
    back = load_file(str(file))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], tensors[n]) for n in tensors)
    with open(file, "rb") as f:  # the metadata survives
        assert json.loads(f.read(_header_end(file))[8:])["__metadata__"] == {"format": "pt"}
    assert not align_file(file)  # already aligned: untouched
    assert not list(tmp_path.glob("*.aligning"))


def test_align_refuses_a_shard_in_use_or_behind_a_link(tmp_path):
    file = tmp_path / "x.safetensors"
    save_file({"odd": torch.zeros(3, 5), "a": torch.zeros(64, 8)}, str(file))
    link = tmp_path / "link.safetensors"
    link.symlink_to(file)
    with pytest.raises(OSError, match="symbolic link"):
        align_file(link)
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time; f = open(sys.argv[1], 'rb'); "
                               "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); f.close(); print(1, flush=True); "
                               "time.sleep(60)", str(file)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # mapped now
        with pytest.raises(OSError, match=f"process\\(es\\) {holder.pid}"):
            align_file(file)
    finally:
        holder.kill()
        holder.wait()
    assert align_file(file)


def test_align_checkpoint_and_command_keep_the_model(tiny, tmp_path, reference):
    path = unaligned_copy(tiny, tmp_path / "unaligned")
    assert unaligned_tensors(path) > 0
    before = Checkpoint(path).digest
    result = CliRunner().invoke(app, ["align", str(path)])
    assert result.exit_code == 0, result.output
    assert "rewrote" in result.output
    assert unaligned_tensors(path) == 0 and Checkpoint(path).digest != before  # new layout, new name on the wire
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():  # transformers reads the rewritten files: the same model
        torch.testing.assert_close(reference(str(path))(ids).logits, reference(tiny)(ids).logits, rtol=0, atol=0)
    assert align_checkpoint(path) == []
    again = CliRunner().invoke(app, ["align", str(path)])
    assert again.exit_code == 0 and "already aligned" in again.output

"""Rewrite safetensors shards so that every tensor starts on a 64-byte boundary.

faasmoe maps weights straight from the checkpoint's files (page cache, no copy), so a
tensor's address in memory is its offset in the file. safetensors puts the data right
after a JSON header padded to 8 bytes, so tensors usually sit at some odd multiple of 8
(the quarter preset's at 40 mod 64), and torch's bf16 matrix-vector product runs 1.3-2x
slower on them (measured on the AVX512 Xeon, one thread: 1536 x 512 137 -> 65 us, lm_head
151936 x 512 18.0 -> 12.7 ms). llama.cpp aligns its GGUF files for the same reason.

The format allows both things done here: the header may be padded with spaces, and the
tensors' data may lie in any order as long as it has no holes. A rewritten shard keeps
every tensor's name, dtype, shape and bytes (readers, transformers included, see the
same tensors); tensors whose size is not a multiple of 64 go last, so they cannot shift
the others. The file is written next to the original and renamed over it. A server must not
run on the checkpoint meanwhile (its functions would map the new file at the old offsets), so a
shard that any process has open or mapped is refused; so is a symbolic link (a Hugging Face
cache snapshot: its blobs are named by their hash; align a copy, `cp -rL`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from faasmoe.models.checkpoint import DTYPES, Checkpoint, read_safetensors_header

ALIGNMENT = 64  # a cache line; what the AVX512 kernels load at once


def _alignable(nbytes: int) -> bool:
    """Whether a tensor of this size can start on an ALIGNMENT boundary in a layout without holes (an empty
    one has no bytes to align)."""
    return nbytes > 0 and nbytes % ALIGNMENT == 0


def _misaligned(tensors) -> int:
    return sum(1 for t in tensors if _alignable(t.nbytes) and t.offset % ALIGNMENT)


def align_file(file: str | os.PathLike) -> bool:
    """Rewrite one shard with its tensors 64-byte aligned; False (untouched) if they already are."""
    file = Path(file)
    locations = read_safetensors_header(file)  # validates every size against the file first
    if not _misaligned(locations.values()):
        return False  # as aligned as a layout without holes can be
    if file.is_symlink():
        raise OSError(f"{file} is a symbolic link (a Hugging Face cache snapshot?): align a copy of the "
                      f"checkpoint (cp -rL) instead of the files it points to")
    if users := _processes_using(file):
        raise OSError(f"{file} is open or mapped by process(es) {', '.join(map(str, users))} (a server on this "
                      f"checkpoint?): stop them first")
    with open(file, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    in_file = sorted(locations, key=lambda n: locations[n].offset)
    order, head = _header(header, {n: locations[n].nbytes for n in in_file}, in_file)
    with open(file, "rb") as src, _replacing(file) as dst:
        dst.write(head)
        dst.flush()  # before the kernel appends behind it
        copy = _Copier(src.fileno(), dst.fileno())
        for n in order:
            copy(locations[n].offset, locations[n].nbytes)
    return True


def _header(meta: dict, nbytes: dict[str, int], order: list[str]) -> tuple[list[str], bytes]:
    """The tensors' order in the file (`order`, those that can be aligned first) and the header that says so: its
    length, then the JSON of `meta` with each tensor's data_offsets, padded with spaces (allowed by the format)
    to an ALIGNMENT boundary."""
    order = [n for n in order if _alignable(nbytes[n])] + [n for n in order if not _alignable(nbytes[n])]
    pos = 0
    for n in order:
        meta[n]["data_offsets"] = [pos, pos + nbytes[n]]
        pos += nbytes[n]
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    return order, struct.pack("<Q", len(text)) + text


@contextlib.contextmanager
def _replacing(file: Path) -> Iterator[BinaryIO]:
    """A new file next to `file`, renamed over it when the block succeeds (with `file`'s mode, or the umask's;
    synced to disk first: no shard of zeros after a crash), removed when it fails."""
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name + ".", suffix=".writing")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            os.fchmod(out.fileno(), file_mode(file))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, file)
    finally:
        Path(tmp).unlink(missing_ok=True)


class _Copier:
    """Appends byte ranges of src to dst: in the kernel (copy_file_range) where the filesystem allows, else
    through user space."""

    def __init__(self, src: int, dst: int):
        self.src, self.dst, self.in_kernel = src, dst, True

    def __call__(self, offset: int, nbytes: int) -> None:
        while nbytes:
            n = 0
            if self.in_kernel:
                try:
                    n = os.copy_file_range(self.src, self.dst, nbytes, offset)
                except OSError:  # another filesystem or kernel
                    self.in_kernel = False
            if not self.in_kernel:
                n = os.write(self.dst, os.pread(self.src, min(nbytes, 1 << 24), offset))
            if n == 0:
                raise OSError(f"unexpected end of file at offset {offset}")
            offset += n
            nbytes -= n


def _processes_using(file: Path) -> list[int]:
    """Other processes (Linux: from /proc) that have this file open or mapped."""
    target, path = os.stat(file), str(file.resolve())
    users = []
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        if int(pid) == os.getpid():
            continue
        try:
            mapped = any(line.endswith(path) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
            fds = os.listdir(f"/proc/{pid}/fd") if not mapped else []
            opened = any(_same(f"/proc/{pid}/fd/{fd}", target) for fd in fds)
        except OSError:  # gone, or not ours to read
            continue
        if mapped or opened:
            users.append(int(pid))
    return users


def _same(path: str, target: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


# safetensors' order of tensors in a file: by dtype, the widest first, then by name (so a checkpoint's gate_proj
# and up_proj lie back to back, and so do their int8 scales); kept, so files are laid out as they always were
_ORDER = {name: i for i, name in enumerate(("F32", "BF16", "F16", "I8"))}
_NAMES = {getattr(torch, torch_name): name for name, (_, torch_name) in DTYPES.items()}


def umask() -> int:
    """This process's umask, read from /proc (Linux 4.7+): setting it to read it back would race with other
    threads; 0o022 where it cannot be read."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def file_mode(existing: Path | None = None) -> int:
    """The mode `existing` has, or the one a new file gets (0o666 & ~umask)."""
    if existing is not None and existing.exists():
        return existing.stat().st_mode & 0o7777
    return 0o666 & ~umask()


def save_aligned(tensors: dict[str, torch.Tensor], file: str | os.PathLike) -> None:
    """Write a safetensors shard with every tensor 64-byte aligned, in one pass (safetensors' own writer, then
    `align_file`, wrote every byte twice): the same layout rules as `align_file`, into a temporary file renamed
    over `file` at the end (keeping the mode of a file it replaces)."""
    file = Path(file)
    unknown = {str(t.dtype) for t in tensors.values() if t.dtype not in _NAMES}
    if unknown:
        raise ValueError(f"cannot write tensors of dtype {', '.join(sorted(unknown))} to {file}")
    by_dtype = sorted(tensors, key=lambda n: (_ORDER.get(_NAMES[tensors[n].dtype], len(_ORDER)), n))
    meta = {"__metadata__": {"format": "pt"}} | {
        n: {"dtype": _NAMES[tensors[n].dtype], "shape": list(tensors[n].shape)} for n in by_dtype}
    order, head = _header(meta, {n: tensors[n].numel() * tensors[n].element_size() for n in by_dtype}, by_dtype)
    with _replacing(file) as out:
        out.write(head)
        for n in order:
            out.write(memoryview(tensors[n].detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def align_checkpoint(path: str | os.PathLike) -> list[Path]:
    """Align every shard of a checkpoint directory; the shards rewritten."""
    files = sorted({Path(t.file) for t in Checkpoint(path).tensors.values()})
    return [f for f in files if align_file(f)]


def unaligned_tensors(path: str | os.PathLike) -> int:
    """How many tensors of a checkpoint directory `align_checkpoint` would move onto a 64-byte boundary."""
    return _misaligned(Checkpoint(path).tensors.values())

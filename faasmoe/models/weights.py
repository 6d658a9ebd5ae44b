"""Map a chosen set of checkpoint tensors into memory, eagerly, without copying.

Each tensor's bytes are mapped read-only and shared (MAP_SHARED, PROT_READ) with
MAP_POPULATE, so the load really happens at cold start (no page faults on the first
call), the pages are the page cache's own, shared with every other instance mapping
the same expert, and unmapping on scale-to-zero releases them. Measured here for 66 MiB
in page cache: 0.5 ms, against 24 ms for a private writable mapping (MAP_POPULATE then
copies every page) and 16 ms for a plain read. A dtype conversion (say an fp32
checkpoint served in bf16) is the only case that copies.

Before mapping, the exact byte ranges are announced with posix_fadvise(WILLNEED): the kernel
reads them (large requests, all submitted at once) and MAP_POPULATE then finds them cached.
Without it, populating a mapping from a cold cache faults page by page, and each fault reads
around itself: measured on the quarter preset from an evicted cache, a 1 MiB function read
4.4 MiB (3.2x more, its neighbours' bytes, which then sit in the page cache uncounted) in
5.1 ms; with WILLNEED 1 MiB plus 2 pages in 1.7 ms (4 MiB functions: 20 MiB in 20.9 ms
against 4 MiB in 5.4 ms).

The tensors are read-only: writing to one faults. Nothing in faasmoe writes weights.
Do not rewrite a checkpoint's files in place while it is being served.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterable

import torch

from faasmoe.models.checkpoint import DTYPES, SCALE_SUFFIX, TensorLocation
from faasmoe.models.kernels import Int8Weight

PAGE = mmap.PAGESIZE
# Weights are mapped read-only on purpose; torch warns about that, from this module's frames: silenced here only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=r"faasmoe\.models\.weights")
_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11's mmap does not name it


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16', 'BF16' or 'torch.bfloat16' -> torch.bfloat16."""
    name = DTYPES[name][1] if name in DTYPES else name.removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {name!r}: use float32, bfloat16 or float16")
    return dt


def map_tensor(loc: TensorLocation, fd: int, populate: bool = True, read_around: bool = False) -> torch.Tensor:
    """`populate` False: pages are read when first touched, by themselves (a table read a row at a time; its
    neighbours' bytes stay out) or, with `read_around`, with the kernel's usual read-around (a model paged
    in and out as a whole). Populated mappings are filled without read-around too (MADV_RANDOM, then
    MADV_POPULATE_READ where the kernel has it, 5.14+): a page that another process dropped between the
    WILLNEED and the populate is read alone, not with its neighbours' bytes (which would then sit in the page
    cache, counted by nobody: measured with two hosts loading and dropping at once under a memory budget)."""
    start = loc.offset - loc.offset % PAGE
    length = loc.offset + loc.nbytes - start
    mm = None
    if populate:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
        mm.madvise(mmap.MADV_RANDOM)
        try:
            mm.madvise(MADV_POPULATE_READ)
        except OSError:  # an older kernel: populate the usual way
            mm.close()
            mm = None
    if mm is None:
        flags = _FLAGS if populate else mmap.MAP_SHARED
        mm = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ, offset=start)
    if not populate and not read_around:
        mm.madvise(mmap.MADV_RANDOM)
    t = torch.frombuffer(mm, dtype=getattr(torch, DTYPES[loc.dtype][1]), count=loc.nbytes // DTYPES[loc.dtype][0],
                         offset=loc.offset - start)
    return t.view(loc.shape)  # the tensor keeps `mm` alive


def read_ahead(locations: Iterable[TensorLocation], fds: dict[str, int] | None = None) -> None:
    """Ask the kernel to read exactly these byte ranges into the page cache now, all submitted at once, without
    waiting (POSIX_FADV_WILLNEED). `fds`: files already open (by path), reused and left open."""
    own = fds is None
    fds = {} if fds is None else fds
    try:
        for loc in locations:
            if loc.file not in fds:
                fds[loc.file] = os.open(loc.file, os.O_RDONLY)
            os.posix_fadvise(fds[loc.file], loc.offset, loc.nbytes, os.POSIX_FADV_WILLNEED)
    finally:
        if own:
            for fd in fds.values():
                os.close(fd)


def map_tensors(locations: Iterable[TensorLocation], dtype: torch.dtype, lazy: frozenset[str] = frozenset(),
                paged: bool = False) -> dict[str, torch.Tensor]:
    """Name -> tensor in `dtype` for each location; mapped where the dtype matches, converted otherwise
    (floating-point tensors only: int8 quantized weights stay as they are).

    Tensors named in `lazy` are not populated: their pages are read when first touched, without read-around.
    That suits a table read a row at a time (an embedding: a 151936 x 2048 bf16 table is 622 MB, one token's
    row 4 KiB); read-around would also read the bytes after the table (measured: most of the first expert's).
    `paged`: every tensor is mapped unpopulated, with the kernel's read-around (a monolithic model served
    through mmap, whose pages the kernel reads and drops as memory allows).
    """
    out: dict[str, torch.Tensor] = {}
    fds: dict[str, int] = {}
    locations = list(locations)
    try:
        for loc in locations:
            if loc.file not in fds:
                fds[loc.file] = os.open(loc.file, os.O_RDONLY)
        if not paged:  # every read submitted at once, for exactly these bytes: see the module's docstring
            read_ahead([loc for loc in locations if loc.name not in lazy], fds)
        for loc in locations:
            t = map_tensor(loc, fds[loc.file], populate=not paged and loc.name not in lazy, read_around=paged)
            out[loc.name] = t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def stacked_rows(locations: list[TensorLocation], name: str) -> TensorLocation | None:
    """One location for tensors that lie back to back in one file with the same dtype and row shape (a
    checkpoint's gate_proj then up_proj, in name order), so they map as one [sum of rows, ...] tensor without a
    copy; None where they do not."""
    first = locations[0]
    for a, b in zip(locations, locations[1:]):
        if (b.file, b.offset, b.dtype, b.shape[1:]) != (a.file, a.offset + a.nbytes, a.dtype, a.shape[1:]):
            return None
    rows = sum(loc.shape[0] for loc in locations)
    return TensorLocation(name, first.file, first.offset, sum(loc.nbytes for loc in locations), first.dtype,
                          (rows, *first.shape[1:]))


def map_stacked(groups: dict[str, list[TensorLocation]], dtype: torch.dtype, concatenate: bool = True,
                paged: bool = False) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """Name -> the tensors of each group concatenated along rows: mapped as one where they are adjacent in
    the file (no copy); where they are not, concatenated (a copy) or, with `concatenate` False, left apart as
    a tuple (a Mixtral checkpoint stores w1, w2, w3: gate and up are never adjacent). `paged`: as in
    `map_tensors`."""
    out: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
    adjacent = {name: stacked_rows(locs, name) for name, locs in groups.items()}
    out.update(map_tensors([loc for loc in adjacent.values() if loc is not None], dtype, paged=paged))
    apart = [name for name, loc in adjacent.items() if loc is None]
    if apart:
        parts = map_tensors([loc for name in apart for loc in groups[name]], dtype, paged=paged)
        for name in apart:
            tensors = tuple(parts[loc.name] for loc in groups[name])
            out[name] = torch.cat(tensors) if concatenate else tensors
    return out


def scale_groups(groups: dict[str, list[TensorLocation]], scales: dict[str, TensorLocation]
                 ) -> dict[str, list[TensorLocation]]:
    """For the groups of int8 matrices among `groups` (a checkpoint's `scales` names them): a group of their
    scales, named after the group with SCALE_SUFFIX, for `map_stacked` to map beside them and `with_scales` to
    pair up."""
    return {name + SCALE_SUFFIX: [scales[loc.name] for loc in locs]
            for name, locs in groups.items() if all(loc.name in scales for loc in locs)}


Mapped = torch.Tensor | Int8Weight | tuple  # a `map_stacked` value, its int8 matrices paired with their scales


def with_scales(w: dict[str, torch.Tensor | tuple[torch.Tensor, ...]]) -> dict[str, Mapped]:
    """Fold every `X` + SCALE_SUFFIX entry of `w` into `X` as an `Int8Weight` (the pieces of a value left
    apart paired with theirs)."""
    for name in [n for n in w if n.endswith(SCALE_SUFFIX)]:
        scale, base = w.pop(name), name[:-len(SCALE_SUFFIX)]
        q = w[base]
        if isinstance(q, tuple):
            pieces = scale if isinstance(scale, tuple) else torch.split(scale, [p.shape[0] for p in q])
            w[base] = tuple(Int8Weight(p, s) for p, s in zip(q, pieces))
        else:
            w[base] = Int8Weight(q, torch.cat(scale) if isinstance(scale, tuple) else scale)
    return w


def parts(w: Mapped) -> tuple[torch.Tensor, ...]:
    """The tensors of a `map_stacked` value: itself, or its pieces where they were left apart (an int8 matrix's
    values and scales)."""
    pieces = w if isinstance(w, tuple) else (w,)
    return tuple(t for p in pieces for t in ((p.q, p.scale) if isinstance(p, Int8Weight) else (p,)))


def private_copy(w: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A private copy of a `map_stacked` value (a server's own weights, not the page cache's)."""
    return tuple(t.clone() for t in w) if isinstance(w, tuple) else w.clone()


def read_bytes(locations: Iterable[TensorLocation]) -> int:
    """Plain read of the tensors' bytes (the yardstick a cold start is compared with)."""
    total = 0
    for loc in locations:
        buf = bytearray(loc.nbytes)
        with open(loc.file, "rb", buffering=0) as f:
            total += os.preadv(f.fileno(), [buf], loc.offset)
    return total

"""`linear`: F.linear's product, computed the way measured fastest here for its case (CPU, dtype, rows, packed weight).

On a CPU with AVX512-BF16 or AMX, oneDNN multiplies bf16 matrices natively. Without them
(AVX2 only) torch's bf16 and fp16 GEMMs cost the same per row whatever the number of rows
(measured on a 2-core AVX2 EPYC, 512 -> 2816, 2 threads: 1 row 157 us, 4 rows 647, 16 rows
2,529), while converting the weights to fp32 once and multiplying there costs 534 us for 4
rows and 813 for 16. So on such CPUs a product of at least MIN_ROWS rows with a weight that is not
packed (a function's: see below) converts both operands to fp32, multiplies and rounds the result
back: the fp32 accumulation a bf16 GEMM does, in another order. Fewer rows, and fp32 models, take F.linear.
fp32 models never take this path. FAASMOE_BF16_GEMM=native|fp32 overrides the detection.

Where the GEMM is native, oneDNN compiles and keeps a kernel for every row count it meets, and a
process's memory grows with the number of distinct shapes: a function instance answering 300 calls
of 1-200 tokens grew from 36 to 172 MB of its own memory (USS; with the fp32 path, 48 MB; measured
on a 2-core Xeon with AMX). So a native product of more than one row is padded to a power of two
rows: at most a few dozen shapes per weight, at most twice the rows' work (and rows are cheap next
to reading the weights at these sizes).

One bf16 row without a bias, where the GEMM is native, is a matrix-vector product: torch.mv took
0.5-0.7x F.linear's time on this Xeon (one thread, 512 -> 704, 352 -> 512, 512 -> 2816 and the
lm_head's 512 -> 37984), with the same fp32 accumulation (equal results in 599 of 600 random shapes,
the last within rounding): a monolithic single-request step about 12 % faster. With a bias (Qwen's
q/k/v projections), torch.addmv: equal to F.linear in 300 of 300 random shapes, 1536 x 512 in 73 us
against F.linear's 115 (it runs a general matrix product for one row).

A weight the process owns can be `pack`ed once into oneDNN's blocked layout, which F.linear otherwise
rebuilds from the row-major matrix at every call (scripts/product-costs.py, docs/bench/eleventh-ab/; one
thread, weights streamed from memory, this Xeon's speed varies from run to run): 8 rows through 2816 x 512
cost 285-297 us against 457-482, 704 x 512 92-93 against 133-139, one row 0.83-0.96x torch.mv, and the
lm_head's 151,936 x 512 on two threads 6.4-6.9 ms against 11.5-12.6 for 8 rows. oneDNN runs it as an inner
product where F.linear runs a matmul: the results were equal in 199 of 200 random shapes (1-32 rows; the
other, 2472 x 112 with 8 rows, differed in 2 of 19,776 elements by one rounding step) and in every product
of the quarter preset checked. The control plane packs its matrices (the monolithic model its experts too);
a function does not: its weights stay the page cache's, mapped in milliseconds at a cold start and shared
by every instance.

On CPUs without bf16 instructions `pack` holds a matrix in FBGEMM's packed fp16 layout instead (`Fp16Weight`):
torch's bf16 kernels there are bound by their own code, not by memory (a one-row product runs at ~3 G
multiply-adds/s with the weight in cache as from memory), and cost about the same per row (measured on a 2-vCPU
AVX2 Zen 3, one thread, weights from memory: 2816 x 512 one row 397 us, six rows 2,283), where FBGEMM's fp16
kernel reads each weight once for every row (273 and 388 us; 512 x 512 in cache, one row, 18 us for fp32 rows,
~4 more to convert them, against 81; the lm_head 151,936 x 512 12.7 ms against 20.0; on more threads see
`Fp16Weight`). The rows are multiplied in fp32 and rounded once, as torch's bf16 GEMM accumulates: equal to
F.linear's bf16 result in all but about 1 in 10^4 outputs (within 2.2e-6 of the fp32 product before rounding,
so those are one rounding step apart: inferred). fp16 holds every bf16 value from 2^-17 up
to 65504 exactly (its 10-bit significand has room for bf16's 7); smaller magnitudes round to fp16's subnormal
steps (2^-24: an error below 3e-8 each) and a matrix with a larger one is not converted. Matrices under
FP16_MIN_ELEMENTS (the quarter preset's 60 x 512 routers) stay F.linear's, whose fixed cost is lower. Packing is
FBGEMM's loop, ~20 ns an element: the quarter preset's monolithic model loads in 15-18 s instead of 3.3-4.4 (its
control plane's share, by its elements, ~3 s). Spread over the cores on Python threads it loaded in 11-12 s, but
then decoded ~35 % slower (three alternating pairs; not studied further), so packing runs on the loading thread.

A product of a few rows with a weight not packed (a function's, a tied lm_head's, a model served through
mmap) takes the weight as oneDNN's first operand instead, w @ x.T, which it reads as it lies, and copies
the result back to rows: equal to F.linear's in 200 of 200 random shapes (2-32 rows); from memory, in three
runs, 704 x 512 2 rows 101-114 us against 130-138, 8 rows 107-135 against 133-147, 2816 x 512 8 rows
319-356 against 457-501, the lm_head's 8 rows 8.2-10.3 ms against 11.5-12.6 (end to end, a step of six
sequences 8-9 % faster at k = 4 and 60). From 64 rows on the copy back costs what the layout saved (704 x
512, 512 rows: 806-833 against 551-761), so more than WEIGHT_FIRST_ROWS take F.linear.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)


@functools.cache
def native_half_gemm() -> bool:
    """Whether this CPU multiplies 16-bit matrices natively (or FAASMOE_BF16_GEMM says so)."""
    choice = os.environ.get("FAASMOE_BF16_GEMM", "")
    if choice in ("native", "fp32"):
        return choice == "native"
    if choice:
        raise ValueError(f"FAASMOE_BF16_GEMM={choice!r}: use native or fp32")
    return cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 (or fp16) matrix instructions (/proc/cpuinfo; True where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx512_fp16"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads (a process-wide setting, which the engines also make); nothing is set
    where the count is already `n` (the lm_head runs under it at every step)."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MIN_ROWS = 4  # below it the conversion costs more than it saves (1 thread breaks even at 2 rows, 2 threads at 4)
CHUNK = 1 << 20  # weight elements converted at a time: 4 MiB of fp32, in cache while the rows use it


@dataclass(frozen=True)
class Int8Weight:
    """A weight-only int8 matrix: w = q * scale[:, None], one scale per output row (`faasmoe.models.quantize`).

    A bf16 product of at most INT8_PACK_ROWS rows runs torch's int8 kernel (`_weight_int8pack_mm`: it reads
    the int8 bytes, half of bf16's, and scales in the kernel). That kernel's cost grows with every 4 rows
    (measured on the AVX512 Xeon, one thread, 704 x 512: 1 row 27 us against bf16's 65, 4 rows 50 against 59,
    8 rows 107 against 72, 256 rows 4 ms against 0.2); it is vectorised for bf16 only (fp32 and fp16: a scalar
    loop, 5-10x slower than the dense product) and its AVX512 loop reads K in steps of 16 without a tail (any
    other K: garbage, silently; and rows not 32-byte aligned fault). Everything else converts the weights a
    slice at a time to the rows' dtype (exact: every int8 value is a bf16 value) and multiplies there, scaling
    the product's columns."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N], in the dtype the model computes in

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def clone(self) -> "Int8Weight":
        return Int8Weight(self.q.clone(), self.scale.clone())

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale[:, None]


INT8_PACK_ROWS = 4
WEIGHT_FIRST_ROWS = 8  # up to this many (padded) rows, a bf16 product of a contiguous row-major weight is w @ x.T
FP16_MIN_ELEMENTS = 1 << 16  # smaller bf16 matrices are not converted to fp16 (see the module's docstring)
FP16_SHARD_ELEMENTS = 1 << 22  # larger ones are packed in slices of rows of this size (see `Fp16Weight`)
FP16_MAX = 65504.0  # fp16's largest finite value


@dataclass(frozen=True, eq=False)  # opaque handles: compared by identity
class Fp16Weight:
    """A bf16 matrix in FBGEMM's packed fp16 layout, for CPUs without bf16 instructions (`pack`; see the module's
    docstring): `linear` multiplies rows in fp32 against it and rounds the result to the rows' dtype.

    FBGEMM packs a large matrix slowly (151,936 x 512: 67 ns an element, against 23 for 8,192 rows), so one over
    FP16_SHARD_ELEMENTS is packed as slices of rows, multiplied one after the other. Each is multiplied by
    FBGEMM's own call, on one thread (torch's Python API for it is deprecated: the supported operator,
    `quantized.linear_dynamic_fp16`, costs ~40 us more a call, and a layer's step makes several), except the
    slices of a matrix packed for more threads (the quarter preset's lm_head; at real sizes its q/k/v and more):
    that operator splits each over torch's threads (an lm_head's row on two: 10.5-11.6 ms against F.linear's
    14.4-15.0). Smaller matrices stay on FBGEMM's own call even there, prefills' many rows too (where the fp32
    path had every thread: not measured at more than two). For one row on two threads F.linear is faster than
    either (1536 x 512: 155 us, the operator 171, the one-thread call 220; 512 x 512: 66-74, 107, 111), but only
    the packed copy is held, and the monolithic model (two threads) decoded one sequence as fast as before and
    six 1.25-1.5x faster; with every matrix through the operator, and packed on a thread pool (which alone cost
    ~35 %, see the module's docstring), it decoded one sequence 1.7-2.1x as slowly (not separated)."""

    shards: tuple[Any, ...]  # opaque FBGEMM handles, each a slice of rows in order
    shape: torch.Size  # [N, K], the bf16 matrix's
    threaded: bool  # packed for `quantized.linear_dynamic_fp16` (else FBGEMM's one-thread call)


def _pack_fp16(w: torch.Tensor, threads: int) -> torch.Tensor | Fp16Weight:
    """w as an `Fp16Weight` for products on `threads` threads, where that applies (FBGEMM present, w large enough,
    every value within fp16's range); w itself elsewhere."""
    if w.numel() < FP16_MIN_ELEMENTS or not _fbgemm_fp16():
        return w
    if not float(w.abs().max()) <= FP16_MAX:  # NaN too
        return w
    rows = max(1, FP16_SHARD_ELEMENTS // w.shape[1])
    starts = range(0, w.shape[0], rows)  # each slice converted to fp32 only while it is packed
    if threads > 1 and len(starts) > 1:
        return Fp16Weight(tuple(torch.ops.quantized.linear_prepack_fp16(w[a:a + rows].float(), None) for a in starts),
                          w.shape, True)
    return Fp16Weight(tuple(torch.fbgemm_pack_gemm_matrix_fp16(w[a:a + rows].float()) for a in starts), w.shape, False)


@contextlib.contextmanager
def _deprecated_fbgemm_calls() -> Iterator[None]:
    """Silence torch's notice that its Python API for FBGEMM's one-thread fp16 calls is deprecated (see
    `Fp16Weight`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"fbgemm_\w+ is deprecated", category=UserWarning)
        yield


@functools.cache
def _fbgemm_fp16() -> bool:
    """Whether this torch and CPU run FBGEMM's fp16 products (it needs AVX2), both calls checked on a small matrix.
    Torch warns of each deprecated call once a process: here, silenced."""
    try:
        w, x = torch.ones(8, 8), torch.ones(1, 8)
        with _deprecated_fbgemm_calls():
            y = torch.fbgemm_linear_fp16_weight_fp32_activation(x, torch.fbgemm_pack_gemm_matrix_fp16(w), None)
        threaded = torch.ops.quantized.linear_dynamic_fp16(x, torch.ops.quantized.linear_prepack_fp16(w, None))
        return bool((y == 8).all() and (threaded == 8).all())
    except (AttributeError, RuntimeError, TypeError):
        return False


def _fp16(x: torch.Tensor, w: Fp16Weight, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b) in fp32 against an `Fp16Weight`, rounded once to x's dtype; x [M, K] or one row [K]."""
    x32 = x.float().reshape(-1, w.shape[1])
    b32 = None if b is None else b.float()
    if not w.threaded and len(w.shards) == 1:  # the bias added in the call
        y = torch.fbgemm_linear_fp16_weight_fp32_activation(x32, w.shards[0], b32)
    else:
        ys = [torch.ops.quantized.linear_dynamic_fp16(x32, p) if w.threaded
              else torch.fbgemm_linear_fp16_weight_fp32_activation(x32, p, None) for p in w.shards]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        if b32 is not None:
            y += b32
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight | Fp16Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ b) -> [M, N] in x's dtype; x [K], one row as a vector: [N]."""
    if isinstance(w, Fp16Weight):
        return _fp16(x, w, b)
    if isinstance(w, torch.Tensor) and w.is_mkldnn:
        return _packed(x, w, b)
    if x.dim() == 1:  # a one-token call's row: the matrix-vector product without a row dimension to add and drop
        y = _matrix_vector(x, w, b)
        return y if y is not None else linear(x[None], w, b)[0]
    M = x.shape[0]
    if isinstance(w, Int8Weight):
        out = _int8(x, w)
        return out if b is None else out + b
    if M == 1 and (y := _matrix_vector(x[0], w, b)) is not None:
        return y.unsqueeze(0)
    if x.dtype in HALF and M > 1:
        if not native_half_gemm():
            return _via_fp32(x, w, b) if M >= MIN_ROWS else F.linear(x, w, b)
        x = _pad(x)
        if b is None and x.dtype == torch.bfloat16 and x.shape[0] <= WEIGHT_FIRST_ROWS and w.is_contiguous():
            return torch.mm(w, x.t()).t()[:M].contiguous()  # see the module's docstring
        return F.linear(x, w, b)[:M]
    return F.linear(x, w, b)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, enable_gqa: bool = False, scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, computed in fp32 for 16-bit inputs where the CPU has no bf16 instructions:
    there torch's 16-bit attention kernel multiplies in a scalar loop (one query of 4 x 128 over 150 cached
    positions: 158 us, 449 over 400, against 62 and 134 in fp32 with the conversions, on a 2-vCPU AVX2 Zen 3).
    The same algorithm in fp32, without the 16-bit kernel's rounding of the softmax's weights before they
    multiply the values: ~60 % of outputs equal its, the rest one rounding step apart (inferred from the
    magnitudes; `tests/test_kernels.py` bounds them). A boolean mask only (what `attention_mask` makes)."""
    if q.dtype in HALF and not native_half_gemm():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                              is_causal=is_causal, enable_gqa=enable_gqa, scale=scale).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
                                          scale=scale)


def _pad(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with zero rows added up to a power of two: a bounded set of row counts (see the module's
    docstring)."""
    M = x.shape[0]
    padded = 1 << (M - 1).bit_length()
    return x if padded == M else torch.cat([x, x.new_zeros(padded - M, x.shape[1])])


def pack(w: torch.Tensor | Int8Weight | None, threads: int = 1) -> torch.Tensor | Int8Weight | Fp16Weight | None:
    """A bf16 matrix in the layout `linear` multiplies fastest on this CPU (a private copy: read once now), for
    products on `threads` torch threads: oneDNN's blocked layout where the GEMM is native, FBGEMM's packed fp16
    (`Fp16Weight`) where it is not; w itself where neither applies (not a bf16 matrix, a torch without oneDNN or
    FBGEMM, see `_pack_fp16`). See the module's docstring."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.bfloat16 or w.dim() != 2:
        return w
    if not native_half_gemm():
        return _pack_fp16(w, threads)
    if not _onednn_bf16():
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


@functools.cache
def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_matrix(w: torch.Tensor | Int8Weight | tuple | None,
                threads: int = 1) -> torch.Tensor | Int8Weight | Fp16Weight | tuple | None:
    """`pack` for a weight as the models hold it: a matrix, a (gate, up) pair, None, or an `Int8Weight` (kept)."""
    return tuple(pack(t, threads) for t in w) if isinstance(w, tuple) else pack(w, threads)


def _packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b) for a `pack`ed w (F.linear's result: see the module's docstring); more than one row padded as in
    `linear`."""
    if x.dim() == 1 or x.shape[0] == 1:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(_pad(x), w, b, "none", [], "")[:x.shape[0]]


def _matrix_vector(v: torch.Tensor, w: torch.Tensor | Int8Weight, b: torch.Tensor | None) -> torch.Tensor | None:
    """w @ v (+ b) [N] for one bf16 row v [K] where the GEMM is native (see the module's docstring); None elsewhere
    (int8 weights, strided weights, other dtypes, CPUs without bf16 instructions)."""
    if v.dtype != torch.bfloat16 or isinstance(w, Int8Weight) or not w.is_contiguous() or not native_half_gemm():
        return None
    return torch.mv(w, v) if b is None else torch.addmv(b, w, v)


def _via_fp32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The product in fp32, converting the weights a slice of rows at a time (an lm_head converted whole would
    need its fp32 copy in memory)."""
    x32 = x.float().t()  # [K, M]
    N, K = w.shape
    step = max(1, CHUNK // K)
    out = torch.empty(N, x.shape[0])  # [N, M]: each slice of weight rows fills contiguous rows
    for a in range(0, N, step):
        torch.mm(w[a:a + step].float(), x32, out=out[a:a + step])
    out = out.t()
    if b is not None:
        out = out + b.float()
    return out.to(x.dtype)


def _int8(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    M = x.shape[0]
    N, K = w.shape
    if (M <= INT8_PACK_ROWS and x.dtype == torch.bfloat16 and K % 16 == 0  # see the class's docstring
            and w.q.is_contiguous() and w.scale.dtype == x.dtype):
        if not x.is_contiguous() or x.data_ptr() % 64:  # the kernel faults on rows not 32-byte aligned (a frame's)
            x = x.clone(memory_format=torch.contiguous_format)
        return torch.ops.aten._weight_int8pack_mm(x, w.q, w.scale)
    dtype = x.dtype if x.dtype not in HALF or native_half_gemm() else torch.float32  # as `linear` decides
    xt = (_pad(x) if dtype in HALF else x).to(dtype).t()  # [K, padded]: a bounded set of row counts, as in `linear`
    out = torch.empty(N, xt.shape[1], dtype=dtype)  # each slice of weight rows fills contiguous rows
    step = max(1, CHUNK // K)
    for a in range(0, N, step):  # each slice converted while in cache
        torch.mm(w.q[a:a + step].to(dtype), xt, out=out[a:a + step])
    return (out[:, :M].t() * w.scale).to(x.dtype)

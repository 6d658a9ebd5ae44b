"""What a bf16 product costs on this CPU, by how torch runs it (docs/benchmarks.md, section 5, "Eleventh session").

    .venv/bin/python scripts/product-costs.py [SWEEP]    # SWEEP random shapes for the equality check (default 200)

Prints, one thread unless said: the fixed cost of a matrix-vector product (weights in cache), the cost of a
few rows through each path with the weights streamed from memory (F.linear, a weight packed once with
`kernels.pack`, torch.mv for one row, and weight-first w @ x.T copied back to rows), the lm_head's shape on two
threads, and whether packed and weight-first products equal F.linear's bit for bit over random shapes."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from faasmoe.models import kernels


def timed(f, reps: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


def from_memory(N: int, K: int, rows: int) -> str:
    """Each path over enough copies of an N x K weight to stream them from memory: us a product."""
    n = max(2, int(300e6 / (N * K * 2)))
    ws = [torch.randn(N, K).bfloat16() for _ in range(n)]
    packed = [kernels.pack(w) for w in ws]
    x = torch.randn(rows, K).bfloat16()
    paths = {"F.linear": lambda: [F.linear(x, w) for w in ws],
             "packed": lambda: [kernels.linear(x, p) for p in packed],
             "weight-first": lambda: [torch.mm(w, x.t()).t().contiguous() for w in ws]}
    if rows == 1:
        paths["torch.mv"] = lambda: [torch.mv(w, x[0]) for w in ws]
    return "  ".join(f"{name} {timed(f, 2) / n:.0f}" for name, f in paths.items())


def main(sweep: int) -> None:
    torch.set_num_threads(1)
    print("fixed cost, weights in cache, us a product (bf16 torch.mv | fp32 torch.mv):")
    for N, K in [(60, 512), (128, 512), (512, 512)]:
        w, v = torch.randn(N, K), torch.randn(K)
        wb, vb = w.bfloat16(), v.bfloat16()
        print(f"  {N} x {K}: {timed(lambda: torch.mv(wb, vb), 2000):.1f} | {timed(lambda: torch.mv(w, v), 2000):.1f}")
    print("from memory, us a product:")
    for N, K in [(2816, 512), (1536, 512), (704, 512), (512, 352)]:
        for rows in (1, 2, 8) + ((64, 512) if N == 704 else ()):
            print(f"  {N} x {K}, {rows} row(s): {from_memory(N, K, rows)}", flush=True)
    torch.set_num_threads(2)
    w = torch.randn(151936, 512).bfloat16()
    p = kernels.pack(w, threads=2)
    for rows in (1, 8):
        x = torch.randn(rows, 512).bfloat16()
        print(f"  151936 x 512, {rows} row(s), 2 threads, ms: F.linear {timed(lambda: F.linear(x, w), 5) / 1e3:.2f}"
              f"  packed {timed(lambda: kernels.linear(x, p), 5) / 1e3:.2f}"
              f"  weight-first {timed(lambda: torch.mm(w, x.t()).t().contiguous(), 5) / 1e3:.2f}", flush=True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    unequal_packed = unequal_first = 0
    for _ in range(sweep):
        N, K = int(torch.randint(1, 3000, (1,), generator=g)), int(torch.randint(16, 2000, (1,), generator=g))
        rows = 1 << int(torch.randint(0, 6, (1,), generator=g))  # 1-32
        w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(rows, K, generator=g).bfloat16()
        ref = F.linear(x, w)
        unequal_packed += not torch.equal(kernels.linear(x, kernels.pack(w)), ref)
        unequal_first += rows > 1 and not torch.equal(torch.mm(w, x.t()).t(), ref)
    print(f"random shapes (1-32 rows): packed differs from F.linear in {unequal_packed} of {sweep}, "
          f"weight-first (2-32 rows) in {unequal_first}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)

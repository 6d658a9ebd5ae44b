"""kernels._via_fp32 on this CPU: CHUNK sizes for the quarter preset's CP shapes, rows 4 and 6, weights from memory."""
import torch, time, statistics, sys
from faasmoe.models import kernels
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
for N, K in ((2816, 512), (512, 1408), (1536, 512), (512, 512)):
    n = max(1, (256 << 20) // (N * K * 2))
    ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(n)]
    for M in (3, 4, 6):
        x = torch.randn(M, K).to(torch.bfloat16)
        res = {}
        for name, chunk in (("bf16 F.linear", None), ("1M", 1 << 20), ("256K", 1 << 18), ("64K", 1 << 16), ("16K", 1 << 14)):
            if chunk: kernels.CHUNK = chunk
            f = (lambda w: F.linear(x, w)) if chunk is None else (lambda w: kernels._via_fp32(x, w, None))
            ts = []
            for r in range(5):
                t = time.perf_counter()
                for w in ws: f(w)
                ts.append((time.perf_counter() - t) / n * 1e6)
            res[name] = statistics.median(ts)
        print(f"{N}x{K} rows {M}: " + ", ".join(f"{k} {v:.0f}" for k, v in res.items()), flush=True)

import torch, time, sys, os, torch.nn.functional as F
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/s18/inductor")
torch.set_num_threads(int(sys.argv[1]))
N, K = int(sys.argv[2]), int(sys.argv[3])
n = max(4, int(150e6 // (N * K * 2)))
ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(n)]
def red(x, w):  # [N, M]: each weight row read once, for every row of x
    return (w[:, None, :].float() * x[None, :, :].float()).sum(-1).to(torch.bfloat16).t()
from torch.fx.experimental.proxy_tensor import make_fx
def bench(f, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best
for M in (1, 3, 6, 8):
    x = torch.randn(M, K).to(torch.bfloat16)
    g = make_fx(red)(x, ws[0])
    c = torch._inductor.compile(g, [x, ws[0]])
    a = bench(lambda: [F.linear(x, w) for w in ws]) / n * 1e6
    b = bench(lambda: [c(x, w) for w in ws]) / n * 1e6
    ref = F.linear(x.float(), ws[0].float()).to(torch.bfloat16)
    got = c(x, ws[0])[0] if isinstance(c(x, ws[0]), (tuple, list)) else c(x, ws[0])
    print(f"threads {sys.argv[1]} {N}x{K} rows {M}: F.linear bf16 {a:.0f} us, inductor reduction {b:.0f} us, maxdiff vs fp32 {(got.float()-ref.float()).abs().max().item():.3g}", flush=True)

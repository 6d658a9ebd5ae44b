import torch, time, sys, os, torch.nn.functional as F
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/s18/inductor")
import torch._inductor.config as ic
ic.max_autotune = True
ic.max_autotune_gemm_backends = "CPP"
ic.freezing = True
ic.compile_threads = 1
torch.set_num_threads(int(sys.argv[1]))
N, K = 2816, 512
w = torch.randn(N, K).to(torch.bfloat16)
class Lin(torch.nn.Module):
    def __init__(self, w):
        super().__init__(); self.w = torch.nn.Parameter(w, requires_grad=False)
    def forward(self, x): return F.linear(x, self.w)
def bench(f, cnt=200, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter()
        for _ in range(cnt): f()
        best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
with torch.no_grad():
  for M in (1, 3, 6):
    x = torch.randn(M, K).to(torch.bfloat16)
    t0 = time.perf_counter()
    c = torch.compile(Lin(w), dynamic=False)
    c(x); ct = time.perf_counter() - t0
    a = bench(lambda: F.linear(x, w))
    b = bench(lambda: c(x))
    d = (c(x).float() - F.linear(x.float(), w.float())).abs().max().item()
    print(f"threads {sys.argv[1]} rows {M} (weight in cache): F.linear {a:.0f} us, max-autotune CPP {b:.0f} us (compile {ct:.1f} s), maxdiff vs fp32 {d:.3g}", flush=True)

"""One-row products on this CPU: eager (kernels.linear / F.linear) vs an inductor-compiled torch.mv, bf16."""
import sys, time, statistics, torch
from faasmoe.models import compiled
from faasmoe.models.kernels import linear
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
shapes = [(704 * 2, 512), (512, 704), (2816, 512), (512, 1408), (1536, 512), (512, 512)]
def mv(w, x): return torch.mv(w, x)
from torch.fx.experimental.proxy_tensor import make_fx
import torch._inductor
for N, K in shapes:
    n = max(1, (256 << 20) // (N * K * 2))  # cycle ~256 MB so weights come from memory
    ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(n)]
    x = torch.randn(K).to(torch.bfloat16)
    with torch.inference_mode():
        g = torch._inductor.compile(make_fx(mv)(ws[0], x), [ws[0], x], options=compiled.OPTIONS)
        eq = sum(bool(g(w, x).equal(linear(x, w))) for w in ws[:20])
        close = max((g(w, x).float() - F.linear(x, w).float()).abs().max().item() for w in ws[:5])
        res = {}
        for name, f in (("eager", lambda w: linear(x, w)), ("compiled", lambda w: g(w, x))):
            ts = []
            for r in range(5):
                t = time.perf_counter()
                for w in ws: f(w)
                ts.append((time.perf_counter() - t) / len(ws) * 1e6)
            res[name] = statistics.median(ts)
    gbs = N * K * 2 / res["compiled"] / 1e3
    print(f"{N}x{K}: eager {res['eager']:.0f} us, compiled {res['compiled']:.0f} us ({gbs:.1f} GB/s); equal {eq}/20, maxdiff {close:.3g}", flush=True)

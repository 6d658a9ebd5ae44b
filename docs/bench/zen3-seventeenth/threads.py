import torch, time, torch._inductor, torch.nn.functional as F, statistics
from torch.fx.experimental.proxy_tensor import make_fx
from faasmoe.models import compiled
from faasmoe.models.kernels import linear
def mv(w, x): return torch.mv(w, x)
for N, K in ((151936 // 4 if False else 37984, 512), (2816, 512)):
    n = max(1, (256 << 20) // (N * K * 2))
    ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(n)]
    x = torch.randn(K).to(torch.bfloat16)
    for th in (1, 2):
        torch.set_num_threads(th)
        with torch.inference_mode():
            g = torch._inductor.compile(make_fx(mv)(ws[0], x), [ws[0], x], options=compiled.OPTIONS)
            for name, f in (("linear", lambda w: linear(x, w)), ("compiled", lambda w: g(w, x)),
                            ("linear 4 rows", lambda w: linear(x.expand(4, K).contiguous(), w))):
                ts = []
                for r in range(5):
                    t = time.perf_counter()
                    for w in ws: f(w)
                    ts.append((time.perf_counter() - t) / len(ws))
                dt = statistics.median(ts)
                print(f"{N}x{K} threads {th} {name}: {dt*1e6:.0f} us, {N*K*2/dt/1e9:.1f} GB/s", flush=True)

import time, torch, sys
sys.path.insert(0, "/work/main")
import torch._inductor.config as ic
ic.emulate_precision_casts = True
from torch.fx.experimental.proxy_tensor import make_fx
from faasmoe.models.kernels import pack, linear
torch.set_num_threads(1)
def f(w, x): return torch.nn.functional.linear(x, w)
for N, K, n in [(2816, 512, 24), (1536, 512, 24), (512, 1408, 24)]:
  for M in (3, 4):
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(n)]
    ps = [pack(w) for w in ws]
    x = torch.randn(M, K, dtype=torch.bfloat16)
    gm = make_fx(f)(ws[0], x); ind = torch._inductor.compile(gm, [ws[0], x])
    def timeit(g, ww):
        for w in ww: g(w)
        best = 1e9
        for _ in range(7):
            t = time.perf_counter()
            for w in ww: g(w)
            best = min(best, (time.perf_counter() - t) / len(ww))
        return best * 1e6
    r = {"packed": timeit(lambda w: linear(x, w), ps), "wx": timeit(lambda w: torch.mm(w, x.t()).t().contiguous(), ws),
         "inductor": timeit(lambda w: ind(w, x), ws)}
    o = ind(ws[0], x); o = o[0] if isinstance(o, (list, tuple)) else o
    print(f"{N}x{K} M={M}", {k: round(v) for k, v in r.items()}, "eq", torch.equal(o, linear(x, ps[0])))

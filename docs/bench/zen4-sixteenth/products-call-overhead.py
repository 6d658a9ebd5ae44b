import time, torch, sys, os
sys.path.insert(0, "/work/main")
import torch._inductor.config as ic
ic.emulate_precision_casts = True
from torch.fx.experimental.proxy_tensor import make_fx
from faasmoe.models.kernels import pack, linear
torch.set_num_threads(int(sys.argv[1]))
def f(w, v): return torch.mv(w, v)
for N, K, n in [(512, 512, 96), (1536, 512, 24), (2816, 512, 24), (151936, 512, 1)]:
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(n)]
    ps = [pack(w) for w in ws]
    x = torch.randn(K, dtype=torch.bfloat16)
    dyn = torch.compile(f, dynamic=False)
    gm = make_fx(f)(ws[0], x)
    ind = torch._inductor.compile(gm, [ws[0], x])
    def timeit(g, ww):
        for w in ww: g(w)
        best = 1e9
        for _ in range(7):
            t = time.perf_counter()
            for w in ww: g(w)
            best = min(best, (time.perf_counter() - t) / len(ww))
        return best * 1e6
    r = {"packed": timeit(lambda w: linear(x[None], w), ps), "dynamo": timeit(lambda w: dyn(w, x), ws),
         "inductor": timeit(lambda w: ind(w, x), ws)}
    one = ws[0]
    ro = {"packed1": timeit(lambda w: linear(x[None], w), [ps[0]] * 50), "dynamo1": timeit(lambda w: dyn(w, x), [one] * 50),
          "inductor1": timeit(lambda w: ind(w, x), [one] * 50)}
    out = ind(one, x); out = out[0] if isinstance(out, (list, tuple)) else out
    print(f"{N}x{K}", {k: round(v) for k, v in (r | ro).items()}, "eq dyn/ind", torch.equal(dyn(one, x), out))

import time, torch, sys
sys.path.insert(0, "/work/main")
from faasmoe.models.kernels import pack
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
lp = torch.ops.mkldnn._linear_pointwise
for N, K, n in [(512, 512, 96), (1536, 512, 48), (2816, 512, 24), (512, 1408, 48), (704, 512, 96), (512, 352, 96), (60, 512, 96), (151936, 512, 1)]:
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(n)]
    ps = [pack(w) for w in ws]
    x = torch.randn(1, K, dtype=torch.bfloat16)
    xs = {m: torch.cat([x, x.new_zeros(m - 1, K)]) for m in (2, 4, 8)}
    def timeit(g, ww):
        for w in ww: g(w)
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for w in ww: g(w)
            best = min(best, (time.perf_counter() - t) / len(ww))
        return best * 1e6
    r = {"p1": timeit(lambda w: lp(x, w, None, "none", [], ""), ps)}
    for m, xm in xs.items():
        r[f"p{m}"] = timeit(lambda w: lp(xm, w, None, "none", [], "")[:1], ps)
    eq = {m: sum(torch.equal(lp(xm, p, None, "none", [], "")[:1], F.linear(x, w)) for w, p in zip(ws, ps)) for m, xm in xs.items()}
    eq1 = sum(torch.equal(lp(x, p, None, "none", [], ""), F.linear(x, w)) for w, p in zip(ws, ps))
    print(f"{N}x{K}", {k: round(v) for k, v in r.items()}, f"eq F.linear: p1 {eq1}/{n}", {m: f"{v}/{n}" for m, v in eq.items()})

import time, torch, sys
import torch._inductor.config as ic
ic.emulate_precision_casts = True
sys.path.insert(0, "/work/main")
from faasmoe.models.kernels import pack, linear
nt = int(sys.argv[1]); torch.set_num_threads(nt)
torch.manual_seed(0)
shapes = [(151936, 512, 1), (2816, 512, 24), (1536, 512, 24), (512, 1408, 24), (704, 512, 96)]
cmv = torch.compile(lambda w, x: torch.mv(w, x))
for N, K, n in shapes:
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(n)]
    ps = [pack(w) for w in ws]
    x = torch.randn(K, dtype=torch.bfloat16)
    ref = [linear(x[None], p)[0] for p in ps]
    res = {}
    for name, f, ww in (("packed", lambda w: linear(x[None], w), ps), ("mv", lambda w: torch.mv(w, x), ws),
                        ("compiled", lambda w: cmv(w, x), ws)):
        for w in ww: f(w)
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for w in ww: f(w)
            best = min(best, (time.perf_counter() - t) / n)
        res[name] = best * 1e6
    eq = sum(torch.equal(cmv(w, x), r.reshape(-1)) for w, r in zip(ws, ref))
    gb = N * K * 2 / 1e9
    print(f"{N}x{K} threads={nt}: " + ", ".join(f"{k} {v:.0f}us ({gb/(v/1e6):.1f} GB/s)" for k, v in res.items()), f"compiled==packed {eq}/{n}")

import time, torch, json, mmap, functools, torch.nn.functional as F
import torch._inductor.config as ic
ic.emulate_precision_casts = True
torch.set_num_threads(1)
from faasmoe.models.layers import gated_mlp
exec(open('docs/bench/zen4-fifteenth/hostexp.py').read().split("def eager_mv")[0].split("torch.set_num_threads(1)")[1])
one = torch.compile(functools.partial(gated_mlp, act=F.silu), fullgraph=True)
def sep(x, gus, ds, ws):
    out = None
    for gu, d, w in zip(gus, ds, ws):
        y = one(x, gu, d).mul_(w)
        out = y if out is None else out.add_(y)
    return out
def fused_fn(x, gus, ds, w):
    out = None
    for j in range(len(gus)):
        y = gated_mlp(x, gus[j], ds[j], F.silu) * w[j]
        out = y if out is None else out + y
    return out
fused = torch.compile(fused_fn, fullgraph=True)
x = torch.randn(512, dtype=torch.bfloat16)
groups = [([E[i][0] for i in range(g, g + 4)], [E[i][1] for i in range(g, g + 4)]) for g in range(0, 96, 4)]
ws = [0.3125, 0.25, 0.1875, 0.125]
wt = torch.tensor(ws, dtype=torch.bfloat16)
sep(x, *groups[0], ws); fused(x, *groups[0], wt)
print("equal:", all(torch.equal(sep(x, gu, d, ws), fused(x, gu, d, wt)) for gu, d in groups))
for r in range(3):
    for name, f, w in (("separate", sep, ws), ("fused", fused, wt)):
        t = time.perf_counter()
        for _ in range(5):
            for gu, d in groups: f(x, gu, d, w)
        print(name, f"{(time.perf_counter() - t) / 5 / len(groups) * 1e6:.0f} us per 4 experts", end="; ")
    print()

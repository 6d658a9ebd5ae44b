# As it ran on cf1d60b: its `separate` and `fold_dynamo` go through torch.compile, whose tracing of kernels.linear
# relied on kernels._traced (removed by cf58b4b); on later code they trace the eager path instead.
import time, torch, functools, sys, torch.nn.functional as F
sys.path.insert(0, "/work/main")
import torch._inductor.config as ic
ic.emulate_precision_casts = True
from torch.fx.experimental.proxy_tensor import make_fx
from faasmoe.models.layers import gated_mlp
torch.set_num_threads(1)
torch.manual_seed(0)
H, I = 512, 352
E = [(torch.randn(2 * I, H, dtype=torch.bfloat16) * 0.05, torch.randn(H, I, dtype=torch.bfloat16) * 0.05) for _ in range(96)]
x = torch.randn(H, dtype=torch.bfloat16)
one = torch.compile(functools.partial(gated_mlp, act=F.silu), fullgraph=True)
def sep(x, gus, ds, ws):
    out = None
    for gu, d, w in zip(gus, ds, ws):
        y = one(x, gu, d).mul_(w)
        out = y if out is None else out.add_(y)
    return out
def first_fn(x, gu, d, w): return gated_mlp(x, gu, d, F.silu) * w
def more_fn(x, gu, d, w, acc): return acc + gated_mlp(x, gu, d, F.silu) * w
wt = torch.tensor([0.3125, 0.25, 0.1875, 0.125], dtype=torch.bfloat16)
with torch.inference_mode():
    ex = (x, E[0][0], E[0][1], wt[0])
    first = torch._inductor.compile(make_fx(first_fn)(*ex), list(ex))
    ex2 = ex + (x.clone(),)
    more = torch._inductor.compile(make_fx(more_fn)(*ex2), list(ex2))
    firstd = torch.compile(first_fn, fullgraph=True, dynamic=False)
    mored = torch.compile(more_fn, fullgraph=True, dynamic=False)
def unwrap(o): return o[0] if isinstance(o, (list, tuple)) else o
def fold(x, gus, ds, w):
    out = unwrap(first(x, gus[0], ds[0], w[0]))
    for j in range(1, len(gus)):
        out = unwrap(more(x, gus[j], ds[j], w[j], out))
    return out
def foldd(x, gus, ds, w):
    out = firstd(x, gus[0], ds[0], w[0])
    for j in range(1, len(gus)):
        out = mored(x, gus[j], ds[j], w[j], out)
    return out
ws = wt.tolist()
groups = [([E[i][0] for i in range(g, g + 4)], [E[i][1] for i in range(g, g + 4)]) for g in range(0, 96, 4)]
with torch.inference_mode():
    sep(x, *groups[0], ws); fold(x, *groups[0], wt); foldd(x, *groups[0], wt); foldd(x, groups[0][0][:1], groups[0][1][:1], wt)
    print("equal:", all(torch.equal(sep(x, gu, d, ws), fold(x, gu, d, wt)) for gu, d in groups))
    import statistics
    for n in (4, 1):
        res = {"separate": [], "fold_inductor": [], "fold_dynamo": []}
        for r in range(8):
            for name, f, w in (("separate", sep, ws), ("fold_inductor", fold, wt), ("fold_dynamo", foldd, wt)):
                t = time.perf_counter()
                for _ in range(5):
                    for gu, d in groups: f(x, gu[:n], d[:n], w)
                res[name].append((time.perf_counter() - t) / 5 / len(groups) * 1e6)
        print(n, "experts, median us:", {k: round(statistics.median(v)) for k, v in res.items()}, "min:", {k: round(min(v)) for k, v in res.items()})

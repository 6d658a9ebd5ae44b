import time, torch, torch.nn.functional as F
from faasmoe.models.kernels import pack
torch.set_num_threads(1)
dt = torch.bfloat16
for N, K in ((1536, 512), (2816, 512), (512, 1408), (60, 512)):
    Ws = [torch.randn(N, K, dtype=dt) for _ in range(24)]
    Ps = [pack(w) for w in Ws]
    x = torch.randn(K, dtype=dt); x2 = x[None]
    cmv = torch.compile(lambda w, v: torch.mv(w, v), dynamic=True)
    fns = {"mv": lambda i: torch.mv(Ws[i], x), "linear": lambda i: F.linear(x2, Ws[i]),
           "packed": lambda i: torch.ops.mkldnn._linear_pointwise(x2, Ps[i], None, "none", [], ""),
           "cmv": lambda i: cmv(Ws[i], x)}
    res = {}
    for r in range(3):
        for n, f in fns.items():
            for i in range(24): f(i)
            t = time.perf_counter()
            for _ in range(20):
                for i in range(24): f(i)
            res.setdefault(n, []).append((time.perf_counter() - t) / 480 * 1e6)
    print(N, K, " ".join(f"{n} {min(v):.0f}" for n, v in res.items()), flush=True)

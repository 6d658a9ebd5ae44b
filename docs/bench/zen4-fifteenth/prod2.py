import time, torch, torch.nn.functional as F
from faasmoe.models.kernels import pack
torch.set_num_threads(1)
dt = torch.bfloat16
for N, K in ((704, 512), (512, 352), (1536, 512)):
    Ws = [torch.randn(N, K, dtype=dt) for _ in range(96)]
    Ps = [pack(w) for w in Ws]
    x = torch.randn(K, dtype=dt); x2 = x[None]; xc = x[:, None]
    fns = {"mv": lambda i: torch.mv(Ws[i], x), "linear": lambda i: F.linear(x2, Ws[i]),
           "mm_wx": lambda i: torch.mm(Ws[i], xc), "matmul": lambda i: torch.matmul(Ws[i], x),
           "packed": lambda i: torch.ops.mkldnn._linear_pointwise(x2, Ps[i], None, "none", [], ""),
           "fp32": lambda i: torch.mv(Ws[i].float(), x.float()).to(dt)}
    res = {}
    for r in range(3):
        for n, f in fns.items():
            for i in range(96): f(i)
            t = time.perf_counter()
            for _ in range(5):
                for i in range(96): f(i)
            res.setdefault(n, []).append((time.perf_counter() - t) / 480 * 1e6)
    print(N, K, " ".join(f"{n} {min(v):.0f}" for n, v in res.items()), flush=True)
    r = torch.mv(Ws[0], x)
    print("  equal to mv:", {n: torch.equal(f(0).reshape(-1), r) for n, f in fns.items()})

import torch, time, sys, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
N, K = 2816, 512
n = 50
ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(n)]
wt32 = [w.float().t().contiguous() for w in ws[:25]]  # [K, N]
w32 = [w.float() for w in ws[:25]]
def bench(f, cnt, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
for M in (1, 3, 6):
    x = torch.randn(M, K).to(torch.bfloat16); x32 = x.float()
    r = {}
    r["F.linear bf16"] = bench(lambda: [F.linear(x, w) for w in ws], n)
    r["mm(w, x.T) bf16"] = bench(lambda: [torch.mm(w, x.t()) for w in ws], n)
    r["x32 @ w32.T"] = bench(lambda: [x32 @ w.t() for w in w32], 25)
    r["x32 @ wT32 (K-major)"] = bench(lambda: [x32 @ w for w in wt32], 25)
    r["mv fp32 per row"] = bench(lambda: [[torch.mv(w, xx) for xx in x32] for w in w32], 25)
    print(f"threads {sys.argv[1]} rows {M}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)

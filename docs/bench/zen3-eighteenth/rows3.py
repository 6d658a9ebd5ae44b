import torch, time, sys, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
N, K = 2816, 512
n = 25
ws = [torch.randn(N, K).to(torch.bfloat16) for _ in range(2 * n)]
w32 = [w.float() for w in ws[:n]]
print("bf16 onednn supported:", torch.ops.mkldnn._is_mkldnn_bf16_supported())
def bench(f, cnt, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
for M in (1, 3, 6, 8):
    x = torch.randn(M, K).to(torch.bfloat16); x32 = x.float()
    p32 = [torch.ops.mkldnn._reorder_linear_weight(w, M) for w in w32]
    r = {}
    r["F.linear bf16"] = bench(lambda: [F.linear(x, w) for w in ws], 2 * n)
    r["F.linear fp32"] = bench(lambda: [F.linear(x32, w) for w in w32], n)
    r["onednn packed fp32"] = bench(lambda: [torch.ops.mkldnn._linear_pointwise(x32, p, None, "none", [], "") for p in p32], n)
    ok = (torch.ops.mkldnn._linear_pointwise(x32, p32[0], None, "none", [], "") - F.linear(x32, w32[0])).abs().max().item()
    print(f"threads {sys.argv[1]} rows {M}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()) + f"  (packed vs F.linear maxdiff {ok:.3g})", flush=True)

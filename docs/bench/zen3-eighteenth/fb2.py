import torch, time, sys, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
N, K = int(sys.argv[2]), int(sys.argv[3])
n = max(2, int(150e6 // (N * K * 2)))
ws = [(torch.randn(N, K) * 0.02).to(torch.bfloat16) for _ in range(n)]
b16 = (torch.randn(N) * 0.1).to(torch.bfloat16)
pk = [torch.ops.quantized.linear_prepack_fp16(w.float(), None) for w in ws]
def bench(f, cnt, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
for M in (1, 3, 6):
    x = torch.randn(M, K).to(torch.bfloat16); x32 = x.float()
    a = bench(lambda: [F.linear(x, w) for w in ws], n)
    b = bench(lambda: [torch.ops.quantized.linear_dynamic_fp16(x32, p).to(torch.bfloat16) for p in pk], n)
    eqs = []
    for i in range(min(n, 8)):
        ref = F.linear(x, ws[i], b16)
        got = (torch.ops.quantized.linear_dynamic_fp16(x32, pk[i]) + b16.float()).to(torch.bfloat16)
        eqs.append((got == ref).float().mean().item())
    print(f"threads {sys.argv[1]} {N}x{K} rows {M}: F.linear bf16 {a:.0f} us, quantized.linear_dynamic_fp16 {b:.0f} us (x{a/b:.2f}); with bias, equal to F.linear bf16 in {min(eqs)*100:.2f}-{max(eqs)*100:.2f}% of outputs", flush=True)

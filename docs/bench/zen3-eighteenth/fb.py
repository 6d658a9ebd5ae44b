import torch, time, sys, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
N, K = int(sys.argv[2]), int(sys.argv[3])
n = max(4, int(150e6 // (N * K * 2)))
ws = [(torch.randn(N, K) * 0.02).to(torch.bfloat16) for _ in range(n)]
print("fbgemm available:", torch.backends.quantized.supported_engines, torch._C._get_fbgemm_is_cpu_supported() if hasattr(torch._C, "_get_fbgemm_is_cpu_supported") else "?")
pk = [torch.fbgemm_pack_gemm_matrix_fp16(w.float()) for w in ws]
exact = (ws[0].float().half().float() == ws[0].float()).float().mean().item()
print(f"bf16 -> fp16 exact for {exact*100:.4f}% of values")
def bench(f, cnt, reps=3):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
for M in (1, 2, 3, 4, 6, 8, 16):
    x = torch.randn(M, K).to(torch.bfloat16); x32 = x.float()
    a = bench(lambda: [F.linear(x, w) for w in ws], n)
    b = bench(lambda: [torch.fbgemm_linear_fp16_weight_fp32_activation(x32, p, None) for p in pk], n)
    ref = F.linear(x32, ws[1].float())
    got = torch.fbgemm_linear_fp16_weight_fp32_activation(x32, pk[1], None)
    eq = (got.to(torch.bfloat16) == ref.to(torch.bfloat16)).float().mean().item()
    print(f"threads {sys.argv[1]} {N}x{K} rows {M}: F.linear bf16 {a:.0f} us, fbgemm fp16-weight {b:.0f} us  (x{a/b:.2f}); bf16 outputs equal to fp32 F.linear's: {eq*100:.1f}%", flush=True)

import torch, time, sys, warnings, torch.nn.functional as F
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[1]))
def bench(f, cnt, reps=5):
    best = 1e9
    for r in range(reps):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / cnt * 1e6
for N, K in ((1536, 512), (512, 512), (60, 512), (2816, 512), (512, 1408), (151936, 512)):
    n = max(2, int(200e6 // (N * K * 2)))
    ws = [(torch.randn(N, K) * 0.02).to(torch.bfloat16) for _ in range(n)]
    pa = [torch.fbgemm_pack_gemm_matrix_fp16(w.float()) for w in ws]
    pb = [torch.ops.quantized.linear_prepack_fp16(w.float(), None) for w in ws]
    for M in (1, 6):
        x = torch.randn(M, K).to(torch.bfloat16); x32 = x.float()
        a = bench(lambda: [F.linear(x, w) for w in ws], n)
        b = bench(lambda: [torch.fbgemm_linear_fp16_weight_fp32_activation(x32, p, None).to(torch.bfloat16) for p in pa], n)
        c = bench(lambda: [torch.ops.quantized.linear_dynamic_fp16(x32, p).to(torch.bfloat16) for p in pb], n)
        print(f"threads {sys.argv[1]} {N}x{K} rows {M}: F.linear bf16 {a:.0f} us, fbgemm_linear_fp16_weight {b:.0f}, quantized.linear_dynamic_fp16 {c:.0f}", flush=True)

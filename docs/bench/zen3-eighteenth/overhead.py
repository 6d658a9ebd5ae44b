# fixed cost a call: one row, one thread, weight in cache
import torch, warnings, time, torch.nn.functional as F
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
for N, K in ((64, 64), (512, 512)):
    w = (torch.randn(N, K) * 0.05).to(torch.bfloat16)
    pa = torch.fbgemm_pack_gemm_matrix_fp16(w.float()); pb = torch.ops.quantized.linear_prepack_fp16(w.float(), None)
    x = torch.randn(1, K).to(torch.bfloat16); x32 = x.float()
    for name, f in (("F.linear bf16", lambda: F.linear(x, w)), ("x.float()", lambda: x.float()),
                    ("fbgemm_linear_fp16 (fp32 in/out)", lambda: torch.fbgemm_linear_fp16_weight_fp32_activation(x32, pa, None)),
                    ("quantized op (fp32 in/out)", lambda: torch.ops.quantized.linear_dynamic_fp16(x32, pb))):
        for _ in range(200): f()
        best = 1e9
        for r in range(5):
            t = time.perf_counter()
            for _ in range(2000): f()
            best = min(best, (time.perf_counter() - t) / 2000)
        print(f"{N}x{K} in cache, 1 row: {name}: {best*1e6:.1f} us")

import torch, time, warnings, sys, torch.nn.functional as F
sys.path.insert(0, "/work/main")
warnings.filterwarnings("ignore")
from faasmoe.models import kernels
torch.set_num_threads(2)
def bench(f, n):
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
    return best / n * 1e6
for N, K in ((1536, 512), (512, 512), (2816, 512), (512, 1408), (704, 512), (512, 352)):
    n = int(150e6 // (N * K * 2))
    ws = [(torch.randn(N, K) / 20).to(torch.bfloat16) for _ in range(n)]
    qs = [torch.ops.quantized.linear_prepack_fp16(w.float(), None) for w in ws]
    for M in (1, 6):
        x = torch.randn(M, K).to(torch.bfloat16)
        a = bench(lambda: [kernels.linear(x, w) for w in ws], n)
        b = bench(lambda: [torch.ops.quantized.linear_dynamic_fp16(x.float(), q).to(torch.bfloat16) for q in qs], n)
        print(f"2 threads, {M} rows, {N}x{K} from memory: kernels.linear bf16 {a:.0f} us, quantized fp16 op (2 threads) {b:.0f} us", flush=True)

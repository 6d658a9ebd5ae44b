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
    ps = [kernels._pack_fp16(w, 1) for w in ws]
    x = torch.randn(1, K).to(torch.bfloat16)
    a = bench(lambda: [F.linear(x, w) for w in ws], n)
    b = bench(lambda: [kernels.linear(x, p) for p in ps], n)
    print(f"2 threads, one row, {N}x{K} from memory: F.linear {a:.0f} us, fp16 packed (one thread) {b:.0f} us")

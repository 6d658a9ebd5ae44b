import torch, time, warnings, torch.nn.functional as F
from concurrent.futures import ThreadPoolExecutor
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
N, K, R = 151936, 512, 8192
w = (torch.randn(N, K) / 20).to(torch.bfloat16)
pool = ThreadPoolExecutor(2)
t = time.perf_counter()
shards = list(pool.map(lambda a: torch.fbgemm_pack_gemm_matrix_fp16(w[a:a + R].float()), range(0, N, R)))
print(f"pack {len(shards)} shards on 2 threads: {time.perf_counter() - t:.2f} s")
def prod(x32, group):
    return [torch.fbgemm_linear_fp16_weight_fp32_activation(x32, p, None) for p in group]
def sharded(x):
    x32 = x.float()
    half = (len(shards) + 1) // 2
    f = pool.submit(prod, x32, shards[half:])
    a = prod(x32, shards[:half])
    return torch.cat(a + f.result(), dim=1).to(x.dtype)
def bench(f, n=20):
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3
for M in (1, 3, 6):
    x = torch.randn(M, K).to(torch.bfloat16)
    print(f"rows {M}: F.linear 2 threads {bench(lambda: F.linear(x, w)):.2f} ms, fp16 shards on 2 threads {bench(lambda: sharded(x)):.2f} ms, equal {(sharded(x) == F.linear(x, w)).float().mean().item()*100:.3f}%")

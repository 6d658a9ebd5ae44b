import torch, time, warnings, sys, torch.nn.functional as F
warnings.filterwarnings("ignore")
from concurrent.futures import ThreadPoolExecutor
torch.set_num_threads(2)
N, K = 151936, 512
w = (torch.randn(N, K) / 20).to(torch.bfloat16)
R = 8192
# the lm_head in 19 slices of rows, packed for FBGEMM's one-thread call, half of them multiplied on a Python
# thread (the call releases the GIL): the way tried first, not kept
pool = ThreadPoolExecutor(2)
sh = [torch.fbgemm_pack_gemm_matrix_fp16(w[a:a + R].float()) for a in range(0, N, R)]
def group(x32, g):
    return [torch.fbgemm_linear_fp16_weight_fp32_activation(x32, p, None) for p in g]
def on_pool(x):
    x32 = x.float()
    f = pool.submit(group, x32, sh[10:])
    return torch.cat(group(x32, sh[:10]) + f.result(), dim=1).to(x.dtype)
q = [torch.ops.quantized.linear_prepack_fp16(w[a:a + R].float(), None) for a in range(0, N, R)]
other = (torch.randn(2816, 512) / 20).to(torch.bfloat16)
def quant(x):
    x32 = x.float()
    return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x32, p) for p in q], dim=1).to(x.dtype)
def bench(f, n=10):
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            F.linear(torch.randn(2, 512).to(torch.bfloat16), other)  # an OpenMP region first, as in a step
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3
for M in (1, 6):
    x = torch.randn(M, K).to(torch.bfloat16)
    print(f"rows {M} (after an OpenMP product): F.linear {bench(lambda: F.linear(x, w)):.2f} ms, shards on the pool {bench(lambda: on_pool(x)):.2f} ms, quantized op per shard {bench(lambda: quant(x)):.2f} ms", flush=True)

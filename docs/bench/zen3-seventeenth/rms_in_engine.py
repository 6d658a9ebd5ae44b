import time, statistics, torch, faasmoe
from faasmoe.platforms import PlatformConfig
import faasmoe.models.control_plane as cpm
orig = cpm.rms_norm
ts, info = [], {}
def timed(x, w, eps):
    s = time.perf_counter(); y = orig(x, w, eps); ts.append(time.perf_counter() - s)
    info[(tuple(x.shape), x.stride(), x.dtype, x.is_contiguous(), torch.get_num_threads())] = info.get((tuple(x.shape), x.stride(), x.dtype, x.is_contiguous(), torch.get_num_threads()), 0) + 1
    return y
cpm.rms_norm = timed
e = faasmoe.load("models/qwen-quarter", experts_per_function=60, prewarm=True, platform_config=PlatformConfig(compile_experts=True))
ids = e.encode("The quick brown fox jumps over the lazy dog and keeps running")
e.generate(ids, max_tokens=8)
ts.clear(); info.clear()
e.generate(ids, max_tokens=32)
print("rms_norm in engine: median", statistics.median(ts) * 1e6, "us; p90", sorted(ts)[9 * len(ts) // 10] * 1e6, "n", len(ts))
print(info)
x = torch.randn(1, 512).to(torch.bfloat16); w = torch.randn(512).to(torch.bfloat16)
ts.clear()
with torch.inference_mode():
    for _ in range(500): timed(x, w, 1e-6)
print("same call in isolation:", statistics.median(ts) * 1e6)
e.close()

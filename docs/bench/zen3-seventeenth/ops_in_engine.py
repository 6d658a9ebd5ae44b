import time, statistics, torch, faasmoe, threading, os
from faasmoe.platforms import PlatformConfig
import faasmoe.models.control_plane as cpm
orig = cpm.rms_norm
ts, ts_add, ts_rms_b = [], [], []
y0 = torch.randn(1, 512).to(torch.bfloat16)
def timed(x, w, eps):
    s = time.perf_counter(); z = x + y0; ts_add.append(time.perf_counter() - s)
    s = time.perf_counter(); y = orig(x, w, eps); ts.append(time.perf_counter() - s)
    s = time.perf_counter(); y = orig(x, w, eps); ts_rms_b.append(time.perf_counter() - s)
    return y
cpm.rms_norm = timed
e = faasmoe.load("models/qwen-quarter", experts_per_function=60, prewarm=True, platform_config=PlatformConfig(compile_experts=True))
ids = e.encode("The quick brown fox jumps over the lazy dog and keeps running")
e.generate(ids, max_tokens=8)
for l in (ts, ts_add, ts_rms_b): l.clear()
e.generate(ids, max_tokens=32)
m = lambda l: f"median {statistics.median(l)*1e6:.1f} us"
print("x + y before:", m(ts_add), "| rms_norm:", m(ts), "| rms_norm again right after:", m(ts_rms_b))
print("threads in this process:", [t.name for t in threading.enumerate()], "torch threads", torch.get_num_threads())
e.close()

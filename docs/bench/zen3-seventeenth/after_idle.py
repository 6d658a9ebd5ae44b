"""One small torch op's time right after the thread slept (its vCPU idle) against right after it spun as long."""
import time, statistics, torch
from faasmoe.models.layers import rms_norm
torch.set_num_threads(1)
x = torch.randn(1, 512).to(torch.bfloat16); w = torch.randn(512).to(torch.bfloat16)
def spin(s):
    t = time.perf_counter()
    while time.perf_counter() - t < s: pass
with torch.inference_mode():
    for gap in (0.0002, 0.001, 0.003):
        res = {}
        for name, wait in (("slept", time.sleep), ("spun", spin)):
            a, b = [], []
            for _ in range(300):
                wait(gap)
                s = time.perf_counter(); rms_norm(x, w, 1e-6); a.append(time.perf_counter() - s)
                s = time.perf_counter(); rms_norm(x, w, 1e-6); b.append(time.perf_counter() - s)
            res[name] = (statistics.median(a) * 1e6, statistics.median(b) * 1e6)
        print(f"after {gap*1e3:.1f} ms: " + "; ".join(f"{k}: first {v[0]:.0f} us, second {v[1]:.0f} us" for k, v in res.items()), flush=True)

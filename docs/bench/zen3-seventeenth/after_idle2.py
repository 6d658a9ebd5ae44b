import time, statistics, torch, ctypes, numpy as np
libc = ctypes.CDLL("libc.so.6")
torch.set_num_threads(1)
x = torch.randn(1, 512).to(torch.bfloat16); y = x.clone()
a = np.random.rand(512)
def spin(s):
    t = time.perf_counter()
    while time.perf_counter() - t < s: pass
def py():  # pure Python work, no torch
    s = 0
    for i in range(200): s += i
    return s
for gap in (0.0002, 0.003, 0.01):
    for name, wait in (("slept", time.sleep), ("spun", spin)):
        res = {}
        migr = 0
        for opname, op in (("x+y", lambda: x + y), ("np", lambda: a * a), ("py", py)):
            f, s2 = [], []
            for _ in range(200):
                c0 = libc.sched_getcpu()
                wait(gap)
                migr += libc.sched_getcpu() != c0
                s = time.perf_counter(); op(); f.append(time.perf_counter() - s)
                s = time.perf_counter(); op(); s2.append(time.perf_counter() - s)
            res[opname] = f"{statistics.median(f)*1e6:.1f}/{statistics.median(s2)*1e6:.1f}"
        print(f"after {gap*1e3:.1f} ms {name}: first/second us {res}; cpu changed {migr}/600", flush=True)

import torch, time, sys, os, mmap, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
huge = sys.argv[2] == "huge"
n, N, K = 100, 1408, 512
size = n * N * K * 2
m = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if huge: m.madvise(mmap.MADV_HUGEPAGE)
buf = torch.frombuffer(m, dtype=torch.bfloat16)
off = 0
big = buf[:n * N * K]
big.copy_(torch.randn(n * N * K).to(torch.bfloat16))
ws = [big[i * N * K:(i + 1) * N * K].view(N, K) for i in range(n)]
x = torch.randn(1, 512).to(torch.bfloat16)
def ahp():
    for l in open("/proc/self/smaps_rollup"):
        if l.startswith("AnonHugePages"): return l.split()[1] + " kB"
for r in range(6):
    t = time.perf_counter()
    for w in ws: F.linear(x, w)
    dt = time.perf_counter() - t
    if r >= 3: print(f"{sys.argv[2]} threads={sys.argv[1]}: {n*N*K*2/dt/1e9:.2f} GB/s  ({dt/n*1e6:.0f} us per 1408x512)  AnonHuge {ahp()}")

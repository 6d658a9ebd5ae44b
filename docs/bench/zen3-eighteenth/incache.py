# one-row products with the weight in cache (512 x 512), one thread: fp32 sgemm and mv against bf16 F.linear
import torch, time
torch.set_num_threads(1)
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
for _ in range(3):
    t = time.perf_counter(); [a @ b for _ in range(5)]; dt = (time.perf_counter() - t) / 5
    print(f'sgemm 1024^3 1 thread: {2*1024**3/dt/1e9:.1f} GFLOP/s')
x = torch.randn(512, 512); w = torch.randn(512, 512)
for _ in range(3):
    t = time.perf_counter(); [torch.mv(w, x[0]) for _ in range(2000)]; dt = (time.perf_counter() - t) / 2000
    print(f'fp32 mv 512x512 in L2: {dt*1e6:.1f} us, {512*512/dt/1e9:.2f} G FMA/s')
wb = w.to(torch.bfloat16); xb = x[:1].to(torch.bfloat16)
for _ in range(3):
    t = time.perf_counter(); [torch.nn.functional.linear(xb, wb) for _ in range(2000)]; dt = (time.perf_counter() - t) / 2000
    print(f'bf16 F.linear 1 row 512x512 in L2: {dt*1e6:.1f} us, {512*512/dt/1e9:.2f} G FMA/s')

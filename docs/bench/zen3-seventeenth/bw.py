import torch, time, sys
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(64 << 20)  # 256 MB fp32
b = a.to(torch.bfloat16)
for name, f, nbytes in (("fp32 sum", lambda: a.sum(), a.numel()*4), ("bf16 sum", lambda: b.sum(), b.numel()*2),
                        ("fp32 mv", lambda: torch.mv(a.view(-1, 512), torch.ones(512)), a.numel()*4),
                        ("int8 sum", lambda: q.sum(dtype=torch.int32), a.numel())):
    if name == "int8 sum": q = torch.randint(-100, 100, (64 << 20,), dtype=torch.int8)
    f(); ts = []
    for _ in range(5):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    print(f"{name}: {nbytes / min(ts) / 1e9:.1f} GB/s")

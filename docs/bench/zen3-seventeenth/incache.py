import torch, time, torch._inductor, torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from faasmoe.models import compiled
torch.set_num_threads(1)
def mv(w, x): return torch.mv(w, x)
for N, K in ((256, 512), (1408, 512)):
    w = torch.randn(N, K).to(torch.bfloat16); x = torch.randn(K).to(torch.bfloat16)
    w32 = w.float(); x32 = x.float()
    with torch.inference_mode():
        g = torch._inductor.compile(make_fx(mv)(w, x), [w, x], options=compiled.OPTIONS)
        for name, f in (("F.linear bf16", lambda: F.linear(x, w)), ("compiled bf16", lambda: g(w, x)),
                        ("mv fp32", lambda: torch.mv(w32, x32))):
            for _ in range(50): f()
            t = time.perf_counter()
            for _ in range(500): f()
            dt = (time.perf_counter() - t) / 500
            print(f"{N}x{K} {name}: {dt*1e6:.1f} us, {N*K/dt/1e9:.2f} GMAC/s")

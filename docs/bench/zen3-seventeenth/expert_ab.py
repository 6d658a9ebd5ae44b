"""One quarter-preset expert for one token, weights cycled from memory: eager gated_mlp vs CompiledExpert."""
import torch, time, statistics, torch.nn.functional as F
from faasmoe.models import compiled
from faasmoe.models.layers import gated_mlp
torch.set_num_threads(1)
H, I = 512, 352
n = (256 << 20) // ((3 * I * H) * 2)
gus = [torch.randn(2 * I, H).to(torch.bfloat16) for _ in range(n)]
downs = [torch.randn(H, I).to(torch.bfloat16) for _ in range(n)]
x = torch.randn(H).to(torch.bfloat16); w = torch.tensor(0.3).to(torch.bfloat16)
ce = compiled.CompiledExpert(F.silu)
with torch.inference_mode():
    acc = ce(x, gus[0], downs[0], w)
    ce(x, gus[0], downs[0], w, acc)
    eq = sum(bool(ce(x, g, d, w).equal(ce.eager(x, g, d, w))) for g, d in zip(gus[:20], downs[:20]))
    for rnd in range(3):
        for name, f in (("eager", lambda g, d: ce.eager(x, g, d, w, acc)), ("compiled", lambda g, d: ce(x, g, d, w, acc))):
            ts = []
            for r in range(5):
                t = time.perf_counter()
                for g, d in zip(gus, downs): f(g, d)
                ts.append((time.perf_counter() - t) / n)
            print(f"{name}: {statistics.median(ts)*1e6:.0f} us", flush=True)
print("equal", eq, "/ 20")

import time, torch, json, mmap, torch.nn.functional as F
import torch._inductor.config as ic
ic.emulate_precision_casts = True
torch.set_num_threads(1)
path = "models/qwen-quarter/model-00001-of-00001.safetensors"
f = open(path, "rb"); mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
hlen = int.from_bytes(mm[:8], "little"); hdr = json.loads(mm[8:8 + hlen])
buf = torch.frombuffer(mm, dtype=torch.uint8)
def t(name):
    m = hdr[name]; a, b = m["data_offsets"]
    return buf[8 + hlen + a: 8 + hlen + b].view(torch.bfloat16).view(m["shape"])
E = []
for L in range(24):
    for e in (3, 17, 29, 41):
        p = f"model.layers.{L}.mlp.experts.{e}."
        g, u, d = t(p + "gate_proj.weight"), t(p + "up_proj.weight"), t(p + "down_proj.weight")
        assert u.data_ptr() == g.data_ptr() + g.numel() * 2
        gu = buf[8 + hlen + hdr[p + "gate_proj.weight"]["data_offsets"][0]:][: 2 * g.numel() * 2].view(torch.bfloat16).view(2 * g.shape[0], 512)
        E.append((gu, d))
def eager_mv(x, gu, d, w):
    a, b = torch.mv(gu, x).split(352)
    return torch.mv(d, F.silu(a) * b).mul_(w)
def eager_mm(x, gu, d, w):
    a, b = torch.mm(gu, x[:, None])[:, 0].split(352)
    return torch.mm(d, (F.silu(a) * b)[:, None])[:, 0].mul_(w)
def comp(x, gu, d, w: float):
    a, b = torch.mv(gu, x).split(352)
    return torch.mv(d, F.silu(a) * b) * w
c = torch.compile(comp)
def four(x, gu, d, w):
    return c(x, gu, d, w)
x = torch.randn(512, dtype=torch.bfloat16)
for n, fn in (("mv", eager_mv), ("mm", eager_mm), ("compiled", c)):
    fn(x, *E[0], 0.25)
res = {}
for r in range(4):
    for n, fn in (("mv", eager_mv), ("mm", eager_mm), ("compiled", c)):
        t0 = time.perf_counter()
        for _ in range(3):
            for gu, d in E: fn(x, gu, d, 0.25)
        res.setdefault(n, []).append((time.perf_counter() - t0) / 3 / len(E) * 1e6)
print({n: [round(v) for v in vs] for n, vs in res.items()}, "us per expert")
ref = eager_mv(x, *E[5], 0.25)
print("equal mv/mm", torch.equal(ref, eager_mm(x, *E[5], 0.25)), "mv/compiled", torch.equal(ref, c(x, *E[5], 0.25)),
      (ref.float() - c(x, *E[5], 0.25).float()).abs().max().item())

import time, torch, torch.nn.functional as F
torch.set_num_threads(1)
H, h, g, d, L, E, A = 512, 4, 4, 128, 24, 60, 4
dt = torch.bfloat16
torch.manual_seed(0)
W = [dict(ln1=torch.rand(H, dtype=dt)+0.5, ln2=torch.rand(H, dtype=dt)+0.5,
          wqkv=torch.randn(h*d+2*g*d, H, dtype=dt)/23, bqkv=torch.randn(h*d+2*g*d, dtype=dt)/10,
          wo=torch.randn(H, h*d, dtype=dt)/23, router=torch.randn(E, H, dtype=dt)/23) for _ in range(L)]
C = 512
K = torch.zeros(L, g, C, d, dtype=dt); V = torch.zeros(L, g, C, d, dtype=dt)
inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float) / d))

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1); return torch.cat((-x2, x1), dim=-1)

def block(x, ln1, wqkv, bqkv, wo, ln2, router, cos, sin, Kl, Vl, start: int):
    xn = ln1 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    qkv = F.linear(xn, wqkv, bqkv).view(1, h + 2 * g, d)
    qk = qkv[:, :h + g]
    qk = qk * cos + rotate_half(qk) * sin
    q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + g:]
    Kl[:, start:start + 1] = k.transpose(0, 1)
    Vl[:, start:start + 1] = v.transpose(0, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], Kl[None, :, :start + 1], Vl[None, :, :start + 1])
    att = F.linear(o[0].transpose(0, 1).reshape(1, h * d), wo)
    x = x + att
    m = ln2 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    logits = F.linear(m, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, e = torch.topk(probs, A)
    w = w / w.sum()
    return x, m, e, w.to(dt)

def run(fn, steps, start0):
    x = torch.randn(1, H, dtype=dt)
    t0 = time.perf_counter()
    for s in range(steps):
        pos = start0 + s
        f = pos * inv
        emb = torch.cat((f, f))
        cos, sin = emb.cos().to(dt)[None, None], emb.sin().to(dt)[None, None]
        for i in range(L):
            w = W[i]
            x, m, e, wt = fn(x, w['ln1'], w['wqkv'], w['bqkv'], w['wo'], w['ln2'], w['router'], cos, sin, K[i], V[i], pos)
            x = x / x.norm() * 20
    return (time.perf_counter() - t0) / steps * 1000, x

comp = torch.compile(block, dynamic=True)
t = time.perf_counter(); run(comp, 3, 100); print("compile s", time.perf_counter() - t)
for r in range(3):
    te, xe = run(block, 30, 100)
    tc, xc = run(comp, 30, 100)
    print(f"eager {te:.2f} ms/step  compiled {tc:.2f}  maxdiff {(xe-xc).abs().max().item():.3g}")

def pre(x, ln1, wqkv, bqkv, cos, sin):
    xn = ln1 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    qkv = F.linear(xn, wqkv, bqkv).view(x.shape[0], h + 2 * g, d)
    qk = qkv[:, :h + g]
    qk = qk * cos + rotate_half(qk) * sin
    return qk[:, :h], qk[:, h:], qkv[:, h + g:]

def post(x, o, wo, ln2, router):
    x = x + F.linear(o, wo)
    m = ln2 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    logits = F.linear(m, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, e = torch.topk(probs, A)
    w = w / w.sum(-1, keepdim=True)
    return x, m, e, w.to(dt)

cpre, cpost = torch.compile(pre, dynamic=True), torch.compile(post, dynamic=True)
def split(fpre, fpost):
    def f(x, ln1, wqkv, bqkv, wo, ln2, router, cos, sin, Kl, Vl, start):
        q, k, v = fpre(x, ln1, wqkv, bqkv, cos, sin)
        Kl[:, start:start + 1] = k.transpose(0, 1)
        Vl[:, start:start + 1] = v.transpose(0, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], Kl[None, :, :start + 1], Vl[None, :, :start + 1])
        return fpost(x, o[0].transpose(0, 1).reshape(1, h * d), wo, ln2, router)
    return f
sc = split(cpre, cpost); se = split(pre, post)
t = time.perf_counter(); run(sc, 3, 100); print("compile s", time.perf_counter() - t)
for r in range(3):
    te, xe = run(se, 30, 100)
    tc, xc = run(sc, 30, 100)
    print(f"split eager {te:.2f} ms/step  compiled {tc:.2f}")

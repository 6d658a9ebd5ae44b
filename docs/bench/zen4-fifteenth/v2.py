import time, torch, torch.nn.functional as F, sys
exec(open('docs/bench/zen4-fifteenth/compile_attn.py').read().split("comp = torch.compile")[0])
def pre(x, ln1, wqkv, bqkv, cos, sin):
    xn = ln1 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    qkv = torch.addmv(bqkv, wqkv, xn[0]).view(1, h + 2 * g, d)
    qk = qkv[:, :h + g]
    qk = qk * cos + rotate_half(qk) * sin
    return qk[:, :h], qk[:, h:], qkv[:, h + g:]
def post(x, o, wo, ln2, router):
    x = x + torch.mv(wo, o)
    m = ln2 * F.rms_norm(x, x.shape[-1:], eps=1e-6)
    probs = torch.softmax(torch.mv(router, m[0]), dim=-1, dtype=torch.float32)
    w, e = torch.topk(probs, A)
    return x, m, e, (w / w.sum()).to(dt)
cpre, cpost = torch.compile(pre, dynamic=True), torch.compile(post, dynamic=True)
def split(fpre, fpost):
    def f(x, ln1, wqkv, bqkv, wo, ln2, router, cos, sin, Kl, Vl, start):
        q, k, v = fpre(x, ln1, wqkv, bqkv, cos, sin)
        Kl[:, start:start + 1] = k.transpose(0, 1)
        Vl[:, start:start + 1] = v.transpose(0, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], Kl[None, :, :start + 1], Vl[None, :, :start + 1])
        return fpost(x, o[0].transpose(0, 1).reshape(h * d), wo, ln2, router)
    return f
full = torch.compile(block, dynamic=True)
V_ = {"eager": block, "full": full, "split": split(cpre, cpost)}
for n, f in V_.items(): run(f, 3, 100)
triv = torch.compile(lambda a: a + 1, dynamic=True); a = torch.randn(512, dtype=dt)
for _ in range(100): triv(a)
t = time.perf_counter()
for _ in range(5000): triv(a)
print("trivial compiled call us", (time.perf_counter() - t) / 5000 * 1e6)
t = time.perf_counter()
for _ in range(5000): a + 1
print("trivial eager call us", (time.perf_counter() - t) / 5000 * 1e6)
for r in range(3):
    print(" ".join(f"{n} {run(f, 30, 100)[0]:.2f}" for n, f in V_.items()), flush=True)
# fp32 exactness of one layer
W32 = {k: v.float() for k, v in W[0].items()}
K32, V32 = K[0].float().clone(), V[0].float().clone()
x = torch.randn(1, H)
f = pos = 100; fr = pos * inv; emb = torch.cat((fr, fr)); cos, sin = emb.cos()[None, None], emb.sin()[None, None]
args = lambda: (x, W32['ln1'], W32['wqkv'], W32['bqkv'], W32['wo'], W32['ln2'], W32['router'], cos, sin, K32.clone(), V32.clone(), pos)
fc = torch.compile(block, dynamic=True)
re, rc = block(*args()), fc(*args())
print("fp32 maxdiff x", (re[0] - rc[0]).abs().max().item(), "m", (re[1] - rc[1]).abs().max().item(), "experts equal", torch.equal(re[2], rc[2]))

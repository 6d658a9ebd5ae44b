import time, torch, torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)
g, d, B, cap = 4, 128, 6, 512
dt = torch.bfloat16
lens = [120, 140, 160, 180, 200, 220]
caches = [(torch.randn(g, cap, d, dtype=dt), torch.randn(g, cap, d, dtype=dt)) for _ in lens]
q = torch.randn(B, g, d, dtype=dt)
def per_seq():
    outs = []
    for i, S in enumerate(lens):
        K, V = caches[i][0][:, :S], caches[i][1][:, :S]
        o = F.scaled_dot_product_attention(q[i][None, :, None], K[None], V[None])
        outs.append(o[0, :, 0])
    return torch.stack(outs)
def batched():
    Smax = max(lens)
    K = torch.stack([c[0][:, :Smax] for c in caches])  # [B, g, Smax, d]
    V = torch.stack([c[1][:, :Smax] for c in caches])
    mask = torch.arange(Smax)[None, :] < torch.tensor(lens)[:, None]  # [B, Smax]
    o = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=mask[:, None, None, :])
    return o[:, :, 0]
def manual():
    Smax = max(lens)
    K = torch.stack([c[0][:, :Smax] for c in caches])
    V = torch.stack([c[1][:, :Smax] for c in caches])
    mask = torch.arange(Smax)[None, :] >= torch.tensor(lens)[:, None]
    s = torch.matmul(q[:, :, None].float(), K.float().transpose(-1, -2)) * d ** -0.5  # [B,g,1,S]
    s.masked_fill_(mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), V.float()).to(dt)[:, :, 0]
for f in (per_seq, batched, manual):
    for _ in range(20): f()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(100): f()
        ts.append((time.perf_counter() - t) / 100 * 1e6)
    print(f.__name__, " ".join(f"{x:.0f}" for x in ts), "us per 6 seqs")
a, b, c = per_seq(), batched(), manual()
print("batched==per_seq", torch.equal(a, b), (a.float()-b.float()).abs().max().item(), "manual", torch.equal(a, c), (a.float()-c.float()).abs().max().item())

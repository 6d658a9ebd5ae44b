import time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.set_num_threads(1)
dt = torch.bfloat16
torch.manual_seed(0)
cases = [(torch.randn(1, 4, 1, 128, dtype=dt), torch.randn(1, 4, S, 128, dtype=dt), torch.randn(1, 4, S, 128, dtype=dt)) for S in range(120, 220, 4)]
def manual(q, K, V):
    s = (q.float() @ K.float().transpose(-1, -2)) * (128 ** -0.5)
    return (torch.softmax(s, -1) @ V.float()).to(dt)
def math(q, K, V):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, K, V)
def flash(q, K, V):
    return F.scaled_dot_product_attention(q, K, V)
for name, f in (("flash", flash), ("math", math), ("manual32", manual)):
    for c in cases: f(*c)
    t = time.perf_counter()
    for _ in range(40):
        for c in cases: f(*c)
    print(name, f"{(time.perf_counter() - t) / 40 / len(cases) * 1e6:.0f} us")
neq_m = sum(not torch.equal(flash(*c), math(*c)) for c in cases)
neq_x = sum(not torch.equal(flash(*c), manual(*c)) for c in cases)
maxd = max((flash(*c).float() - manual(*c).float()).abs().max().item() for c in cases)
print("differs from flash: math", neq_m, "manual32", neq_x, "of", len(cases), "max diff", maxd)

import time, torch, sys, cProfile, pstats
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from faasmoe.control.deployment import Deployment
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions import wire
specs = Deployment.plan(Checkpoint("/work/main/models/qwen-quarter"), 1, "bfloat16").specs
fns = [ExpertFunction(s, compiled=True) for s in specs[:96]]
for f in fns[:1]: f.warm_up(max_rows=2)
g = torch.Generator().manual_seed(0)
frames = []
for f in fns:
    inv = wire.Invocation(f.digest, f.spec.layer, f.spec.block, torch.randn(1, 512, generator=g).to(torch.bfloat16),
                          torch.zeros(1, dtype=torch.int32), torch.tensor([f.spec.experts[0]], dtype=torch.int32), torch.rand(1, generator=g))
    frames.append(wire.encode_invocation(inv))
def run():
    for f, fr in zip(fns, frames): f.handle(fr)
def compute_only():
    for f, fr in zip(fns, frames):
        h, hidden, token, expert, weight = wire.decode_invocation_parts(fr)
        local = f.check(h, expert)
        with torch.inference_mode():
            f._one_token(hidden, local, weight)
run(); compute_only()
for r in range(3):
    t = time.perf_counter(); run(); a = (time.perf_counter() - t) / len(fns) * 1e6
    t = time.perf_counter(); compute_only(); b = (time.perf_counter() - t) / len(fns) * 1e6
    print(f"handle {a:.0f} us, decode+check+compute {b:.0f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(5): run()
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(14)

import time, torch, faasmoe
from faasmoe.control.sequence import SamplingParams
from faasmoe.platforms import PlatformConfig
e = faasmoe.load("models/qwen-quarter", experts_per_function=4, prewarm=True, platform_config=PlatformConfig(compile_experts=True))
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(e.config.vocab_size, (128,), generator=g).tolist() for _ in range(6)]
seqs = [e.new_sequence(p, SamplingParams(40, ignore_eos=True)) for p in prompts]
e.step(seqs)
for _ in range(4): e.step(seqs)
c0 = time.process_time(); t0 = time.perf_counter()
for _ in range(8): e.step(seqs)
print(f"step {(time.perf_counter()-t0)/8*1000:.1f} ms wall, CP CPU {(time.process_time()-c0)/8*1000:.1f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
    for _ in range(8): e.step(seqs)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
e.close()

import sys, time, torch
from faasmoe.control.sequence import SamplingParams
from faasmoe.engines.monolithic import MonolithicEngine
e = MonolithicEngine("models/qwen-quarter")
s = [e.new_sequence(e.encode("The quick brown fox jumps over the lazy dog"), SamplingParams(60, ignore_eos=True))]
for _ in range(10): e.step(s)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
    for _ in range(10): e.step(s)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

import os, sys, time, torch, faasmoe
from faasmoe.platforms import PlatformConfig
e = faasmoe.load("models/qwen-quarter", experts_per_function=60, prewarm=True, platform_config=PlatformConfig(compile_experts=True))
ids = e.encode("The quick brown fox jumps over the lazy dog and keeps running")
e.generate(ids, max_tokens=16)
print("ready", flush=True)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < float(sys.argv[1]):
    e.generate(ids, max_tokens=64); n += 64
print(f"{(time.perf_counter() - t) / n * 1e3:.1f} ms/token incl. prefill", flush=True)
e.close()

import faasmoe
from faasmoe.platforms import PlatformConfig
m = "/tmp/s16/tiny-bf16"
outs = {}
for name, kw in [("local-eager", dict()), ("ray-compiled", dict(platform="ray", platform_config=PlatformConfig(compile_experts=True))),
                 ("local-compiled", dict(platform_config=PlatformConfig(compile_experts=True)))]:
    with faasmoe.load(m, experts_per_function=2, **kw) as e:
        ids = e.encode("The capital of France is Paris. The capital of Germany is")
        outs[name] = e.generate(ids, max_tokens=16).token_ids
    print(name, outs[name], flush=True)
print("equal:", len({tuple(v) for v in outs.values()}) == 1)

"""A/B: monolithic decode with one-row bf16 products through compiled mv (unpacked) vs packed. argv: mode steps rounds"""
import os, sys, time, torch
sys.path.insert(0, "/work/main")
mode = sys.argv[1]
import faasmoe.models.kernels as kn
if mode == "compiled":
    import torch._dynamo.config as dc, torch._inductor.config as ic
    dc.recompile_limit = 64; dc.cache_size_limit = 64
    ic.emulate_precision_casts = True
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/faasmoe/inductor"))
    mv = torch.compile(lambda w, v: torch.mv(w, v), dynamic=False)
    addmv = torch.compile(lambda b, w, v: torch.addmv(b, w, v), dynamic=False)
    kn.pack = lambda w: w
    def _mv(v, w, b):
        if v.dtype != torch.bfloat16 or isinstance(w, kn.Int8Weight) or not w.is_contiguous():
            return None
        return mv(w, v) if b is None else addmv(b, w, v)
    kn._matrix_vector = _mv
from faasmoe.control.sequence import SamplingParams
from faasmoe.engines.monolithic import MonolithicEngine
steps, rounds = int(sys.argv[2]), int(sys.argv[3])
engine = MonolithicEngine("/work/main/models/qwen-quarter")
prompts = [engine.encode("The quick brown fox jumps over the lazy dog and keeps running")]
times = []
for r in range(rounds + 1):
    seqs = [engine.new_sequence(p, SamplingParams(steps + 1, ignore_eos=True)) for p in prompts]
    engine.step(seqs)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(seqs)
    times.append((time.perf_counter() - t0) / steps * 1000)
print(mode, " ".join(f"{t:.1f}" for t in times[1:]), "tokens", hash(tuple(tuple(s.output_ids) for s in seqs)) % 10000, seqs[0].output_ids[:12], flush=True)
engine.close()

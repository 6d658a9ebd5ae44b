"""A/B of the two-halves decode step in one code version: MODEL K SEQUENCES STEPS ROUNDS PROMPT_TOKENS HALVES(1/0).
Prints ms a step (the control plane's wait in combine, its process CPU), a hash of the tokens and the hosts."""
import sys, time, torch, faasmoe
from faasmoe.control.sequence import SamplingParams
model, k, nseq, steps, rounds, plen, halves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
engine = faasmoe.load(model, experts_per_function=k, prewarm=True)
engine.dispatcher.two_batches = bool(halves)
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(engine.config.vocab_size, (plen,), generator=gen).tolist() for _ in range(nseq)]
times = []
for _ in range(rounds):
    seqs = [engine.new_sequence(p, SamplingParams(steps + 1, ignore_eos=True)) for p in prompts]
    engine.step(seqs)
    w0 = engine.dispatcher.stats.wait_s
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(seqs)
    dt = time.perf_counter() - t0
    times.append((dt / steps * 1000, (engine.dispatcher.stats.wait_s - w0) / steps * 1000, (time.process_time() - c0) / steps * 1000))
ids = hash(tuple(tuple(s.output_ids) for s in seqs)) % 10000
print(f"k={k} nseq={nseq} halves={halves}: " + " ".join(f"{t:.1f}(wait {w:.1f}, cp-cpu {c:.1f})" for t, w, c in times), "tokens", ids, "hosts", len(engine.platform.hosts()), flush=True)
engine.close()

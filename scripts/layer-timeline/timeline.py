"""A timeline of one MoE layer across the control plane and its host: the median time of each phase after the
control plane starts the layer's send (docs/benchmarks.md, section 5, "Tenth session").

    PYTHONPATH=scripts/layer-timeline .venv/bin/python scripts/layer-timeline/timeline.py MODEL K [STEPS] [--fine]

The control plane's phases are stamped here (wrapping the dispatcher, the shared expert and the platform's
socket calls), the host's by the `sitecustomize` next to this file, which the zygote and its hosts load through
PYTHONPATH. One request, greedy, STEPS decode steps (default 16) after two warm ones; the first of each
phase in a layer counts (at k = 1 a host runs several calls a layer: their later phases are not shown).
Stamps cost 3-5 us each; compare phases, not the step time, with untraced runs. --fine stamps the control plane's
side in more detail too (the platform's grouping, planning, sending and accounting, the wire's frames).
FAASMOE_COMPILE_EXPERTS=1: the hosts compute their experts as inductor-compiled code (`compile_experts`)."""

from __future__ import annotations

import collections
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    hook = getattr(sys.modules.get("sitecustomize"), "__file__", "") or ""
    fine = "--fine" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--fine"]
    if os.path.dirname(os.path.abspath(hook)) != here or len(sys.argv) < 3:
        sys.exit(__doc__)
    own_directory = "FAASMOE_TIMELINE_DIR" not in os.environ  # else the caller's, kept
    directory = os.environ.setdefault("FAASMOE_TIMELINE_DIR", tempfile.mkdtemp(prefix="faasmoe-timeline-"))

    import faasmoe
    import faasmoe.platforms.local.platform as platform_module
    from faasmoe.control.sequence import SamplingParams

    model, k = sys.argv[1], int(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    compiled = os.environ.get("FAASMOE_COMPILE_EXPERTS") == "1"  # the hosts' experts compiled
    engine = faasmoe.load(model, experts_per_function=k, prewarm=True,
                          platform_config=faasmoe.platforms.PlatformConfig(compile_experts=compiled))
    stamps: list[tuple[str, float]] = []

    def around(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def stamped(*args, **kwargs):
            stamps.append((phase, time.perf_counter()))
            result = inner(*args, **kwargs)
            stamps.append((phase + "_done", time.perf_counter()))
            return result

        setattr(owner, name, stamped)

    around(platform_module, "send_frame", "cp_sendmsg")
    around(platform_module, "recv_frame", "cp_recv")
    around(engine.control_plane.dispatcher, "send", "send")
    around(engine.control_plane, "shared", "shared")
    if fine:
        import faasmoe.control.dispatch as dispatch_module
        import faasmoe.platforms.local.protocol as protocol_module

        for name in ("_groups", "_dispatch", "_plan", "_send", "_finish", "gather"):
            around(engine.platform, name, "p" + name)
        around(protocol_module, "encode_request", "encode_request")
        around(protocol_module, "decode_reply", "decode_reply")
        around(dispatch_module.wire, "encode_invocation_raw", "encode_frame")
        around(dispatch_module.wire, "decode_result", "decode_result")
    around(engine.control_plane.dispatcher, "combine", "combine")
    try:
        seq = engine.new_sequence(engine.encode("The quick brown fox jumps over the lazy dog and keeps running"),
                                  SamplingParams(steps + 2, ignore_eos=True))
        engine.step([seq])
        engine.step([seq])
        stamps.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step([seq])
        wall = time.perf_counter() - start
    finally:
        engine.close()
    for path in glob.glob(f"{directory}/host-*.log"):
        with open(path) as f:
            stamps += [(phase, float(t)) for phase, t in (line.split() for line in f) if float(t) >= start]
    if own_directory:
        shutil.rmtree(directory, ignore_errors=True)
    after = collections.defaultdict(list)
    layer: dict[str, float] | None = None
    for phase, t in sorted(stamps, key=lambda s: s[1]):
        if phase == "send":
            layer = {"send": t}
        elif layer is not None:
            layer.setdefault(phase, t)
            if phase == "combine_done":
                for p, when in layer.items():
                    after[p].append((when - layer["send"]) * 1e6)
                layer = None
    print(f"k = {k}: {1000 * wall / steps:.1f} ms a step (traced), {len(after['send'])} layers; "
          f"median us after the layer's send starts:")
    for phase in sorted(after, key=lambda p: statistics.median(after[p])):
        print(f"  {statistics.median(after[phase]):8.0f}  {phase}")

"""decode-steps with the control plane pinned to CPU 0 and its zygote/hosts to CPU 1 (argv[1] == 'pin') or not."""
import os, runpy, sys
mode = sys.argv.pop(1)
if mode == "pin":
    import psutil
    import faasmoe
    real_load = faasmoe.load
    def load(*a, **kw):
        engine = real_load(*a, **kw)
        me = psutil.Process()
        for child in me.children(recursive=True):
            os.sched_setaffinity(child.pid, {1})
        for t in me.threads():
            os.sched_setaffinity(t.id, {0})
        print("pinned", len(me.children(recursive=True)), "children,", len(me.threads()), "threads", flush=True)
        return engine
    faasmoe.load = load
sys.argv[0] = "scripts/decode-steps.py"
runpy.run_path("scripts/decode-steps.py", run_name="__main__")

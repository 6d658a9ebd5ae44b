"""decode-steps with halves forced off (argv[1] == 'whole') or left as is ('halves'); rest as decode-steps."""
import runpy, sys
mode = sys.argv.pop(1)
if mode == "whole":
    from faasmoe.models.control_plane import ControlPlane
    ControlPlane._in_halves = lambda self, chunks: False
sys.argv[0] = "scripts/decode-steps.py"
runpy.run_path("scripts/decode-steps.py", run_name="__main__")

"""The multi-tenant bench's defaults, full and --quick: one home, read by the bench and by the CLI's help."""

from __future__ import annotations

# full: the quarter preset at four rates with the keep-alive sweep; --quick: a tiny model, one short on/off
# load and a short keep-alive (minutes, evictions included)
DEFAULTS: dict[bool, dict] = {
    False: {"model": "models/qwen-quarter", "preset": "qwen1.5-moe-a2.7b-quarter", "rates": [0.01, 0.02, 0.04, 0.08],
            "burst_on_s": 10.0, "burst_off_s": 20.0, "duration_s": 120.0, "prompt_tokens": (32, 128),
            "output_tokens": (32, 64), "experts_per_function": 4, "keep_alive_s": 10.0,
            "keep_alive_sweep": [2.0, 10.0, 60.0]},
    True: {"model": "models/bench-tiny", "preset": "tiny", "rates": [0.5], "burst_on_s": 3.0, "burst_off_s": 3.0,
           "duration_s": 12.0, "prompt_tokens": (8, 32), "output_tokens": (8, 16), "experts_per_function": 2,
           "keep_alive_s": 2.0, "keep_alive_sweep": []},
}


def describe(name: str) -> str:
    """'<quick> with --quick, else <full>', for --help."""

    def text(v) -> str:
        if isinstance(v, tuple):
            return f"{v[0]}:{v[1]}"
        if isinstance(v, list):
            return " ".join(f"{x:g}" for x in v) if v else "none"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return f"{text(DEFAULTS[True][name])} with --quick, else {text(DEFAULTS[False][name])}"

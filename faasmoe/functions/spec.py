"""A function's identity and everything its instance needs to cold-start (JSON-serialisable).

The platform hands a spec to each new instance, so an instance never parses the
checkpoint: it maps the byte ranges listed here and is ready.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from faasmoe.functions.wire import HEADER_SIZE
from faasmoe.metering.pagecache import evict_ranges
from faasmoe.models.checkpoint import Checkpoint, TensorLocation
from faasmoe.models.weights import torch_dtype

# Token rows one invocation may carry. A function refuses a larger frame before reading it, so a length
# prefix or Content-Length cannot make it allocate more than this allows. Override: FAASMOE_MAX_TOKENS_PER_CALL.
MAX_TOKENS_PER_CALL = 8192
PAIR_BYTES = 12  # per routing pair: token i32, expert i32, weight f32


@dataclass(frozen=True)
class FunctionSpec:
    model: str  # checkpoint digest, 16 hex chars
    layer: int
    block: int
    experts: tuple[int, ...]  # expert ids of this block, ascending
    dtype: str  # torch dtype name the function computes in
    hidden_size: int
    hidden_act: str
    tensors: tuple[TensorLocation, ...] = field(repr=False)  # per expert: gate, up and down projections

    @property
    def id(self) -> str:
        return function_id(self.model, self.layer, self.block)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def ranges(self) -> list[tuple[str, int, int]]:
        """(file, offset, length) of each of its weight tensors."""
        return [(t.file, t.offset, t.nbytes) for t in self.tensors]

    @property
    def shape(self) -> tuple:
        """What its kernels depend on (dtype, sizes, activation): functions of one shape share compiled kernels."""
        return (self.dtype, self.hidden_size, self.hidden_act, len(self.experts),
                tuple(sorted(t.shape for t in self.tensors)))

    def to_json(self) -> dict:
        return {"model": self.model, "layer": self.layer, "block": self.block, "experts": list(self.experts),
                "dtype": self.dtype, "hidden_size": self.hidden_size, "hidden_act": self.hidden_act,
                "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, d: dict) -> "FunctionSpec":
        return cls(d["model"], int(d["layer"]), int(d["block"]), tuple(int(e) for e in d["experts"]), d["dtype"],
                   int(d["hidden_size"]), d["hidden_act"], tuple(TensorLocation.from_json(t) for t in d["tensors"]))


def drop_from_page_cache(specs: Iterable[FunctionSpec]) -> None:
    """Drop the functions' weight bytes from the page cache (advice: pages a live process maps stay)."""
    try:
        evict_ranges(r for spec in specs for r in spec.ranges)
    except OSError:  # a checkpoint file gone: nothing of it left to drop
        pass


def function_id(model: str, layer: int, block: int) -> str:
    return f"{model}.L{layer}.B{block}"


def function_specs(ckpt: Checkpoint, blocks: list[list[int]], dtype: str) -> list[FunctionSpec]:
    """One spec per (MoE layer, block of experts)."""
    c = ckpt.config
    return [FunctionSpec(ckpt.digest, layer, b, tuple(experts), dtype, c.hidden_size, c.hidden_act,
                         tuple(ckpt.expert_tensors(layer, experts)))
            for layer in ckpt.moe_layers() for b, experts in enumerate(blocks)]


def max_tokens_per_call() -> int:
    """The configured token cap per invocation: $FAASMOE_MAX_TOKENS_PER_CALL, else MAX_TOKENS_PER_CALL."""
    value = os.environ.get("FAASMOE_MAX_TOKENS_PER_CALL", "")
    try:
        n = int(value) if value else MAX_TOKENS_PER_CALL
    except ValueError:
        raise ValueError(f"FAASMOE_MAX_TOKENS_PER_CALL={value!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"FAASMOE_MAX_TOKENS_PER_CALL must be at least 1, not {n}")
    return n


def max_frame_bytes(spec: FunctionSpec, max_tokens: int | None = None) -> int:
    """The largest invocation frame `spec`'s function can legally get: the one size rule every transport enforces.

    max_tokens rows of hidden states, each routed to every expert of the block (a token
    names an expert at most once), plus the header.
    """
    tokens = max_tokens_per_call() if max_tokens is None else max_tokens
    row = spec.hidden_size * torch_dtype(spec.dtype).itemsize + PAIR_BYTES * len(spec.experts)
    return HEADER_SIZE + tokens * row

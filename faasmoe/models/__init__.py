"""Model families: reading a checkpoint, mapping its weights, random presets, and each architecture's control plane.

A family is one module holding its control plane (everything but the routed experts); the
checkpoint's `model_type` picks it. Families are imported on first use, so an expert function,
which needs only `layers`, `kernels` and `weights`, never loads a control plane.
"""

from __future__ import annotations

import pkgutil

# model_type in config.json -> "module:control-plane class"
FAMILIES: dict[str, str] = {
    "qwen2_moe": "faasmoe.models.qwen2_moe:ControlPlane",
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def control_plane_class(config) -> type:
    """The control-plane class of a checkpoint's family (opening the `Checkpoint` refused any other)."""
    return pkgutil.resolve_name(FAMILIES[config.model_type])

"""Model families: reading a checkpoint, mapping its weights, random presets, and each architecture's control plane.

A family is one module holding its layout (a `Family`: tensor names, MoE layers) and its control
plane (everything but the routed experts); the checkpoint's `model_type` picks it. Families are
imported on first use, so an expert function, which needs only `layers`, `kernels` and `weights`,
never loads one.
"""

from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from faasmoe.models.family import Family

# model_type in config.json -> "module:Family subclass"; the module also defines its ControlPlane
FAMILIES: dict[str, str] = {
    "qwen2_moe": "faasmoe.models.qwen2_moe:Qwen2Moe",
    "qwen3_moe": "faasmoe.models.qwen3_moe:Qwen3Moe",
    "mixtral": "faasmoe.models.mixtral:Mixtral",
    "olmoe": "faasmoe.models.olmoe:Olmoe",
    "deepseek_v2": "faasmoe.models.deepseek:DeepseekV2",
    "deepseek_v3": "faasmoe.models.deepseek:DeepseekV3",
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_class(model_type: str) -> "type[Family]":
    """The `Family` subclass of a model_type (KeyError for an unsupported one: see `supported`)."""
    return pkgutil.resolve_name(FAMILIES[model_type])

"""FaaS platforms that run expert functions: `local` (embedded default), `http`, `ray`, behind one interface.

A platform is registered here by its name and class; it is imported only when created (Ray, for one,
costs seconds to import).
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

from faasmoe.platforms.base import InvocationError, Platform, PlatformConfig

# name -> "module:class"
REGISTRY: dict[str, str] = {
    "local": "faasmoe.platforms.local.platform:LocalPlatform",
    "http": "faasmoe.platforms.http:HttpPlatform",
    "ray": "faasmoe.platforms.ray:RayPlatform",
}
PLATFORMS = tuple(REGISTRY)


def platform_options(name: str, functions: str | Path | None = None, function_token: str | None = None,
                     ray_address: str | None = None) -> dict:
    """What platform `name` needs besides PlatformConfig, from the user's settings (flags or config file)."""
    if name == "http":
        if not functions:
            raise ValueError("the http platform needs a function manifest (--functions manifest.json, "
                             "written by `faasmoe package`)")
        return {"manifest": functions, "token": function_token}
    if name == "ray":
        return {"address": ray_address}
    return {}


def create_platform(name: str, config: PlatformConfig | None = None, **options) -> Platform:
    """A platform by its name (not started); `options` as `platform_options` makes them."""
    if name not in REGISTRY:
        raise ValueError(f"unknown platform {name!r}; choose one of {', '.join(PLATFORMS)}")
    if config is not None and config.memory_budget is not None and name != "local":
        raise ValueError(f"a memory budget applies to the local platform only, whose functions' weights live on "
                         f"this machine; the {name} platform's live elsewhere")
    return pkgutil.resolve_name(REGISTRY[name])(config or PlatformConfig(), **options)


__all__ = ["InvocationError", "Platform", "PlatformConfig", "PLATFORMS", "create_platform", "platform_options"]

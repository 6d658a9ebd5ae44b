"""FaaS platforms that run expert functions: `local` (embedded default), more behind the same interface."""

from __future__ import annotations

from faasmoe.platforms.base import InvocationError, Platform, PlatformConfig

PLATFORMS = ("local", "http", "ray")


def create_platform(name: str, config: PlatformConfig | None = None, **options) -> Platform:
    """A platform by its CLI name."""
    config = config or PlatformConfig()
    if name == "local":
        from faasmoe.platforms.local import LocalPlatform

        return LocalPlatform(config)
    if name == "http":
        from faasmoe.platforms.http import HttpPlatform

        if not options.get("manifest"):
            raise ValueError("the http platform needs a function manifest (--functions manifest.json, "
                             "written by `faasmoe package`)")
        return HttpPlatform(config, manifest=options["manifest"], token=options.get("token"))
    if name == "ray":
        from faasmoe.platforms.ray import RayPlatform

        return RayPlatform(config, address=options.get("address"))
    if name == "gateway":  # internal: a private-mode orchestrator reaching the server's platform
        from faasmoe.platforms.gateway import GatewayPlatform

        return GatewayPlatform(config, address=options["address"])
    raise ValueError(f"unknown platform {name!r}; choose one of {', '.join(PLATFORMS)}")


__all__ = ["InvocationError", "Platform", "PlatformConfig", "PLATFORMS", "create_platform"]

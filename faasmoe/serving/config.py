"""Server configuration: one validated object, from a TOML/YAML file and command-line flags.

Example (`faasmoe.toml`):

    model = "models/tiny"
    mode = "shared"            # or "private"
    platform = "local"
    experts_per_function = 2
    keep_alive_s = 30

    [[tenants]]
    name = "alice"
    key = "sk-alice"
    max_concurrency = 4
    tokens_per_minute = 20000
"""

from __future__ import annotations

import secrets
import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from faasmoe.platforms import PlatformConfig


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="shown in usage and metrics")
    key: str = Field(min_length=8, description="the tenant's API key (Authorization: Bearer ...)")
    max_concurrency: int = Field(4, ge=1, description="requests in flight at once; more get 429")
    tokens_per_minute: int = Field(60_000, ge=1, description="prompt + completion tokens per minute; more get 429")
    max_queued: int = Field(16, ge=0, description="requests waiting for a batch slot; more get 429")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path = Path("models/tiny")
    model_name: str | None = Field(None, description="the id clients pass as `model` (default: the directory name)")
    preset: str = Field("tiny", description="what to create at `model` if it is missing")
    preset_layers: int | None = None
    mode: Literal["shared", "private", "monolithic"] = "shared"
    platform: str = "local"
    functions: Path | None = Field(None, description="http platform: the manifest `faasmoe package` wrote")
    function_token: str | None = Field(None, description="http platform: X-Faasmoe-Token sent to functions")
    ray_address: str | None = Field(None, description="ray platform: a cluster to join (default: start a local one)")
    experts_per_function: int = Field(1, ge=1)
    keep_alive_s: float = Field(30.0, ge=0)
    max_instances: int = Field(4, ge=1)
    invoke_timeout_s: float = Field(60.0, gt=0)
    cold_start_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0)
    prewarm: bool = False
    dtype: str | None = None
    max_batch: int = Field(16, ge=1, description="sequences stepped together")
    max_queue: int = Field(64, ge=0, description="requests waiting across all tenants; more get 429")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(600.0, gt=0, description="a request running longer fails with 504")
    max_prompt_chars: int = Field(131_072, ge=1, description="longer prompts (in characters) get 400 before tokenizing")
    max_connections: int = Field(512, ge=1, description="open connections at most; more get 503")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that sends no complete request headers "
                                                            "within this time is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not received within this time gets 408")
    admin_key: str | None = Field(None, description="guards /metrics; generated and printed if unset")
    meter_interval_s: float = Field(2.0, gt=0, description="how often every process's CPU and memory is sampled")
    tenants: list[TenantConfig] = Field(default_factory=list)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        names = [t.name for t in tenants]
        keys = [t.key for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if len(set(keys)) != len(keys):
            raise ValueError("tenant keys must be unique")
        return tenants

    @model_validator(mode="after")
    def _defaults(self) -> "ServerConfig":
        if not self.tenants:  # a quick start: one tenant with a fresh key, printed at start-up
            self.tenants = [TenantConfig(name="default", key="sk-" + secrets.token_hex(16))]
        if self.admin_key is None:
            self.admin_key = "sk-admin-" + secrets.token_hex(16)
        if self.admin_key in {t.key for t in self.tenants}:
            raise ValueError("admin_key must differ from every tenant key")
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.name

    def platform_options(self) -> dict:
        """What the chosen platform needs besides PlatformConfig."""
        if self.platform == "http":
            return {"manifest": self.functions, "token": self.function_token}
        if self.platform == "ray":
            return {"address": self.ray_address}
        return {}

    def platform_config(self) -> PlatformConfig:
        return PlatformConfig(keep_alive_s=self.keep_alive_s, max_instances=self.max_instances,
                              invoke_timeout_s=self.invoke_timeout_s, cold_start_timeout_s=self.cold_start_timeout_s,
                              max_retries=self.max_retries)


def load_config(path: Path | None, **overrides) -> ServerConfig:
    """The config file (TOML or YAML) with command-line overrides on top (None means 'not given')."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = tomllib.loads(text) if Path(path).suffix == ".toml" else (yaml.safe_load(text) or {})
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a table of settings")
    for key, value in overrides.items():
        if value is not None and value != []:
            data[key] = value
    return ServerConfig(**data)

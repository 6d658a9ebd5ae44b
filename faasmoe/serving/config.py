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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from faasmoe.platforms import PlatformConfig, platform_options


class ConfigError(ValueError):
    """An invalid configuration, described without echoing any value (a value may be a key)."""


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
    scaling: PlatformConfig = Field(default_factory=PlatformConfig, description="the function pool's scaling and "
                                    "fault settings; in a file, as a [scaling] table or as top-level keys")
    prewarm: bool = False
    monolithic_weights: Literal["copy", "mapped"] = Field(
        "copy", description="monolithic mode: copy the weights into the server (as transformers loads them), or "
                            "map them from the page cache, read on use and dropped by the kernel under memory "
                            "pressure (as llama.cpp's mmap; the way to try a model larger than memory)")
    prefetch_layers: int = Field(0, ge=0, description="warm the functions a layer this many ahead is predicted to "
                                                      "call (0: off)")
    dtype: str | None = None
    threads: int | None = Field(None, ge=1, description="torch threads of the control plane, or of the monolithic "
                                                       "model (default: half the cores for a control plane whose "
                                                       "functions run on this machine, except for its lm_head, "
                                                       "which takes every core; else one per core); in private "
                                                       "mode, of each tenant's control plane")
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
    admin_key: str | None = Field(None, min_length=8, description="guards /metrics; generated and printed if unset")
    meter_interval_s: float = Field(2.0, gt=0, description="how often every process's CPU and memory is sampled")
    tenants: list[TenantConfig] = Field(default_factory=list, description="not given: one 'default' tenant with a "
                                                                          "generated key; given, at least one")
    _generated: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="before")
    @classmethod
    def _scaling_keys(cls, data: Any) -> Any:
        return nest_scaling(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _tenants_given_empty(cls, data: Any) -> Any:
        """Tenants not given is a quick start (one tenant, fresh key); an empty list given is a mistake that
        would otherwise open a server on a key nobody chose."""
        if isinstance(data, dict) and "tenants" in data:
            if data["tenants"] is None:
                data = {k: v for k, v in data.items() if k != "tenants"}
            elif isinstance(data["tenants"], (list, tuple)) and not data["tenants"]:
                raise ValueError("tenants is empty: list at least one tenant, or leave tenants out for one "
                                 "'default' tenant with a generated key")
        return data

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
        if not self.tenants:  # not given (see above): one tenant with a fresh key, printed at start-up
            self.tenants = [TenantConfig(name="default", key="sk-" + secrets.token_hex(16))]
            self._generated.add("tenant:default")
        if self.admin_key is None:
            self.admin_key = "sk-admin-" + secrets.token_hex(16)
            self._generated.add("admin_key")
        if self.admin_key in {t.key for t in self.tenants}:
            raise ValueError("admin_key must differ from every tenant key")
        if self.scaling.memory_budget is not None and self.platform != "local":
            raise ValueError(f"memory_budget applies to the local platform only (the {self.platform} platform's "
                             "functions hold their weights elsewhere)")
        return self

    def key_generated(self, what: str) -> bool:
        """Whether a key was generated here (so only the start-up banner can tell it): 'admin_key' or
        'tenant:NAME'."""
        return what in self._generated

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model.name

    def platform_options(self) -> dict:
        """What the chosen platform needs besides PlatformConfig."""
        return platform_options(self.platform, self.functions, self.function_token, self.ray_address)



def nest_scaling(data: dict) -> dict:
    """Scaling settings given as top-level keys (`keep_alive_s = 10`, as config files and flags have them) go
    into `scaling`; a key given both ways is an error."""
    flat = {k: data[k] for k in PlatformConfig.model_fields if k in data}
    if not flat:
        return data
    nested = data.get("scaling") or {}
    nested = nested.model_dump(exclude_unset=True) if isinstance(nested, PlatformConfig) else dict(nested)
    both = sorted(set(flat) & set(nested))
    if both:
        raise ValueError(f"{', '.join(both)} given both at the top level and in [scaling]")
    return {**{k: v for k, v in data.items() if k not in flat}, "scaling": {**nested, **flat}}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (as in TOML), not a silent
    'last one wins' that can leave a limit or a key other than the one read first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> dict:
    """A config file as a dict; a syntax error names the place, never the text there (it may be a key)."""
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.load(text, Loader=_UniqueKeyLoader) or {})
    except tomllib.TOMLDecodeError as e:  # its message is a description and a position, no content
        raise ConfigError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: {e.problem or e.context or 'not valid YAML'}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return data


def describe_errors(error: ValidationError) -> str:
    """A validation error as 'field: problem' lines, without the input values pydantic would echo."""
    lines = []
    for err in error.errors(include_input=False, include_url=False, include_context=False):
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)


def load_config(path: Path | None, *, default_key: str | None = None,
                tenant_limits: dict[str, int | None] | None = None, **overrides: Any) -> ServerConfig:
    """The config file (TOML or YAML) with overrides on top (None means 'not given'). `default_key` is the
    key of the quick-start 'default' tenant (used only when no tenants are given); `tenant_limits`
    (max_concurrency, tokens_per_minute, max_queued) override every tenant's. Raises ConfigError, whose
    message never contains a value from the file or the overrides."""
    data: dict = _read(Path(path)) if path is not None else {}
    try:
        data = nest_scaling(data)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key, value in overrides.items():
        if value is not None:
            if key in PlatformConfig.model_fields:  # a flag overrides the file's setting, wherever it was
                data["scaling"] = {**(data.get("scaling") or {}), key: value}
            else:
                data[key] = value
    if default_key is not None and data.get("tenants") is None:
        data["tenants"] = [{"name": "default", "key": default_key}]
    try:
        config = ServerConfig(**data)
        limits = {k: v for k, v in (tenant_limits or {}).items() if v is not None}
        if limits:
            config.tenants = [TenantConfig(**{**t.model_dump(), **limits}) for t in config.tenants]
    except ValidationError as e:
        raise ConfigError(describe_errors(e)) from None
    return config

"""Server configuration from files and flags: validated once, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from faasmoe.serving.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_in_the_repository_loads():
    c = load_config(ROOT / "faasmoe.example.toml")
    assert c.mode == "shared" and [t.name for t in c.tenants] == ["alice", "bob"]
    assert c.tenants[1].tokens_per_minute == 20000 and c.platform_config().keep_alive_s == 30


def test_yaml_and_flag_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: private\nkeep_alive_s: 5\ntenants:\n  - {name: a, key: sk-aaaaaaaa}\n")
    c = load_config(f, keep_alive_s=9.0, port=None)
    assert c.mode == "private" and c.keep_alive_s == 9.0 and c.port == 8000 and c.tenants[0].name == "a"


def test_without_tenants_one_default_tenant_and_keys_are_generated():
    c = load_config(None)
    assert [t.name for t in c.tenants] == ["default"] and c.tenants[0].key.startswith("sk-")
    assert c.admin_key and c.admin_key != c.tenants[0].key


@pytest.mark.parametrize("bad", [
    {"mode": "both"}, {"keep_alive_s": -1}, {"experts_per_function": 0}, {"unknown_field": 1},
    {"tenants": [{"name": "a", "key": "sk-same-key"}, {"name": "b", "key": "sk-same-key"}]},
    {"tenants": [{"name": "a b", "key": "sk-aaaaaaaa"}]}, {"tenants": [{"name": "a", "key": "short"}]},
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        load_config(None, **bad)

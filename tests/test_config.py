"""Server configuration from files and flags: validated once, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faasmoe.serving.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_in_the_repository_loads():
    c = load_config(ROOT / "faasmoe.example.toml")
    assert c.mode == "shared" and [t.name for t in c.tenants] == ["alice", "bob"]
    assert c.tenants[1].tokens_per_minute == 20000 and c.scaling.keep_alive_s == 30


def test_yaml_and_flag_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: private\nkeep_alive_s: 5\ntenants:\n  - {name: a, key: sk-aaaaaaaa}\n")
    c = load_config(f, keep_alive_s=9.0, port=None)
    assert c.mode == "private" and c.scaling.keep_alive_s == 9.0 and c.port == 8000 and c.tenants[0].name == "a"


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
    with pytest.raises(ConfigError):
        load_config(None, **bad)


# -- refused mistakes, and errors that never echo a key ---------------------------------------------------

SECRET = "sk-SECRET-do-not-print"


def _fields(model) -> set[str]:
    return set(model.model_fields)


def test_example_config_shows_every_field_and_its_commented_lines_are_valid(tmp_path):
    from faasmoe.platforms import PlatformConfig
    from faasmoe.serving.config import ServerConfig, TenantConfig

    text = (ROOT / "faasmoe.example.toml").read_text()
    named = set(re.findall(r"^#? ?(\w+) = ", text, flags=re.M))
    assert _fields(ServerConfig) - {"tenants", "scaling"} <= named, "faasmoe.example.toml misses a config field"
    assert _fields(PlatformConfig) <= named, "faasmoe.example.toml misses a scaling field"
    assert _fields(TenantConfig) <= named
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)  # every optional line switched on
    f = tmp_path / "all.toml"
    f.write_text(uncommented)
    c = load_config(f)
    assert c.model_name == "tiny" and c.max_connections == 512 and c.tenants[1].max_queued == 16


def test_without_tenants_the_default_tenant_takes_the_given_key_and_limits():
    c = load_config(None, default_key="sk-my-key-123", tenant_limits={"max_concurrency": 64, "max_queued": None})
    assert [(t.name, t.key, t.max_concurrency, t.max_queued) for t in c.tenants] == [("default", "sk-my-key-123", 64, 16)]
    assert not c.key_generated("tenant:default") and c.key_generated("admin_key")
    assert load_config(None).key_generated("tenant:default")


def test_tenant_limits_apply_to_every_tenant_and_the_default_key_only_without_tenants():
    c = load_config(ROOT / "faasmoe.example.toml", default_key="sk-unused-key", tenant_limits={"tokens_per_minute": 7})
    assert [t.tokens_per_minute for t in c.tenants] == [7, 7] and "sk-unused-key" not in {t.key for t in c.tenants}
    assert not c.key_generated("admin_key")


@pytest.mark.parametrize("text", ["tenants = []\n", "tenants:\n", "tenants: []\n"])
def test_tenants_given_empty_is_refused_not_replaced_by_a_generated_one(tmp_path, text):
    f = tmp_path / ("c.toml" if "=" in text else "c.yaml")
    f.write_text(text)
    if text == "tenants:\n":  # YAML null: the same as not given
        assert [t.name for t in load_config(f).tenants] == ["default"]
        return
    with pytest.raises(ConfigError, match="tenants is empty"):
        load_config(f)


@pytest.mark.parametrize("text, key", [
    ("mode: shared\nkeep_alive_s: 5\nmode: private\n", "mode"),
    ("tenants:\n  - name: a\n    key: sk-aaaaaaaa\n    key: sk-bbbbbbbb\n", "key"),
    ("admin_key: sk-admin-1111\nadmin_key: sk-admin-2222\n", "admin_key"),
])
def test_a_yaml_key_given_twice_is_refused_naming_it(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key '{key}'") as e:
        load_config(f)
    assert "sk-" not in str(e.value)


def test_toml_duplicates_are_refused_too(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('mode = "shared"\nmode = "private"\n')
    with pytest.raises(ConfigError):
        load_config(f)


@pytest.mark.parametrize("overrides", [
    {"admin_key": "sk-SEC"},  # too short: an admin key needs 8 characters, as tenant keys do
    {"admin_key": ""},
    {"tenants": [{"name": "a", "key": "sk-SEC"}]},
    {"tenants": [{"name": "a", "key": SECRET, "max_concurrency": 0}]},
    {"tenants": [{"name": "a", "key": SECRET}, {"name": "b", "key": SECRET}]},
    {"tenants": [{"name": "a", "key": SECRET}], "admin_key": SECRET},
    {"tenants": [{"name": "a", "key": SECRET, "extra": SECRET}]},
    {"tenants": [{"name": SECRET + " x", "key": "sk-aaaaaaaa"}]},
    {"admin_key": 12345678901},
    {"port": SECRET}, {"function_token": ["sk-SECRET", 1]},
])
def test_errors_name_the_field_and_never_echo_a_value(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, **overrides)
    message = str(e.value)
    assert "SEC" not in message and "12345678901" not in message, message
    assert message.split(":")[0]  # the field path or the rule


@pytest.mark.parametrize("text", ["admin_key: 'sk-SECRET-abc\n", "tenants: [{name: a, key: sk-SECRET-x\n",
                                  "admin_key: sk-SECRET-x\n\tmode: shared\n"])
def test_yaml_syntax_errors_give_the_place_not_the_text(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="line") as e:
        load_config(f)
    assert "SECRET" not in str(e.value)


def test_toml_syntax_errors_give_the_place_not_the_text(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('admin_key = "sk-SECRET-abc\n')
    with pytest.raises(ConfigError, match="line") as e:
        load_config(f)
    assert "SECRET" not in str(e.value)


def test_scaling_settings_as_a_table_or_top_level_keys_and_flags_override_either(tmp_path):
    """Each scaling default lives in PlatformConfig; files and flags that name them at the top level still work."""
    table = tmp_path / "table.toml"
    table.write_text("[scaling]\nkeep_alive_s = 5\nmax_instances = 2\n")
    c = load_config(table)
    assert (c.scaling.keep_alive_s, c.scaling.max_instances, c.scaling.max_retries) == (5, 2, 2)
    assert load_config(table, keep_alive_s=7.0).scaling.keep_alive_s == 7.0  # a flag wins over the file
    flat = tmp_path / "flat.toml"
    flat.write_text("keep_alive_s = 5\nthreads_per_instance = 2\n")
    assert load_config(flat, max_instances=3).scaling.model_dump(include={"keep_alive_s", "threads_per_instance",
                                                                          "max_instances"}) == \
        {"keep_alive_s": 5, "threads_per_instance": 2, "max_instances": 3}
    both = tmp_path / "both.toml"
    both.write_text("keep_alive_s = 5\n[scaling]\nkeep_alive_s = 6\n")
    with pytest.raises(ConfigError, match="keep_alive_s given both"):
        load_config(both)

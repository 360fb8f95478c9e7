"""Settings: one object from GATE_* variables and flags, validated at start, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from gate.settings import DEV_ID_KEY, Settings, SettingsError


def test_environment_variables_set_fields() -> None:
    s = Settings.from_env(
        {
            "GATE_BUDGET_MS": "12.5",
            "GATE_ALLOW_CLIENT_TIME": "true",
            "GATE_WORKERS": "2",
            "GATE_MODEL_DIR": "/tmp/m",
        }
    )
    assert (s.budget_ms, s.allow_client_time, s.workers, s.model_dir) == (12.5, True, 2, Path("/tmp/m"))


def test_flags_override_environment() -> None:
    s = Settings.from_env({"GATE_BUDGET_MS": "12"}, budget_ms=30.0)
    assert s.budget_ms == 30.0


def test_unparseable_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="GATE_BUDGET_MS"):
        Settings.from_env({"GATE_BUDGET_MS": "fast"})


def test_invalid_values_are_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="budget_ms") as info:
        Settings.from_env({"GATE_BUDGET_MS": "0", "GATE_REDIS_URL": "http://x"})
    assert "redis_url" in str(info.value)


def test_describe_masks_secrets() -> None:
    s = Settings.from_env(
        {"GATE_REDIS_URL": "rediss://:hunter2@db:6379/0", "GATE_ID_HASH_KEY": "a-very-secret-production-key"}
    )
    shown = s.describe()
    assert "hunter2" not in str(shown) and "a-very-secret" not in str(shown)
    assert shown["redis_url"] == "rediss://:***@db:6379/0"
    assert not s.uses_dev_key


def test_dev_key_is_reported() -> None:
    s = Settings.from_env({})
    assert s.uses_dev_key and s.id_hash_key == DEV_ID_KEY
    assert s.describe()["id_hash_key"] == "dev-default"

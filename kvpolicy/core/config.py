"""Pydantic config models and preset loading.

Configs are data, validated once at construction, so a bad ratio fails where the user typed
it rather than halfway through ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

#: where the preset files live: ``configs/`` at the repository root, shipped inside the
#: package as ``kvpolicy/presets`` is not needed because we look in both places.
_PRESET_DIRS = [
    Path(__file__).resolve().parents[2] / "configs",
    Path(__file__).resolve().parents[1] / "presets",
]


class PolicyConfig(BaseModel):
    """Base of every policy's settings; unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def format_validation_error(err: ValidationError, policy_name: str | None) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg} (got {e.get('input')!r})")
    where = f"{policy_name} config" if policy_name else "config"
    return f"invalid {where}: " + "; ".join(parts)


def build_config(
    config_class: type[PolicyConfig],
    config: PolicyConfig | dict | None,
    overrides: dict[str, Any],
    policy_name: str | None = None,
) -> PolicyConfig:
    """Merge ``config`` (model or dict) with keyword overrides and validate once."""
    data: dict[str, Any] = {}
    if isinstance(config, BaseModel):
        if not isinstance(config, config_class):
            raise ConfigError(
                f"{policy_name or 'this policy'} expects a {config_class.__name__}, got {type(config).__name__}"
            )
        data.update(config.model_dump())
    elif isinstance(config, dict):
        data.update(config)
    elif config is not None:
        raise ConfigError(f"config must be a {config_class.__name__} or a dict, got {type(config).__name__}")
    data.update(overrides)
    data.pop("policy", None)
    try:
        return config_class(**data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, policy_name)) from None


def preset_names() -> list[str]:
    names = set()
    for d in _PRESET_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    return sorted(names)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read preset {path}: {err}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse error becomes one clear message
        raise ConfigError(f"cannot parse preset {path}: {err}") from None
    if not isinstance(data, dict) or "policy" not in data:
        raise ConfigError(f"preset {path} must be a mapping with a 'policy' key and the policy's settings")
    return data


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Load a preset by name (``configs/<name>.yaml``) or by path; returns a dict with ``policy``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        return _read_file(path)
    for d in _PRESET_DIRS:
        for suffix in (".yaml", ".yml", ".json"):
            candidate = d / f"{name_or_path}{suffix}"
            if candidate.exists():
                return _read_file(candidate)
    raise ConfigError(
        f"no preset or file named {str(name_or_path)!r}; presets: {', '.join(preset_names()) or '(none)'}"
    )


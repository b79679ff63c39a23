"""Policy and adapter registry: pluggy hooks discovered through entry points.

Third-party packages declare, in their pyproject::

    [project.entry-points."kvpolicy.policies"]
    mypolicy = "my_package.kv"        # a module (or object) with @hookimpl functions

and implement ``kvpolicy_policies()`` returning policy classes (and/or
``kvpolicy_adapters()`` returning adapter instances). Built-ins register exactly this way
through kvpolicy's own entry points, so there is one path for everyone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from .errors import ConfigError, UnknownPolicyError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.base import ModelAdapter
    from .policy import CachePolicy

PROJECT = "kvpolicy"
POLICY_GROUP = "kvpolicy.policies"
ADAPTER_GROUP = "kvpolicy.adapters"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_BUILTIN_PLUGINS = ("kvpolicy.policies", "kvpolicy.adapters")


class KVPolicySpec:
    @hookspec
    def kvpolicy_policies(self) -> list[type[CachePolicy]]:
        """Return the CachePolicy subclasses this plugin provides."""

    @hookspec
    def kvpolicy_adapters(self) -> list[ModelAdapter]:
        """Return the ModelAdapter instances this plugin provides."""


_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, loading every entry point once."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(KVPolicySpec)
        for group in (POLICY_GROUP, ADAPTER_GROUP):
            _load_entry_points(pm, group)
        # Running from a source tree without `pip install -e .`: no entry points exist yet,
        # so register the built-in plugin modules the same way the entry points would.
        for module_name in _BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            if not pm.is_registered(module):
                pm.register(module, name=module_name)
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager, group: str) -> None:
    """Register each entry point of ``group``; one broken plugin warns instead of breaking all."""
    for ep in importlib.metadata.entry_points(group=group):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure of a third-party plugin
            warnings.warn(
                f"kvpolicy plugin {ep.name!r} ({ep.value}) in {group!r} failed to load and is skipped: "
                f"{type(err).__name__}: {err}. Reinstall or uninstall the package that provides it.",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        pm.register(plugin, name=ep.name)


def reload_plugins() -> None:
    """Forget loaded plugins (tests install a plugin and call this to see it)."""
    global _manager
    importlib.invalidate_caches()
    _manager = None


def _policies() -> dict[str, type[CachePolicy]]:
    out: dict[str, type[CachePolicy]] = {}
    for batch in plugin_manager().hook.kvpolicy_policies():
        for cls in batch:
            if cls.name in out and out[cls.name] is not cls:
                raise ConfigError(
                    f"two plugins register a policy named {cls.name!r} ({out[cls.name].__module__} and "
                    f"{cls.__module__}); uninstall one or rename its policy"
                )
            out[cls.name] = cls
    return out


def available_policies() -> list[str]:
    """Names accepted by :func:`make_policy` / :func:`make_cache`."""
    return sorted(_policies())


def policy_class(name: str) -> type[CachePolicy]:
    policies = _policies()
    if name not in policies:
        raise UnknownPolicyError(name, list(policies))
    return policies[name]


def preset_config(name_or_config: Any) -> Any:
    """A preset's settings (a dict with ``policy``) where ``name_or_config`` names a preset or its file and no
    registered policy; else ``name_or_config`` as it is (a policy name, a config, or no preset at all: then
    :func:`make_policy` says what is wrong)."""
    from .config import load_preset

    if not isinstance(name_or_config, (str, Path)) or str(name_or_config) in _policies():
        return name_or_config
    try:
        return load_preset(name_or_config)
    except ConfigError:
        return name_or_config


def make_policy(name_or_config: Any = "full", **overrides: Any) -> CachePolicy:
    """Build a policy from a name, a preset name/path, a config dict or a config model."""
    from .config import PolicyConfig, load_preset

    if isinstance(name_or_config, PolicyConfig):
        cls = _class_for_config(name_or_config)
        return cls(name_or_config, **overrides)
    if isinstance(name_or_config, dict):
        data = dict(name_or_config)
        name = data.pop("policy", None)
        if name is None:
            raise ConfigError("a config dict needs a 'policy' key naming the policy")
        return policy_class(name)(data, **overrides)
    if isinstance(name_or_config, (str, Path)):
        name = str(name_or_config)
        policies = _policies()
        if name in policies:
            return policies[name](**overrides)
        looks_like_file = isinstance(name_or_config, Path) or name.endswith((".yaml", ".yml", ".json"))
        try:
            data = load_preset(name)
        except ConfigError:
            if looks_like_file:
                raise
            if Path(name).is_dir() or "/" in name or "\\" in name:
                raise ConfigError(_not_a_preset_file(name, list(policies))) from None
            raise UnknownPolicyError(name, list(policies)) from None
        return make_policy(data, **overrides)
    raise ConfigError(f"cannot build a policy from {type(name_or_config).__name__}; pass a name, preset or config")


def _not_a_preset_file(name: str, policies: list[str]) -> str:
    """The message for a path that is no preset file: a directory (a model folder, often) or a path without
    a preset suffix. Reported as such rather than as an unknown policy, which would send the user
    looking for a policy named like their folder."""
    what = "a directory" if Path(name).is_dir() else "a path"
    return (
        f"{name!r} looks like {what}, not a policy: make_cache takes a policy name ({', '.join(sorted(policies))}), "
        "a preset name (kvpolicy.preset_names()), a preset file ending in .yaml, .yml or .json with a 'policy' key, "
        "or a config dict or model. A model folder goes to AutoModelForCausalLM.from_pretrained; pass the cache "
        "to its generate"
    )


def _class_for_config(config: Any) -> type[CachePolicy]:
    matches = [cls for cls in _policies().values() if type(config) is cls.config_class]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"no registered policy uses config class {type(config).__name__}")
    names = ", ".join(sorted(cls.name for cls in matches))
    raise ConfigError(
        f"{type(config).__name__} is shared by several policies ({names}); "
        "pass the policy name too: make_cache(name, **settings)"
    )


def _adapters() -> list[ModelAdapter]:
    out: list[ModelAdapter] = []
    for batch in plugin_manager().hook.kvpolicy_adapters():
        out.extend(batch)
    return out


def supported_model_types() -> list[str]:
    return sorted({t for a in _adapters() for t in a.model_types})


def find_adapter(config: Any) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    for adapter in _adapters():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by kvpolicy; supported: {', '.join(supported_model_types())}. "
        "Add an adapter under the 'kvpolicy.adapters' entry-point group (see docs/adding-a-policy.md)."
    )

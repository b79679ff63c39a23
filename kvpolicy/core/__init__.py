"""Core of kvpolicy: the cache, the policy interface, the registry and configs."""

from .cache import PolicyCache, make_cache
from .config import PolicyConfig, load_preset, preset_names
from .errors import CacheMisuseError, ConfigError, KVPolicyError, UnknownPolicyError, UnsupportedModelError
from .policy import CachePolicy, LayerView, Plan, Signals
from .registry import available_policies, hookimpl, make_policy, reload_plugins, supported_model_types

__all__ = [
    "PolicyCache",
    "PolicyConfig",
    "CachePolicy",
    "LayerView",
    "Plan",
    "Signals",
    "available_policies",
    "make_cache",
    "make_policy",
    "reload_plugins",
    "supported_model_types",
    "hookimpl",
    "load_preset",
    "preset_names",
    "KVPolicyError",
    "UnknownPolicyError",
    "ConfigError",
    "UnsupportedModelError",
    "CacheMisuseError",
]

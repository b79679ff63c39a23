"""kvpolicy: pluggable KV-cache compression for Hugging Face transformers.

Pass a cache to ``generate`` and the model keeps only what the policy chooses::

    from kvpolicy import PyramidCache
    model.generate(**inputs, past_key_values=PyramidCache(), max_new_tokens=64)

(transformers >= 5.24 calls the argument ``cache``; ``cache_argument(model)`` gives the name the
installed version expects.)
"""

from .core import (
    CacheMisuseError,
    CachePolicy,
    ConfigError,
    KVPolicyError,
    LayerView,
    Plan,
    PolicyCache,
    PolicyConfig,
    Signals,
    UnknownPolicyError,
    UnsupportedModelError,
    available_policies,
    hookimpl,
    load_preset,
    make_cache,
    make_policy,
    preset_names,
    reload_plugins,
    supported_model_types,
)
from .core.compat import cache_argument
from .generation import prefill
from .policies.conveniences import FullCache, H2OCache, PyramidCache, SnapKVCache, StreamingLLMCache

__version__ = "0.1.0"

__all__ = [
    "PolicyCache",
    "PyramidCache",
    "H2OCache",
    "FullCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "CachePolicy",
    "PolicyConfig",
    "LayerView",
    "Plan",
    "Signals",
    "available_policies",
    "cache_argument",
    "prefill",
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

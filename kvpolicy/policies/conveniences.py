"""One-line caches for the common policies: ``PyramidCache()``, ``H2OCache(budget=256)``, ..."""

from __future__ import annotations

from typing import Any

from ..core.cache import CACHE_SETTINGS, PolicyCache
from ..core.config import PolicyConfig


def _convenience(policy_name: str, doc: str) -> type[PolicyCache]:
    def __init__(self, config: PolicyConfig | dict | None = None, **overrides: Any) -> None:
        from ..core.registry import policy_class

        settings = {k: overrides.pop(k) for k in CACHE_SETTINGS if k in overrides}
        PolicyCache.__init__(self, policy_class(policy_name)(config, **overrides), **settings)

    return type(
        f"{policy_name}Cache",
        (PolicyCache,),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__},
    )


PyramidCache = _convenience(
    "pyramidinfer",
    "PolicyCache with PyramidInfer. With no arguments the reference preset for the model's depth "
    "is picked when the cache meets the model; with only compression_ratio or budget, the ratio form's "
    "shape (configs/pyramidinfer_ratio.yaml) scaled to it (see docs/policies/pyramidinfer.md).",
)
PyramidCache.__name__ = PyramidCache.__qualname__ = "PyramidCache"
H2OCache = _convenience("h2o", "PolicyCache with H2O (heavy hitters + recent window).")
H2OCache.__name__ = H2OCache.__qualname__ = "H2OCache"
FullCache = _convenience("full", "PolicyCache that keeps everything (token-identical to DynamicCache).")
FullCache.__name__ = FullCache.__qualname__ = "FullCache"
SnapKVCache = _convenience("snapkv", "PolicyCache with SnapKV (observation-window voting, prompt only).")
SnapKVCache.__name__ = SnapKVCache.__qualname__ = "SnapKVCache"
StreamingLLMCache = _convenience("streamingllm", "PolicyCache with StreamingLLM (sinks + recent window).")
StreamingLLMCache.__name__ = StreamingLLMCache.__qualname__ = "StreamingLLMCache"

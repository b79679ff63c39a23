"""What a cache learns about the model at its first attention, and keeps until it is reset.

The cache never holds the model: it first meets it inside attention, where the module of each
layer arrives. From the first module it picks the family's adapter (which layers a policy may
compress, which slide), checks that the model is supported, sets the policy up, and learns this
process's share of the KV heads under tensor parallelism; from every module, the facts its layer
needs (:class:`~kvpolicy.core.layers.ModuleFacts`). Modules are held weakly, so a cache does not
keep a model alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from . import parallel
from .errors import CacheMisuseError
from .layers import ModuleFacts
from .policy import CachePolicy


@dataclass
class ModelBinding:
    adapter: Any
    config: Any
    num_layers: int
    compressible: list[bool]
    windows: list[int | None]
    parallel: parallel.TensorParallel | None = None
    modules: dict[int, weakref.ref] = field(default_factory=dict)

    @classmethod
    def bind(cls, module: Any, policy: CachePolicy, local_kv_heads: int, tp_group: Any = None) -> ModelBinding:
        from .registry import find_adapter

        config = module.config
        adapter = find_adapter(config)
        adapter.check_attention(config)
        compressible = adapter.compressible_layers(config)
        binding = cls(adapter, config, config.num_hidden_layers, compressible, adapter.sliding_windows(config))
        if policy.prunes_hidden_states:
            adapter.check_prune_hidden(config)
        policy.setup(binding.num_layers, compressible)
        binding.parallel = parallel.detect(module, local_kv_heads, tp_group)
        return binding

    @property
    def last_compressible(self) -> int:
        idx = [i for i, c in enumerate(self.compressible) if c]
        return idx[-1] if idx else -1

    def meet(self, layer_idx: int, module: Any) -> ModuleFacts | None:
        """The facts of ``module``'s layer the first time it is seen (None afterwards); refuses a module of
        another model."""
        ref = self.modules.get(layer_idx)
        if ref is None:
            self.modules[layer_idx] = weakref.ref(module)
            scaling = getattr(module, "scaling", None) or module.head_dim**-0.5
            return ModuleFacts(scaling, self.windows[layer_idx], self.compressible[layer_idx])
        if ref() is not module:
            raise CacheMisuseError(
                "this cache already holds keys/values of another model; use a new cache per model "
                "(or call cache.reset())"
            )
        return None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the modules (weak references do not pickle; a cache is pickled apart from its
        model): the next forward's modules are taken as this model's."""
        return {**self.__dict__, "modules": {}}

    def module(self, layer_idx: int) -> Any:
        """The attention module of ``layer_idx`` (None once the model is gone)."""
        ref = self.modules.get(layer_idx)
        return None if ref is None else ref()

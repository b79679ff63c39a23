"""Layer kinds: how one layer of a :class:`~kvpolicy.core.cache.PolicyCache` stores its keys and values.

:func:`choose_kind` is the one place a cache's settings pick the kind its layers are made as; every
other piece of kvpolicy talks to a layer through :class:`KVLayer`'s methods, never its class.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import FreezeSpec, KVLayer, LayerSpec, ModuleFacts, first_moved_slot
from .codecs import KV_DTYPES, Fp8Codec, Int4Codec, Int8Codec, KVCodec, choose_codec
from .dynamic import DynamicLayer
from .frozen import FrozenLayer
from .ragged import RaggedLayer
from .segments import RaggedStore

__all__ = ["KV_DTYPES", "DynamicLayer", "Fp8Codec", "FreezeSpec", "FrozenLayer", "Int4Codec", "Int8Codec", "KVCodec",
           "KVLayer", "LayerSpec", "ModuleFacts", "RaggedLayer", "RaggedStore", "choose_codec", "choose_kind",
           "first_moved_slot"]


def choose_kind(layer_kind: type[KVLayer] | None = None) -> type[KVLayer]:
    """The kind a cache makes its layers as (``PolicyCache(layer_kind=...)``; default :class:`RaggedLayer`:
    the growing kind that stores no padding once a compaction leaves heads or rows holding different counts).

    A kind is made with a :class:`LayerSpec` and grows with its inputs; ``to_frozen`` gives the kind
    of the compiled decode step (by default :class:`FrozenLayer`, which ``to_dynamic`` turns back).
    """
    if layer_kind is None:
        return RaggedLayer
    if not (isinstance(layer_kind, type) and issubclass(layer_kind, KVLayer)):
        raise ConfigError(
            f"layer_kind takes a subclass of kvpolicy.core.layers.KVLayer (e.g. DynamicLayer), not {layer_kind!r}"
        )
    if layer_kind.is_compileable:
        raise ConfigError(
            f"layer_kind {layer_kind.__name__} is a frozen kind: give the growing kind the cache starts with "
            "(its to_frozen() makes the frozen one)"
        )
    return layer_kind

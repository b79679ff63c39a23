"""One forward at a time: a cache fills layer by layer, so two threads running forwards over one cache
would interleave their keys in each layer (and fail later with a shape error, or not at all). The cache
notes which thread's forward is under way and refuses another thread's until it has reached the last
layer.
"""

from __future__ import annotations

import threading

from .errors import CacheMisuseError


class ForwardOwner:
    def __init__(self) -> None:
        self.thread: int | None = None  # the thread whose forward filled the cache last
        self.layer = -1  # the last layer that forward reached

    def enter(self, layer_idx: int, num_layers: int | None) -> None:
        """Before ``update`` of ``layer_idx`` (``num_layers``: the model's, once known)."""
        me = threading.get_ident()
        if self.thread is not None and self.thread != me:
            unfinished = num_layers is None or self.layer < num_layers - 1
            if layer_idx > 0 or unfinished:
                raise CacheMisuseError(
                    "this cache is being filled by a forward in another thread: a cache holds one sequence batch "
                    "and its layers fill one forward at a time. Give each thread its own cache (cache.copy() "
                    "of a filled one, or a new one); if the other thread's forward failed, call cache.reset()"
                )
        self.thread, self.layer = me, layer_idx

"""Tensor parallelism: which slice of a layer's KV heads this process holds, and the one collective
kvpolicy needs across processes (an all-gather of per-head tensors in head order).

Why: under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or
``distributed_config=DistributedConfig(tp_size=n)``, launched with ``torchrun``) each rank computes a
contiguous slice of every layer's query and KV heads, so each rank's cache holds ``H_kv / n`` KV heads
and a policy sees only those. A per-KV-head policy (H2O, SnapKV, KNorm, ...) selects each head's tokens
from that head alone: it is exact with no communication, and gets none. A policy that keeps one token
set per layer averages its scores over the layer's heads: on one rank that is a mean over the heads it
sees, so each rank would keep a different set, and a prune-hidden prefill would cut each rank's hidden
states differently. Such a policy calls :meth:`TensorParallel.mean_over_heads` (through
``LayerView.mean_over_heads``), which all-gathers the per-head scores and averages them in head order,
the very operation one process runs on the whole ``[B, H_kv, L]`` tensor: every rank gets the same
bits, and the same bits one process would compute from the same per-head scores (a sum reduced across
ranks would add in another order and could flip a tie).

A selection that ranks slots across a layer's KV heads (Ada-KV's head-adaptive split, KVzip's ranking
over layers and heads) or leaves its heads holding different counts needs every head too: the kept
counts depend on the other heads' scores, and a layer's buffer is as wide as its fullest head over all
ranks. :func:`kvpolicy.core.selection.select_per_head_parallel` gathers what the selection reads (scores, slot layout,
per-head counts), runs :func:`~kvpolicy.core.selection.select_per_head` on the whole layer as one
process would, and keeps this rank's heads.

The cache learns the slice from the first keys it is given: fewer KV heads than the model's config
declares means the heads are sharded. The process group comes from the DTensor weights of the attention
module (transformers >= 5.17 shards parameters as DTensors), else (transformers 5.2 shards into plain
tensors) the default group when its size matches, else the group named by the cache's ``tp_group`` setting
(``make_cache(..., tp_group=model._device_mesh)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UnsupportedModelError


@dataclass
class ReductionStats:
    """What the score gathers of this process (head merges, selections across heads) cost, by phase
    (``"prefill"``, ``"decode"``): calls and elements gathered always (free); seconds only with
    ``timing=True``, which synchronises the device around each call (for a benchmark's breakdown, not for
    speed)."""

    calls: dict[str, int] = field(default_factory=dict)
    elements: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    timing: bool = False

    def reset(self) -> None:
        self.calls, self.elements, self.seconds = {}, {}, {}

    def add(self, phase: str, elements: int, seconds: float) -> None:
        self.calls[phase] = self.calls.get(phase, 0) + 1
        self.elements[phase] = self.elements.get(phase, 0) + elements
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


#: process-wide counters of :meth:`TensorParallel.gather_heads` (which ``mean_over_heads`` and the
#: selections ranking slots across heads go through)
STATS = ReductionStats()


@dataclass
class TensorParallel:
    """This rank's share of a layer's KV heads: heads ``offset .. offset + local`` of ``total``, the
    ``rank``-th of ``size`` ranks of ``group``.

    Copies of a cache share the group (``deepcopy`` returns the same object): a process group cannot
    be copied, and it is the same group for every cache of the process.
    """

    group: Any
    rank: int
    size: int
    local: int
    total: int

    @property
    def offset(self) -> int:
        """Index of this rank's first KV head among the layer's ``total``."""
        return self.rank * self.local

    def __deepcopy__(self, memo: dict) -> TensorParallel:
        return self

    def gather_heads(self, t: torch.Tensor, phase: str = "decode") -> torch.Tensor:
        """``t`` ``[B, local, ...]`` (this rank's heads) -> ``[B, total, ...]``, every rank's heads in head
        order: the tensor one process holding every head would have, the same on every rank (a
        concatenation, so bit for bit). ``phase`` files the call in :data:`STATS`."""
        import torch.distributed as dist

        started = _clock(t) if STATS.timing else 0.0
        b, h, *rest = t.shape
        gathered = t.new_empty((self.size * b, h, *rest))
        dist.all_gather_into_tensor(gathered, t.contiguous(), group=self.group)
        # [size * B, h, ...] in rank order -> [B, size * h, ...] in head order (rank r holds heads r*h .. r*h+h-1)
        full = gathered.view(self.size, b, h, *rest).transpose(0, 1).reshape(b, self.size * h, *rest)
        STATS.add(phase, gathered.numel(), _clock(full) - started if STATS.timing else 0.0)
        return full

    def mean_over_heads(self, scores: torch.Tensor, phase: str = "decode") -> torch.Tensor:
        """``scores`` ``[B, local, L]`` (this rank's heads) -> ``[B, 1, L]``, the mean over all ``total``
        heads, bit for bit what ``full.mean(dim=1, keepdim=True)`` gives on one process holding every
        head's scores ``full``, and the same on every rank. ``phase`` files the call in :data:`STATS`."""
        return self.gather_heads(scores, phase).mean(dim=1, keepdim=True)

    def own_heads(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice ``[B, local, ...]`` of a whole layer's ``[B, total, ...]``."""
        return t[:, self.offset : self.offset + self.local]


def _clock(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def detect(module: Any, local_kv_heads: int, tp_group: Any = None) -> TensorParallel | None:
    """The tensor-parallel slice of ``module``'s (an attention module's) layer, whose keys reach the
    cache with ``local_kv_heads`` heads; None when this process holds every head (no parallelism, or
    heads replicated on every rank). ``tp_group``: the tensor-parallel process group (a ``torch.distributed``
    ProcessGroup or a 1-D ``DeviceMesh``) where kvpolicy cannot find it: a transformers version whose
    weights are plain tensors, with tensor parallelism over a part of the world (e.g. ``model._device_mesh``)."""
    config = module.config
    total = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if local_kv_heads == total:
        return None
    import torch.distributed as dist

    if local_kv_heads > total or total % local_kv_heads or not (dist.is_available() and dist.is_initialized()):
        raise UnsupportedModelError(
            f"the layer's keys have {local_kv_heads} heads where the model's config declares {total} "
            f"(num_key_value_heads), and no tensor-parallel run explains it (torch.distributed is "
            f"{'not ' if not (dist.is_available() and dist.is_initialized()) else ''}initialized). kvpolicy "
            "supports transformers' own tensor parallelism: load the model with tp_plan='auto' (or "
            "distributed_config=DistributedConfig(tp_size=n)) under torchrun, whose ranks each hold an equal "
            "share of the KV heads"
        )
    size = total // local_kv_heads
    group, rank = _group(module, size, tp_group)
    return TensorParallel(group=group, rank=rank, size=size, local=local_kv_heads, total=total)


def _group(module: Any, size: int, named: Any) -> tuple[Any, int]:
    """(process group, this rank's index in it) of the ranks sharing ``module``'s heads."""
    import torch.distributed as dist

    mesh = _mesh_of(named) if named is not None else _weight_mesh(module)
    if mesh is not None:
        group, rank = mesh.get_group(), mesh.get_local_rank()
    elif named is not None:
        group, rank = named, dist.get_rank(named)
    elif dist.get_world_size() == size:
        group, rank = dist.group.WORLD, dist.get_rank()
    else:
        raise UnsupportedModelError(
            f"the KV heads are split over {size} ranks of {dist.get_world_size()}, and kvpolicy cannot tell which "
            "ranks share this model's heads (its weights are not DTensors). Name the tensor-parallel group "
            "with the cache: make_cache(..., tp_group=model._device_mesh)"
        )
    if dist.get_world_size(group) != size:
        raise UnsupportedModelError(
            f"the tensor-parallel group has {dist.get_world_size(group)} ranks but the KV heads are split {size} "
            "ways; kvpolicy needs every rank of the group to hold an equal share of each layer's KV heads"
        )
    return group, rank


def _mesh_of(group: Any) -> Any:
    """``group`` as a 1-D DeviceMesh, or None when it is a process group."""
    mesh = group
    if getattr(mesh, "ndim", None) is None:
        return None
    if mesh.ndim > 1:
        mesh = mesh["tp"]
    return mesh


def _weight_mesh(module: Any) -> Any:
    """The 1-D mesh of the first sharded DTensor parameter of ``module`` (transformers >= 5.17), or None."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for param in module.parameters():
        if isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements):
            return _mesh_of(param.device_mesh)
    return None


def from_pretrained_kwargs(tp_size: int | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load a model with transformers' tensor parallelism over
    ``tp_size`` ranks (default: the whole world), in the spelling the installed transformers takes:
    ``distributed_config=DistributedConfig(tp_size=n)`` where it exists (5.17 on; the bare ``tp_plan``
    argument warns there), else ``tp_plan="auto"`` (5.2).

    Run under ``torchrun``; ``from_pretrained(None, config=config, state_dict={}, **kwargs)`` builds a
    model of random weights with each rank allocating only its shards (benchmarks/throughput_tp.py)."""
    import dataclasses

    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers < 5.17
        DistributedConfig = None  # noqa: N806
    fields = {f.name for f in dataclasses.fields(DistributedConfig)} if DistributedConfig is not None else set()
    if "tp_size" in fields:
        return {"distributed_config": DistributedConfig(tp_size=tp_size) if tp_size else DistributedConfig(
            tp_plan="auto")}
    return {"tp_plan": "auto", **({"tp_size": tp_size} if tp_size else {})}

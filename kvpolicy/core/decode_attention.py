"""One decode step's attention over a frozen layer's stored buffers: the Triton kernel, and its oracle.

``decode_kernel="auto"`` (a cache setting) sends a compiled decode step's attention through the
kernel of ``decode_kernel.py`` where it applies (a CUDA tensor, Triton importable, SDPA's
arithmetic: no soft-capping or sinks) and through dequantize + SDPA elsewhere; ``"triton"``
demands the kernel (an error names what is missing), ``"sdpa"`` never uses it (the comparison).
:func:`reference` is the oracle both are tested against: written from the definitions (codes
times scales, the mask of ``masks.allowed``, softmax) with none of the kernel's code.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from . import gqa_attention, masks
from .errors import ConfigError

DECODE_KERNELS = ("auto", "triton", "sdpa")

_BLOCK_N = 64  # slots per inner step: 64 keys x 128 dims of bf16 is 16 KiB per load
_MAX_SPLITS = 64


def check_setting(name: str) -> str:
    if name not in DECODE_KERNELS:
        raise ConfigError(f"decode_kernel takes one of {', '.join(map(repr, DECODE_KERNELS))}, not {name!r}")
    return name


#: why the kernel cannot run here (None: it can), found once at import without importing Triton: a lookup inside
#: the compiled step's trace would break its graph, and ``import kvpolicy`` stays light
_TRITON_PROBLEM = None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"


def triton_problem() -> str | None:
    return _TRITON_PROBLEM


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when first imported):
    CPU tensors then run them, which the tests use."""
    from . import decode_kernel

    return decode_kernel.INTERPRETED


def kernel_applies(setting: str, query: torch.Tensor, codec, kwargs: dict) -> bool:
    """Whether this step's attention goes through the kernel under ``setting``."""
    if setting == "sdpa":
        return False
    problem = triton_problem()
    if problem is None and not (query.is_cuda or (setting == "triton" and _interpreting())):
        problem = f"the kernel runs on CUDA tensors (these are on {query.device})"
    if problem is None and _code_of(codec) is None:
        problem = (f"the kernel reads kv_dtype 'auto', 'int8' and 'fp8', not the codec {codec!r} (whose layers "
                   "'auto' dequantizes for SDPA)")
    if problem is None and any(kwargs.get(k) is not None for k in gqa_attention.CHANGES_MATH):
        problem = "the model's attention adds soft-capping, sinks or a bias, which the kernel does not compute"
    if problem is None and kwargs.get("dropout", 0.0):
        problem = "attention dropout is on (call model.eval())"
    if problem is not None and setting == "triton":
        raise ConfigError(f"decode_kernel='triton' cannot run: {problem}; use decode_kernel='auto' or 'sdpa'")
    return problem is None


def _code_of(codec) -> int | None:
    """The kernel's ``CODES`` for a codec (None: one it cannot read): 0 the model's dtype, 1 int8, 2 fp8
    (``decode_kernel.PLAIN``, ``INT8``, ``FP8``). The codecs are imported here, not at the top: the layers
    import this module."""
    from .layers.codecs import Fp8Codec, Int8Codec, KVCodec

    return {KVCodec: 0, Int8Codec: 1, Fp8Codec: 2}.get(type(codec))


def splits_for(rows_heads: int, capacity: int, device: torch.device) -> int:
    """How many shares of the slots each (row, KV head) is split into: enough programs for about two
    waves of the card's multiprocessors, never a share smaller than two blocks; a power of two
    (the combine kernel sums them as one vector)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, math.ceil(2 * sms / rows_heads))
    most = max(1, capacity // (2 * _BLOCK_N))
    n = min(want, most, _MAX_SPLITS)
    return 1 << (n - 1).bit_length() if n > 1 else 1


def kernel_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                     pad: torch.Tensor, slot: torch.Tensor, next_pos: torch.Tensor, codec,
                     window: int | None, scaling: float | None,
                     segments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of ``query`` ``[B, H_q, 1, D]`` (the token at ``next_pos - 1``) over the first ``slot`` slots
    of ``keys``/``values`` ``[B, H_kv, L, W]`` as stored, under the mask of ``masks.allowed``;
    ``[B, 1, H_q, D]`` in the query's dtype (what transformers' attention functions return).
    ``segments`` (a head-ragged frozen layer, ``layers/frozen_ragged.py``): ``(start, end)`` ``[B, H_kv]``, and
    ``keys``/``values`` ``[N, W]``, ``pos`` ``[N]`` flat: row ``b``'s head ``h`` holds entries ``start[b, h]``
    up to ``end[b, h] + slot``."""
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise ValueError("the decode kernel takes one query token per row")
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or pos.stride(-1) != 1:
        raise ValueError("the decode kernel reads buffers whose last dimension is contiguous")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    seg_start, seg_end = segments if segments is not None else (None, None)
    out = torch.ops.kvpolicy.decode_attention(query.reshape(b, hq, d), keys, values, pos, pad, slot, next_pos,
                                              seg_start, seg_end, _code_of(codec), window or 0, float(scale))
    return out.unsqueeze(1)


# an operator of its own, so that torch.compile treats the launch as one opaque call with a known output
# shape (CUDA graphs capture it: it reads no host number)
@torch.library.custom_op("kvpolicy::decode_attention", mutates_args=())
def _decode_op(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor,
               slot: torch.Tensor, next_pos: torch.Tensor, seg_start: torch.Tensor | None, seg_end: torch.Tensor | None,
               codes: int, window: int, scaling: float) -> torch.Tensor:
    from . import decode_kernel

    b, hq, d = query.shape
    if seg_start is None:
        hkv, capacity = keys.shape[1], keys.shape[2]
        segments = None
    else:  # the slots per segment, on average: what the shares are sized by
        hkv, capacity, segments = seg_start.shape[1], keys.shape[0] // max(1, seg_start.numel()), (seg_start, seg_end)
    g_pad, d_pad = decode_kernel.pads(hq // hkv, d)
    splits = splits_for(b * hkv, capacity, query.device)
    out = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
    n_parts = b * hkv * splits * g_pad
    parts = (torch.empty(n_parts * d_pad, dtype=torch.float32, device=query.device),
             torch.empty(n_parts, dtype=torch.float32, device=query.device),
             torch.empty(n_parts, dtype=torch.float32, device=query.device))
    decode_kernel.launch(
        query, keys, values, pos, pad, slot, next_pos, out, parts, codes=codes, window=window, scaling=scaling,
        block_n=_BLOCK_N, splits=splits, segments=segments,
        # Triton's interpreter multiplies bfloat16 matrices wrongly (its numpy has no bfloat16): there the
        # products are taken in float32, which the GPU check (benchmarks/decode_kernel_check.py) does not use
        dot_dtype="float32" if decode_kernel.INTERPRETED else str(query.dtype).removeprefix("torch."),
    )
    return out


@_decode_op.register_fake
def _decode_op_shape(query, keys, values, pos, pad, slot, next_pos, seg_start, seg_end, codes, window, scaling):
    return torch.empty_like(query)


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor,
              filled: int, qpos: int, codec, window: int | None, scaling: float | None) -> torch.Tensor:
    """The oracle, in float32 on any device: ``[B, 1, H_q, D]``, as :func:`kernel_attention`."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    k = codec.decode(keys[:, :, :filled], torch.float32).float().repeat_interleave(hq // hkv, dim=1)
    v = codec.decode(values[:, :, :filled], torch.float32).float().repeat_interleave(hq // hkv, dim=1)
    p = pos[:, :, :filled].expand(b, hkv, filled).repeat_interleave(hq // hkv, dim=1)
    qpos_t = torch.tensor(qpos, device=p.device).view(1, 1, 1, 1)
    allowed = masks.allowed(p, pad, qpos_t, window)[:, :, 0]  # [B, H_q, L]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    logits = torch.einsum("bhd,bhld->bhl", query[:, :, 0].float() * scale, k).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("bhl,bhld->bhd", weights, v).unsqueeze(1).to(query.dtype)

"""How a layer stores each kept key/value vector: at the model's dtype, in 8 bits with a scale, or in 4.

A codec maps a ``[..., D]`` vector of one token and KV head to the ``[..., W]`` row the layer keeps
and back. The quantized codecs pack the 8-bit codes and their float32 scale into one ``int8`` row
of ``D + 4`` bytes (the scale's four bytes are bit-cast, not converted), so that every operation a
layer does on its buffers (append at a slot, gather the kept slots, move rows, join row chunks,
freeze for the compiled step) moves codes and scales together without knowing they are there, and
``kv_bytes()`` counts the scales with the codes.

Why per token and head (one scale per key/value vector) and not KIVI's per-channel keys: an
eviction policy drops single tokens, and a per-channel scale is shared by a group of tokens
that the policy then breaks up (kvpress re-quantizes after every prune for that reason). A
per-token scale travels with its token. Measured (docs/benchmarks/key_quant_error.md): at 8 bits per-token
and per-channel keys are both within 0.03% of the exact perplexity; at 4 bits per-channel keys would matter.

int4 (``Int4Codec``) packs two 4-bit codes per byte with a bfloat16 scale and minimum per group of
32 channels of the vector: still one token's own row (eviction keeps its meaning), but asymmetric and
group-wise, which halves the per-vector int4 error (docs/benchmarks/key_quant_error.md).

Attention reads the dequantized buffer (``decode``): the cache holds the codes; a forward's
own new tokens (the prompt's first fill) are attended exactly and stored quantized.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

_HOLDS = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_BYTES = 4  # a float32 scale per vector, bit-cast into the row


class KVCodec:
    """The identity: keys and values kept at the model's dtype (``kv_dtype="auto"``)."""

    name = "auto"
    quantized = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored

    def stored_width(self, head_dim: int) -> int:
        """The last dimension of the stored rows for vectors of ``head_dim``."""
        return head_dim

    def head_dim(self, stored_width: int) -> int:
        """The vectors' dimension back from the stored rows' last dimension (:meth:`stored_width`'s inverse)."""
        return stored_width

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse a model dtype or device this codec cannot hold (at the layer's first tokens)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"KVCodec({self.name!r})"


class _Quantized(KVCodec):
    """Codes of a float model's keys/values (a quantized codec reads float16, bfloat16 or float32)."""

    quantized = True

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        if dtype not in _HOLDS:
            raise ConfigError(
                f"kv_dtype={self.name!r} stores keys/values of a float16, bfloat16 or float32 model; this model "
                f"gives {dtype}: load it in bfloat16 (torch_dtype=torch.bfloat16) or use kv_dtype='auto'"
            )


class _EightBit(_Quantized):
    """Symmetric 8-bit codes with one float32 scale per vector (absmax / the code's largest value)."""

    code_max = 127.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = (xf.abs().amax(-1, keepdim=True) / self.code_max).clamp_min(torch.finfo(torch.float32).tiny)
        codes = self._to_codes(xf / scale)
        return torch.cat([codes, _scale_bytes(scale)], dim=-1)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        d = stored.shape[-1] - _SCALE_BYTES
        return (self._from_codes(stored[..., :d]) * _scale_of(stored[..., d:])).to(dtype)

    def stored_width(self, head_dim: int) -> int:
        return head_dim + _SCALE_BYTES

    def head_dim(self, stored_width: int) -> int:
        return stored_width - _SCALE_BYTES

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _signed_bytes(b: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 255] as the int8 bytes of the same bits."""
    return torch.where(b > 127, b - 256, b).to(torch.int8)


def _int_bytes(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The low ``n`` bytes of each int32 of ``bits`` ``[..., k]`` as int8 ``[..., k * n]``, low byte first (memory
    order). With shifts, not ``.view(torch.int8)``: inductor cannot compile a view between dtypes of different
    sizes (the compiled decode step writes scales); Python shifts copy no tensor to the device."""
    return _signed_bytes(torch.stack([(bits >> (8 * i)) & 0xFF for i in range(n)], dim=-1).flatten(-2))


def _int_of(stored: torch.Tensor, n: int) -> torch.Tensor:
    """The int32 values ``[..., k]`` back from their low ``n`` bytes ``[..., k * n]`` (:func:`_int_bytes`)."""
    b = (stored.to(torch.int32) & 0xFF).unflatten(-1, (-1, n))
    bits = b[..., 0]
    for i in range(1, n):
        bits = bits | (b[..., i] << (8 * i))
    return bits


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """The float32 ``scale`` ``[..., 1]`` as its four bytes ``[..., 4]``, through its bits (``view(torch.int32)``:
    the same size, a bit-cast inductor takes)."""
    return _int_bytes(scale.view(torch.int32), 4)


def _scale_of(stored: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``[..., 1]`` back from its four stored bytes ``[..., 4]``."""
    return _int_of(stored, 4).view(torch.float32)


class Int8Codec(_EightBit):
    """int8 codes, rounded to nearest: error at most half a step (absmax / 254) per element."""

    name = "int8"

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round().clamp(-127, 127).to(torch.int8)

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()


class Fp8Codec(_EightBit):
    """float8_e4m3fn codes (3 mantissa bits: relative error at most 1/16 per element, whatever its size,
    where int8's error is absolute: fp8 keeps small elements of a vector with a large one better)."""

    name = "fp8"
    code_max = 448.0

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        # clamped: a quotient rounded just past 448 would become NaN (e4m3fn has no infinity)
        return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.int8)

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.float8_e4m3fn).float()

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        super().check(dtype, device)
        problem = _fp8_problem(torch.device(device).type)
        if problem:
            raise ConfigError(
                f"kv_dtype='fp8' needs float8_e4m3fn on {device}, which this torch ({torch.__version__}) "
                f"cannot do there ({problem}); use kv_dtype='int8' (the same bytes)"
            )


@functools.cache
def _fp8_problem(device_type: str) -> str | None:
    """Why float8_e4m3fn cannot be made on this kind of device (None: it can); tried once per kind, not
    per layer."""
    try:
        torch.zeros(1, device=device_type).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError) as err:
        return str(err)
    return None


class Int4Codec(_Quantized):
    """Asymmetric 4-bit codes in groups of ``group`` channels (``kv_dtype="int4"``: 32), each group with a
    bfloat16 scale and minimum.

    A row of ``D`` channels is ``D / 2`` bytes of codes (channel ``2i`` in the low nibble, ``2i + 1`` in the
    high one), then each group's scale, then each group's minimum (two bytes each, the bfloat16's bits):
    ``D / 2 + 4 D / group`` bytes, 0.3125 of 16-bit storage at groups of 32. A channel comes back as
    ``min + code * scale``, within half a step (``(max - min) / 30`` of its group) of the stored value.
    Why groups of channels within one token, not KIVI's per-channel key groups over 32 tokens: the row stays
    the token's own, so eviction and compaction move it like any other; groups of 32 channels and an offset
    take most of what per-channel scales win at 4 bits (docs/benchmarks/key_quant_error.md).
    Why bfloat16 scales: they cover float32's range (no overflow on large activations), and their rounding
    (2^-9 relative) is small against a 4-bit step. The decode kernel does not read these codes: a compiled
    step dequantizes and calls SDPA (``decode_kernel="auto"``)."""

    name = "int4"
    LEVELS = 15

    def __init__(self, group: int = 32) -> None:
        if not isinstance(group, int) or group < 2 or group % 2:
            raise ConfigError(f"Int4Codec(group=...) takes an even number of channels of at least 2, not {group!r}")
        self.group = group

    def stored_width(self, head_dim: int) -> int:
        if head_dim % self.group:
            fits = [g for g in (16, 8, 4, 2) if head_dim % g == 0]
            instead = f"kvpolicy.core.layers.Int4Codec(group={fits[0]}) as kv_dtype, or " if fits else ""
            raise ConfigError(
                f"kv_dtype='int4' quantizes groups of {self.group} channels and this model's head_dim is {head_dim}, "
                f"not a multiple of it: use {instead}kv_dtype='int8'"
            )
        return head_dim // 2 + 4 * (head_dim // self.group)

    def head_dim(self, stored_width: int) -> int:
        return stored_width * self.group // (self.group // 2 + 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        self.stored_width(d)  # refuses a head_dim that is not whole groups
        g = x.float().unflatten(-1, (d // self.group, self.group))
        low = _bf16_round(g.amin(-1, keepdim=True))
        # the scale rounded up past the group's span, so that the top code still reaches its maximum
        span = (g.amax(-1, keepdim=True) - low) / self.LEVELS
        scale = _bf16_round(span * (1.0 + 2.0 ** -7))
        # a constant group (or one whose span is below bfloat16's smallest step): every code 0, the minimum kept
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = ((g - low) / scale).round().clamp(0, self.LEVELS).to(torch.int32).flatten(-2)
        pairs = codes.unflatten(-1, (d // 2, 2))
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
        return torch.cat([_signed_bytes(packed), _bf16_bytes(scale.squeeze(-1)), _bf16_bytes(low.squeeze(-1))],
                         dim=-1)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        d = self.head_dim(stored.shape[-1])
        groups = d // self.group
        b = stored[..., : d // 2].to(torch.int32) & 0xFF
        codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).float().unflatten(-1, (groups, self.group))
        scale = _bf16_of(stored[..., d // 2: d // 2 + 2 * groups]).unsqueeze(-1)
        low = _bf16_of(stored[..., d // 2 + 2 * groups:]).unsqueeze(-1)
        return (low + codes * scale).flatten(-2).to(dtype)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.group == self.group

    def __hash__(self) -> int:
        return hash((type(self), self.group))

    def __repr__(self) -> str:
        return f"Int4Codec(group={self.group})"


def _bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest bfloat16, kept as float32."""
    return x.to(torch.bfloat16).float()


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., n]`` (values that are bfloat16) as ``[..., 2n]`` bytes: each value's bfloat16 bits, the upper
    half of its float32 bits."""
    return _int_bytes(x.float().contiguous().view(torch.int32) >> 16, 2)


def _bf16_of(stored: torch.Tensor) -> torch.Tensor:
    """The float32 values back from ``[..., 2n]`` bfloat16 bytes (:func:`_bf16_bytes`)."""
    return (_int_of(stored, 2) << 16).view(torch.float32)


#: the codec of each ``kv_dtype`` name
_CODECS: dict[str, type[KVCodec]] = {"auto": KVCodec, "int8": Int8Codec, "fp8": Fp8Codec, "int4": Int4Codec}
#: what ``kv_dtype`` takes
KV_DTYPES = tuple(_CODECS)


def choose_codec(kv_dtype: str | KVCodec = "auto") -> KVCodec:
    """The codec for a cache's ``kv_dtype`` setting (a name, or a codec object for a kind of one's own)."""
    if isinstance(kv_dtype, KVCodec):
        return kv_dtype
    if kv_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(f"kv_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1), not in torch "
                          f"{torch.__version__}; use kv_dtype='int8'")
    if kv_dtype not in _CODECS:
        raise ConfigError(f"kv_dtype takes one of {', '.join(map(repr, KV_DTYPES))}, not {kv_dtype!r}")
    return _CODECS[kv_dtype]()

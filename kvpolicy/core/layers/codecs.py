"""How a layer stores each kept key/value vector: at the model's dtype, or in 8 bits with a scale.

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

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse a model dtype or device this codec cannot hold (at the layer's first tokens)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"KVCodec({self.name!r})"


class _EightBit(KVCodec):
    """Symmetric 8-bit codes with one float32 scale per vector (absmax / the code's largest value)."""

    quantized = True
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

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        if dtype not in _HOLDS:
            raise ConfigError(
                f"kv_dtype={self.name!r} stores keys/values of a float16, bfloat16 or float32 model; this model "
                f"gives {dtype}: load it in bfloat16 (torch_dtype=torch.bfloat16) or use kv_dtype='auto'"
            )

    def _to_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


_SHIFTS = (0, 8, 16, 24)


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """The float32 ``scale`` ``[..., 1]`` as its four bytes ``[..., 4]`` (int8, little-endian: memory order).
    With shifts, not ``scale.view(torch.int8)``: inductor cannot compile a view between dtypes of different
    sizes (the compiled decode step writes scales)."""
    bits = scale.view(torch.int32)  # the same size: a bit-cast inductor takes
    b = torch.cat([(bits >> s) & 0xFF for s in _SHIFTS], dim=-1)  # Python shifts: no tensor copied to the device
    return torch.where(b > 127, b - 256, b).to(torch.int8)


def _scale_of(stored: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``[..., 1]`` back from its four stored bytes ``[..., 4]``."""
    b = stored.to(torch.int32) & 0xFF
    bits = (b[..., 0:1] << _SHIFTS[0]) | (b[..., 1:2] << _SHIFTS[1]) | (b[..., 2:3] << _SHIFTS[2]) | \
        (b[..., 3:4] << _SHIFTS[3])
    return bits.view(torch.float32)


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


#: the codec of each ``kv_dtype`` name
_CODECS: dict[str, type[KVCodec]] = {"auto": KVCodec, "int8": Int8Codec, "fp8": Fp8Codec}
#: what ``kv_dtype`` takes (``"int4"`` is refused by name, saying what to use instead)
KV_DTYPES = tuple(_CODECS)


def choose_codec(kv_dtype: str | KVCodec = "auto") -> KVCodec:
    """The codec for a cache's ``kv_dtype`` setting (a name, or a codec object for a kind of one's own)."""
    if isinstance(kv_dtype, KVCodec):
        return kv_dtype
    if kv_dtype == "int4":
        raise ConfigError(
            "kv_dtype='int4' is not available in this version (its group-wise codes and decode kernel are not "
            "written yet); use kv_dtype='int8' or 'fp8' (0.53 of the 16-bit bytes at head_dim 64, 0.52 at 128)"
        )
    if kv_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(f"kv_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1), not in torch "
                          f"{torch.__version__}; use kv_dtype='int8'")
    if kv_dtype not in _CODECS:
        raise ConfigError(f"kv_dtype takes one of {', '.join(map(repr, KV_DTYPES))}, not {kv_dtype!r}")
    return _CODECS[kv_dtype]()

"""Just enough of R's serialization format to read character vectors from a lazy-load database.

Why this exists: the real prose we evaluate on (Jane Austen's novels) is shipped by Debian as
the R package ``r-cran-janeaustenr``, whose data lives in R's lazy-load database
(``data/Rdata.rdx`` index + ``data/Rdata.rdb`` blobs). Reading it needs no R interpreter, only
this small XDR unserializer, which supports the types such data uses (vectors, lists,
pairlists, symbols, attributes, references) and refuses anything else with a clear error.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from ..core.errors import KVPolicyError


class RDataError(KVPolicyError):
    """An R data file could not be decoded (corrupt, or a type this reader does not handle)."""


class _Symbol(str):
    """An R symbol (kept apart from strings so attribute names are recognisable)."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def read(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise RDataError("truncated R serialization stream")
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.read(4))[0]

    def header(self) -> None:
        if self.read(2) != b"X\n":
            raise RDataError("only XDR (binary, big-endian) R serialization is supported")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            self.read(self.int())  # native encoding name

    def item(self) -> Any:  # noqa: C901 - one branch per R type is the clearest form
        flags = self.int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind in (242, 251, 252, 253):  # empty env, missing arg, base env, global env
            return None
        if kind == 255:  # REFSXP
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            sym = _Symbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            length = self.int()
            return None if length == -1 else self.read(length).decode("utf-8", errors="replace")
        if kind in (2, 6):  # LISTSXP (pairlist), LANGSXP
            out: dict[str, Any] = {}
            attr = self.item() if has_attr else None
            del attr
            tag = self.item() if has_tag else None
            value = self.item()
            out[str(tag) if tag is not None else f"_{len(out)}"] = value
            rest = self.item()
            if isinstance(rest, dict):
                out.update(rest)
            return out
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            value: Any = list(struct.unpack(f">{n}i", self.read(4 * n)))
        elif kind == 14:  # REALSXP
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.read(8 * n)))
        elif kind == 16:  # STRSXP
            value = [self.item() for _ in range(self.int())]
        elif kind in (19, 20):  # VECSXP, EXPRSXP
            value = [self.item() for _ in range(self.int())]
        else:
            raise RDataError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind in (19, 20) and names is not None and len(names) == len(value):
                return dict(zip(names, value))
        return value


def unserialize(data: bytes) -> Any:
    """Decode one XDR-serialized R object (lists with names become dicts)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_blob(blob: bytes) -> bytes:
    """A lazy-load blob: 4-byte big-endian length, then zlib data or a type byte + payload."""
    length = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    try:
        if body[:1] == b"Z":
            return lzma.decompress(body[1:])
        if body[:1] == b"2":
            return bz2.decompress(body[1:])
        if body[:1] == b"0":
            return body[1 : 1 + length]
        return zlib.decompress(body)
    except (zlib.error, lzma.LZMAError, OSError, ValueError) as err:
        raise RDataError(f"cannot decompress R lazy-load entry: {err}") from None


def read_lazyload_db(stem: str | Path) -> dict[str, Any]:
    """Every object of the lazy-load database ``<stem>.rdx``/``<stem>.rdb``, by name."""
    stem = Path(stem)
    try:
        index = unserialize(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
        blobs = stem.with_suffix(".rdb").read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise RDataError(f"cannot read R lazy-load database {stem}: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{stem}.rdx is not a lazy-load index")
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_decompress_blob(blobs[int(offset) : int(offset) + int(length)]))
    return out

"""Aerospike's flavour of msgpack, as used for map/list bin values and CDT operations.

Differences from plain msgpack (see shared/aerospike-wire-capture.txt):

* every msgpack *str* carries a leading particle-type byte: 0x03 for a string, 0x04 for a
  blob (the client never uses the msgpack ``bin`` family), other values for rarer types
  (GeoJSON, language blobs) which are kept as :class:`RawParticle`;
* an ordered map starts with a pair whose key is ``ext(0xff, flags)`` and value nil; it is
  stripped on decode (this double stores every map key-ordered anyway).

Decoding gives plain Python values: ``str``, ``bytes``, ``int``, ``float``, ``bool``,
``None``, ``list``, ``dict``. Unknown ext types are kept as :class:`Ext`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

PT_STRING = 3
PT_BLOB = 4


@dataclass(frozen=True)
class RawParticle:
    """A msgpack str payload whose particle-type byte is neither string nor blob."""

    ptype: int
    data: bytes


@dataclass(frozen=True)
class Ext:
    """A msgpack ext value (Aerospike uses type 0xff for map/list headers and wildcards)."""

    code: int
    data: bytes


class MsgpackError(ValueError):
    """Malformed or unsupported msgpack input."""


# ---------------------------------------------------------------------------------------
# decoding


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise MsgpackError("truncated msgpack")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]


def _decode_raw(data: bytes) -> Any:
    if not data:
        return ""
    ptype, payload = data[0], data[1:]
    if ptype == PT_STRING:
        return payload.decode("utf-8")
    if ptype == PT_BLOB:
        return bytes(payload)
    return RawParticle(ptype, bytes(payload))


def _read(r: _Reader) -> Any:
    b = r.u8()
    if b <= 0x7F:
        return b
    if b >= 0xE0:
        return b - 0x100
    if 0x80 <= b <= 0x8F:
        return _read_map(r, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return [_read(r) for _ in range(b & 0x0F)]
    if 0xA0 <= b <= 0xBF:
        return _decode_raw(r.take(b & 0x1F))
    simple: dict[int, Any] = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in simple:
        return simple[b]
    if b in (0xC4, 0xD9):
        return _decode_raw(r.take(r.u8())) if b == 0xD9 else bytes(r.take(r.u8()))
    if b in (0xC5, 0xDA):
        n = r.unpack(">H")
        return _decode_raw(r.take(n)) if b == 0xDA else bytes(r.take(n))
    if b in (0xC6, 0xDB):
        n = r.unpack(">I")
        return _decode_raw(r.take(n)) if b == 0xDB else bytes(r.take(n))
    if b in (0xC7, 0xC8, 0xC9):
        n = r.unpack({0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b])
        code = r.u8()
        return Ext(code, bytes(r.take(n)))
    if b == 0xCA:
        return r.unpack(">f")
    if b == 0xCB:
        return r.unpack(">d")
    ints = {
        0xCC: ">B",
        0xCD: ">H",
        0xCE: ">I",
        0xCF: ">Q",
        0xD0: ">b",
        0xD1: ">h",
        0xD2: ">i",
        0xD3: ">q",
    }
    if b in ints:
        return r.unpack(ints[b])
    if 0xD4 <= b <= 0xD8:
        n = 1 << (b - 0xD4)
        code = r.u8()
        return Ext(code, bytes(r.take(n)))
    if b == 0xDC:
        return [_read(r) for _ in range(r.unpack(">H"))]
    if b == 0xDD:
        return [_read(r) for _ in range(r.unpack(">I"))]
    if b == 0xDE:
        return _read_map(r, r.unpack(">H"))
    if b == 0xDF:
        return _read_map(r, r.unpack(">I"))
    raise MsgpackError(f"unsupported msgpack type byte 0x{b:02x}")


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    if isinstance(key, dict):
        raise MsgpackError("map keys that are maps are not supported")
    return key


def _read_map(r: _Reader, n: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for i in range(n):
        key = _read(r)
        value = _read(r)
        if i == 0 and isinstance(key, Ext) and key.code == 0xFF:
            continue  # ordered-map header: {ext(0xff, flags): nil, ...}
        out[_hashable(key)] = value
    return out


def unpackb(data: bytes) -> Any:
    """Decode one msgpack value (Aerospike flavour); trailing bytes are an error."""
    r = _Reader(bytes(data))
    value = _read(r)
    if r.pos != len(r.buf):
        raise MsgpackError(f"{len(r.buf) - r.pos} trailing bytes after msgpack value")
    return value


# ---------------------------------------------------------------------------------------
# encoding


def _raw_header(n: int) -> bytes:
    if n < 32:
        return bytes([0xA0 | n])
    if n < 0x100:
        return bytes([0xD9, n])
    if n < 0x10000:
        return b"\xda" + struct.pack(">H", n)
    return b"\xdb" + struct.pack(">I", n)


def _int(v: int) -> bytes:
    if 0 <= v < 0x80:
        return bytes([v])
    if -32 <= v < 0:
        return bytes([v & 0xFF])
    if v >= 0:
        for code, fmt, limit in (
            (0xCC, ">B", 1 << 8),
            (0xCD, ">H", 1 << 16),
            (0xCE, ">I", 1 << 32),
            (0xCF, ">Q", 1 << 64),
        ):
            if v < limit:
                return bytes([code]) + struct.pack(fmt, v)
        raise MsgpackError(f"integer {v} does not fit in 64 bits")
    for code, fmt, limit in (
        (0xD0, ">b", 1 << 7),
        (0xD1, ">h", 1 << 15),
        (0xD2, ">i", 1 << 31),
        (0xD3, ">q", 1 << 63),
    ):
        if v >= -limit:
            return bytes([code]) + struct.pack(fmt, v)
    raise MsgpackError(f"integer {v} does not fit in 64 bits")


def _container_header(n: int, fix: int, c16: int, c32: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    if n < 0x10000:
        return bytes([c16]) + struct.pack(">H", n)
    return bytes([c32]) + struct.pack(">I", n)


def _write(out: list[bytes], v: Any) -> None:
    if v is None:
        out.append(b"\xc0")
    elif v is True:
        out.append(b"\xc3")
    elif v is False:
        out.append(b"\xc2")
    elif isinstance(v, int):
        out.append(_int(v))
    elif isinstance(v, float):
        out.append(b"\xcb" + struct.pack(">d", v))
    elif isinstance(v, str):
        data = v.encode("utf-8")
        out.append(_raw_header(len(data) + 1) + bytes([PT_STRING]) + data)
    elif isinstance(v, (bytes, bytearray)):
        out.append(_raw_header(len(v) + 1) + bytes([PT_BLOB]) + bytes(v))
    elif isinstance(v, RawParticle):
        out.append(_raw_header(len(v.data) + 1) + bytes([v.ptype]) + v.data)
    elif isinstance(v, (list, tuple)):
        out.append(_container_header(len(v), 0x90, 0xDC, 0xDD))
        for item in v:
            _write(out, item)
    elif isinstance(v, dict):
        out.append(_container_header(len(v), 0x80, 0xDE, 0xDF))
        for key, item in v.items():
            _write(out, key)
            _write(out, item)
    elif isinstance(v, Ext):
        n = len(v.data)
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        if n in fixed:
            out.append(bytes([fixed[n], v.code]) + v.data)
        elif n < 0x100:
            out.append(bytes([0xC7, n, v.code]) + v.data)
        elif n < 0x10000:
            out.append(b"\xc8" + struct.pack(">H", n) + bytes([v.code]) + v.data)
        else:
            out.append(b"\xc9" + struct.pack(">I", n) + bytes([v.code]) + v.data)
    else:
        raise MsgpackError(f"cannot encode {type(v).__name__}")


def packb(value: Any) -> bytes:
    """Encode one value the way the Aerospike C client and server do."""
    out: list[bytes] = []
    _write(out, value)
    return b"".join(out)


# ---------------------------------------------------------------------------------------
# ordering (Aerospike's msgpack compare order: nil < bool < int < str < list < map < bytes
# < double), used to keep maps key-ordered like the server does for top-level map bins.


def _type_rank(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        return 1
    if isinstance(v, int):
        return 2
    if isinstance(v, str):
        return 3
    if isinstance(v, (list, tuple)):
        return 4
    if isinstance(v, dict):
        return 5
    if isinstance(v, (bytes, bytearray)):
        return 6
    if isinstance(v, float):
        return 7
    return 8


def sort_key(v: Any) -> tuple[Any, ...]:
    """A total order over decoded values that follows Aerospike's msgpack ordering."""
    rank = _type_rank(v)
    if rank == 0:
        return (rank,)
    if rank == 3:
        return (rank, v.encode("utf-8"))
    if rank == 4:
        return (rank, len(v), tuple(sort_key(x) for x in v))
    if rank == 5:
        return (rank, len(v), tuple((sort_key(k), sort_key(x)) for k, x in v.items()))
    if rank == 8:
        return (rank, repr(v))
    return (rank, v)


def key_ordered(m: dict[Any, Any]) -> dict[Any, Any]:
    """The same map with its keys in Aerospike key order."""
    return {k: m[k] for k in sorted(m, key=sort_key)}

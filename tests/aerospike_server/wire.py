"""Aerospike wire format: proto framing, the 22-byte as_msg header, fields, ops, particles.

Layout (big-endian throughout), as observed in shared/aerospike-wire-capture.txt:

* proto header, 8 bytes: version (2), type (1 INFO, 3 AS_MSG, 4 compressed AS_MSG),
  48-bit body size;
* as_msg header, 22 bytes: header_sz (22), info1, info2, info3, info4, result_code,
  generation (4), record_ttl (4), transaction_ttl (4), n_fields (2), n_ops (2);
* field: size (4, includes the type byte), type (1), data;
* op: size (4, everything after itself), op (1), particle type (1), flags (1),
  name length (1), name, value.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from . import msgpack_codec

PROTO_VERSION = 2
TYPE_INFO = 1
TYPE_ADMIN = 2
TYPE_MSG = 3
TYPE_MSG_COMPRESSED = 4

MSG_HEADER_SIZE = 22

# info1
INFO1_READ = 0x01
INFO1_GET_ALL = 0x02
INFO1_SHORT_QUERY = 0x04
INFO1_BATCH = 0x08
INFO1_GET_NOBINDATA = 0x20
INFO1_COMPRESS_RESPONSE = 0x80
# info2
INFO2_WRITE = 0x01
INFO2_DELETE = 0x02
INFO2_GENERATION = 0x04
INFO2_GENERATION_GT = 0x08
INFO2_DURABLE_DELETE = 0x10
INFO2_CREATE_ONLY = 0x20
INFO2_RESPOND_ALL_OPS = 0x80
# info3
INFO3_LAST = 0x01
INFO3_PARTITION_DONE = 0x04
INFO3_UPDATE_ONLY = 0x08
INFO3_CREATE_OR_REPLACE = 0x10
INFO3_REPLACE_ONLY = 0x20

# field types
FIELD_NAMESPACE = 0
FIELD_SET = 1
FIELD_KEY = 2
FIELD_DIGEST = 4
FIELD_TRID = 7
FIELD_SOCKET_TIMEOUT = 9
FIELD_RECORDS_PER_SECOND = 10
FIELD_PID_ARRAY = 11
FIELD_DIGEST_ARRAY = 12
FIELD_MAX_RECORDS = 13
FIELD_BVAL_ARRAY = 15
FIELD_INDEX_NAME = 21
FIELD_INDEX_RANGE = 22
FIELD_INDEX_CONTEXT = 23
FIELD_INDEX_EXPRESSION = 24
FIELD_INDEX_TYPE = 26
FIELD_QUERY_BINLIST = 40
FIELD_BATCH = 41
FIELD_BATCH_WITH_SET = 42
FIELD_FILTER_EXP = 43

# op types
OP_READ = 1
OP_WRITE = 2
OP_CDT_READ = 3
OP_CDT_MODIFY = 4
OP_INCR = 5
OP_EXP_READ = 7
OP_EXP_MODIFY = 8
OP_APPEND = 9
OP_PREPEND = 10
OP_TOUCH = 11
OP_BIT_READ = 12
OP_BIT_MODIFY = 13
OP_DELETE_ALL = 14
OP_HLL_READ = 15
OP_HLL_MODIFY = 16

# particle types
PT_NULL = 0
PT_INTEGER = 1
PT_DOUBLE = 2
PT_STRING = 3
PT_BLOB = 4
PT_BOOL = 17
PT_MAP = 19
PT_LIST = 20

# result codes
OK = 0
ERR_SERVER = 1
ERR_NOT_FOUND = 2
ERR_GENERATION = 3
ERR_PARAMETER = 4
ERR_RECORD_EXISTS = 5
ERR_INCOMPATIBLE_TYPE = 12
ERR_UNSUPPORTED_FEATURE = 16
ERR_ELEMENT_NOT_FOUND = 23
ERR_ELEMENT_EXISTS = 24
ERR_OP_NOT_APPLICABLE = 26
ERR_BATCH_MAX_REQUESTS = 151


class ProtocolError(ValueError):
    """A frame this server cannot parse."""


# ---------------------------------------------------------------------------------------
# proto framing


def proto_header(ptype: int, size: int) -> bytes:
    return struct.pack(">Q", (PROTO_VERSION << 56) | (ptype << 48) | size)


def parse_proto_header(header: bytes) -> tuple[int, int, int]:
    """Return (version, type, body size) of an 8-byte proto header."""
    (word,) = struct.unpack(">Q", header)
    return word >> 56, (word >> 48) & 0xFF, word & 0xFFFF_FFFF_FFFF


def frame(ptype: int, body: bytes) -> bytes:
    return proto_header(ptype, len(body)) + body


def decompress(body: bytes) -> tuple[int, bytes]:
    """Unwrap a type-4 body: 8-byte uncompressed size, then zlib of a whole proto frame."""
    if len(body) < 8:
        raise ProtocolError("compressed frame too short")
    inner = zlib.decompress(body[8:])
    _, ptype, size = parse_proto_header(inner[:8])
    if size != len(inner) - 8:
        raise ProtocolError("compressed frame: inner size mismatch")
    return ptype, inner[8:]


# ---------------------------------------------------------------------------------------
# as_msg


@dataclass
class Op:
    op: int
    particle_type: int
    name: str
    value: bytes
    flags: int = 0

    def encode(self) -> bytes:
        name = self.name.encode("utf-8")
        size = 4 + len(name) + len(self.value)
        return (
            struct.pack(">IBBBB", size, self.op, self.particle_type, self.flags, len(name))
            + name
            + self.value
        )


@dataclass
class AsMsg:
    info1: int = 0
    info2: int = 0
    info3: int = 0
    info4: int = 0
    result_code: int = 0
    generation: int = 0
    record_ttl: int = 0
    transaction_ttl: int = 0
    fields: list[tuple[int, bytes]] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def field(self, ftype: int) -> bytes | None:
        for t, data in self.fields:
            if t == ftype:
                return data
        return None

    def encode(self) -> bytes:
        parts = [
            struct.pack(
                ">BBBBBBIIIHH",
                MSG_HEADER_SIZE,
                self.info1,
                self.info2,
                self.info3,
                self.info4,
                self.result_code,
                self.generation,
                self.record_ttl,
                self.transaction_ttl,
                len(self.fields),
                len(self.ops),
            )
        ]
        for ftype, data in self.fields:
            parts.append(struct.pack(">IB", len(data) + 1, ftype) + data)
        parts.extend(op.encode() for op in self.ops)
        return b"".join(parts)


def parse_fields_and_ops(
    buf: bytes, pos: int, n_fields: int, n_ops: int
) -> tuple[list[tuple[int, bytes]], list[Op], int]:
    fields: list[tuple[int, bytes]] = []
    for _ in range(n_fields):
        if pos + 5 > len(buf):
            raise ProtocolError("truncated field header")
        size, ftype = struct.unpack_from(">IB", buf, pos)
        end = pos + 4 + size
        if size < 1 or end > len(buf):
            raise ProtocolError("bad field size")
        fields.append((ftype, bytes(buf[pos + 5 : end])))
        pos = end
    ops: list[Op] = []
    for _ in range(n_ops):
        if pos + 8 > len(buf):
            raise ProtocolError("truncated op header")
        size, op, ptype, flags, name_len = struct.unpack_from(">IBBBB", buf, pos)
        end = pos + 4 + size
        if size < 4 + name_len or end > len(buf):
            raise ProtocolError("bad op size")
        name = bytes(buf[pos + 8 : pos + 8 + name_len]).decode("utf-8", "replace")
        ops.append(Op(op, ptype, name, bytes(buf[pos + 8 + name_len : end]), flags))
        pos = end
    return fields, ops, pos


def parse_msg(body: bytes, pos: int = 0) -> tuple[AsMsg, int]:
    """Parse one as_msg starting at pos; return it and the position after it."""
    if pos + MSG_HEADER_SIZE > len(body):
        raise ProtocolError("truncated as_msg header")
    (hsz, info1, info2, info3, info4, rc, gen, rttl, tttl, n_fields, n_ops) = struct.unpack_from(
        ">BBBBBBIIIHH", body, pos
    )
    if hsz != MSG_HEADER_SIZE:
        raise ProtocolError(f"unexpected as_msg header size {hsz}")
    fields, ops, end = parse_fields_and_ops(body, pos + MSG_HEADER_SIZE, n_fields, n_ops)
    return AsMsg(info1, info2, info3, info4, rc, gen, rttl, tttl, fields, ops), end


def parse_msgs(body: bytes) -> list[AsMsg]:
    """Parse every as_msg in a body (batch and query responses hold several)."""
    out: list[AsMsg] = []
    pos = 0
    while pos < len(body):
        msg, pos = parse_msg(body, pos)
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------
# particles (bin values)


@dataclass(frozen=True)
class Particle:
    """A bin value as stored: the particle type and its decoded Python value."""

    ptype: int
    value: Any


def decode_particle(ptype: int, data: bytes) -> Particle:
    if ptype == PT_INTEGER:
        if len(data) != 8:
            raise ProtocolError("integer particle must be 8 bytes")
        return Particle(ptype, struct.unpack(">q", data)[0])
    if ptype == PT_DOUBLE:
        return Particle(ptype, struct.unpack(">d", data)[0])
    if ptype == PT_STRING:
        return Particle(ptype, data.decode("utf-8"))
    if ptype == PT_BOOL:
        return Particle(ptype, bool(data[0]) if data else False)
    if ptype == PT_MAP:
        value = msgpack_codec.unpackb(data)
        if not isinstance(value, dict):
            raise ProtocolError("map particle is not a msgpack map")
        return Particle(ptype, msgpack_codec.key_ordered(value))
    if ptype == PT_LIST:
        return Particle(ptype, msgpack_codec.unpackb(data))
    return Particle(ptype, bytes(data))  # blobs and anything opaque


def encode_particle(p: Particle) -> bytes:
    if p.ptype == PT_NULL:
        return b""
    if p.ptype == PT_INTEGER:
        return struct.pack(">q", p.value)
    if p.ptype == PT_DOUBLE:
        return struct.pack(">d", p.value)
    if p.ptype == PT_STRING:
        return p.value.encode("utf-8")
    if p.ptype == PT_BOOL:
        return b"\x01" if p.value else b"\x00"
    if p.ptype in (PT_MAP, PT_LIST):
        return msgpack_codec.packb(p.value)
    return bytes(p.value)


def particle_of(value: Any) -> Particle:
    """The particle a CDT result travels as (results are typed like the value)."""
    if value is None:
        return Particle(PT_NULL, None)
    if isinstance(value, bool):
        return Particle(PT_BOOL, value)
    if isinstance(value, int):
        return Particle(PT_INTEGER, value)
    if isinstance(value, float):
        return Particle(PT_DOUBLE, value)
    if isinstance(value, str):
        return Particle(PT_STRING, value)
    if isinstance(value, (bytes, bytearray)):
        return Particle(PT_BLOB, bytes(value))
    if isinstance(value, dict):
        return Particle(PT_MAP, value)
    if isinstance(value, (list, tuple)):
        return Particle(PT_LIST, list(value))
    if isinstance(value, msgpack_codec.RawParticle):
        return Particle(value.ptype, value.data)
    raise ProtocolError(f"no particle type for {type(value).__name__}")


def decode_user_key(data: bytes) -> Any:
    """The KEY field: particle type byte, then the value."""
    if not data:
        raise ProtocolError("empty key field")
    return decode_particle(data[0], data[1:]).value


# ---------------------------------------------------------------------------------------
# digests


def _ripemd160(data: bytes) -> bytes | None:
    try:
        return hashlib.new("ripemd160", data).digest()
    except (ValueError, TypeError):  # OpenSSL 3 without the legacy provider
        return None


def key_bytes(key: Any) -> tuple[int, bytes]:
    """The particle type and bytes the client hashes for a user key."""
    if isinstance(key, bool):
        raise TypeError("bool keys are not supported")
    if isinstance(key, int):
        return PT_INTEGER, struct.pack(">q", key)
    if isinstance(key, str):
        return PT_STRING, key.encode("utf-8")
    if isinstance(key, (bytes, bytearray)):
        return PT_BLOB, bytes(key)
    raise TypeError(f"unsupported key type {type(key).__name__}")


def compute_digest(ns: str, set_name: str, key: Any) -> bytes:
    """The client's RIPEMD-160 record digest: ripemd160(set + key particle type + key bytes).

    Uses hashlib when this OpenSSL has RIPEMD-160, else the installed aerospike client's
    ``calc_digest`` (the client is always present where this server is used).
    """
    ptype, data = key_bytes(key)
    digest = _ripemd160(set_name.encode("utf-8") + bytes([ptype]) + data)
    if digest is not None:
        return digest
    import aerospike  # optional fallback, imported only when needed

    return bytes(aerospike.calc_digest(ns, set_name, key))

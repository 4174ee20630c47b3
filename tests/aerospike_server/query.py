"""Partition scans and secondary-index queries (an as_msg with no digest field).

Request fields used: NAMESPACE, SET, PID_ARRAY (11: little-endian uint16 partition ids),
INDEX_NAME (21), INDEX_RANGE (22: count, then per range bin name, particle type, begin and
end values), INDEX_TYPE (26: 0 default, 1 list, 2 mapkeys, 3 mapvalues); bin-name READ ops
select bins, info1 GET_NOBINDATA drops them. The filter must match a secondary index created
through info ``sindex-create`` (else result 201 INDEX_NOT_FOUND, as a real server answers).

Each matching record comes back as an as_msg carrying namespace, set, user key (when stored)
and digest fields plus its bins; then a LAST frame. Not covered: resuming from DIGEST_ARRAY,
max_records, filter expressions, index contexts, UDF/background queries.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import batch, wire
from .info import SecondaryIndex

if TYPE_CHECKING:
    from .server import AerospikeTestServer
    from .store import Record

log = logging.getLogger(__name__)

ERR_INDEX_NOT_FOUND = 201
INDEX_TYPES = {0: "default", 1: "list", 2: "mapkeys", 3: "mapvalues"}


@dataclass(frozen=True)
class Range:
    bin: str
    ptype: int
    begin: Any
    end: Any

    def matches(self, value: Any) -> bool:
        if self.ptype == wire.PT_INTEGER:
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and self.begin <= value <= self.end
            )
        if self.ptype == wire.PT_STRING:
            return isinstance(value, str) and value == self.begin
        return False


def partition_id(digest: bytes) -> int:
    return (digest[0] | (digest[1] << 8)) & 0x0FFF


def parse_range(data: bytes) -> Range:
    if data[0] != 1:
        raise wire.ProtocolError("only single-range index filters are supported")
    pos = 1
    name_len = data[pos]
    name = data[pos + 1 : pos + 1 + name_len].decode()
    pos += 1 + name_len
    ptype = data[pos]
    pos += 1
    values = []
    for _ in range(2):
        (n,) = struct.unpack_from(">I", data, pos)
        values.append(wire.decode_particle(ptype, data[pos + 4 : pos + 4 + n]).value)
        pos += 4 + n
    return Range(name, ptype, values[0], values[1])


def _candidates(index_type: str, value: Any) -> list[Any]:
    if index_type == "default":
        return [value]
    if index_type == "list" and isinstance(value, list):
        return value
    if index_type == "mapkeys" and isinstance(value, dict):
        return list(value)
    if index_type == "mapvalues" and isinstance(value, dict):
        return list(value.values())
    return []


def _find_index(
    server: AerospikeTestServer,
    ns: str,
    set_name: str,
    rng: Range,
    index_type: str,
    index_name: str | None,
) -> SecondaryIndex | None:
    want_type = "numeric" if rng.ptype == wire.PT_INTEGER else "string"
    for ix in server.info.sindexes.values():
        if index_name and ix.name != index_name:
            continue
        if (
            ix.namespace == ns
            and ix.bin == rng.bin
            and ix.index_type == index_type
            and ix.bin_type == want_type
            and ix.set_name in ("", set_name)
        ):
            return ix
    return None


def _row(ns: str, digest: bytes, rec: Record, msg: wire.AsMsg) -> wire.AsMsg:
    fields = [(wire.FIELD_NAMESPACE, ns.encode())]
    if rec.set_name:
        fields.append((wire.FIELD_SET, rec.set_name.encode()))
    if rec.user_key is not None:
        ptype, data = wire.key_bytes(rec.user_key)
        fields.append((wire.FIELD_KEY, bytes([ptype]) + data))
    fields.append((wire.FIELD_DIGEST, digest))
    ops: list[wire.Op] = []
    if not msg.info1 & wire.INFO1_GET_NOBINDATA:
        wanted = {op.name for op in msg.ops if op.op == wire.OP_READ and op.name}
        for name, p in rec.bins.items():
            if not wanted or name in wanted:
                ops.append(wire.Op(wire.OP_READ, p.ptype, name, wire.encode_particle(p)))
    return wire.AsMsg(generation=rec.generation, record_ttl=rec.void_time, fields=fields, ops=ops)


def run(server: AerospikeTestServer, msg: wire.AsMsg) -> list[bytes]:
    if msg.info2 & wire.INFO2_WRITE or msg.field(wire.FIELD_FILTER_EXP) is not None:
        log.warning(
            "aerospike test server: background queries and filter expressions are not supported"
        )
        return [batch.last_frame(wire.ERR_UNSUPPORTED_FEATURE)]
    ns = (msg.field(wire.FIELD_NAMESPACE) or b"").decode()
    set_name = (msg.field(wire.FIELD_SET) or b"").decode()
    if ns not in server.namespaces:
        return [batch.last_frame(20)]
    pid_field = msg.field(wire.FIELD_PID_ARRAY)
    pids = set(struct.unpack(f"<{len(pid_field) // 2}H", pid_field)) if pid_field else None
    range_field = msg.field(wire.FIELD_INDEX_RANGE)
    rng: Range | None = None
    index_type = "default"
    if range_field is not None:
        rng = parse_range(range_field)
        type_field = msg.field(wire.FIELD_INDEX_TYPE)
        index_type = INDEX_TYPES.get(type_field[0] if type_field else 0, "default")
        name_field = msg.field(wire.FIELD_INDEX_NAME)
        if (
            _find_index(
                server, ns, set_name, rng, index_type, name_field.decode() if name_field else None
            )
            is None
        ):
            return [batch.last_frame(ERR_INDEX_NOT_FOUND)]
    rows: list[wire.AsMsg] = []
    for (rns, digest), rec in server.store.snapshot().items():
        if rns != ns or (set_name and rec.set_name != set_name):
            continue
        if pids is not None and partition_id(digest) not in pids:
            continue
        if rng is not None:
            p = rec.bins.get(rng.bin)
            if p is None or not any(rng.matches(v) for v in _candidates(index_type, p.value)):
                continue
        rows.append(_row(ns, digest, rec, msg))
    return batch.response_frames(rows)

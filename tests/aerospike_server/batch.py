"""Batch requests: field 41 (BATCH) of an as_msg with info1 BATCH.

Field layout: n_keys (4), parent flags (1), then per row: index (4), digest (20),
row flags (1) and, unless the row is a REPEAT of the previous one:

* row flags 0 (old READ row): info1 (1);
* INFO (0x02): info1, info2, info3 (3); INFO4 (0x10): info4 (1); GEN (0x04): generation (2);
  TTL (0x08): ttl (4);

then n_fields (2), n_ops (2), fields (namespace, set, optionally key/filter), ops.

The response is one frame of row messages (batch index in transaction_ttl, per-row result,
no fields), split into several frames when large, then a separate frame holding only
info3=LAST.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from . import wire
from .store import Command

ROW_REPEAT = 0x01
ROW_INFO = 0x02
ROW_GEN = 0x04
ROW_TTL = 0x08
ROW_INFO4 = 0x10

RESPONSE_FRAME_BYTES = 128 * 1024


@dataclass
class BatchRow:
    index: int
    command: Command


def parse_batch(data: bytes) -> list[BatchRow]:
    if len(data) < 5:
        raise wire.ProtocolError("batch field too short")
    (n_keys,) = struct.unpack_from(">I", data, 0)
    pos = 5  # skip parent flags
    rows: list[BatchRow] = []
    prev: Command | None = None
    for _ in range(n_keys):
        if pos + 25 > len(data):
            raise wire.ProtocolError("truncated batch row")
        (index,) = struct.unpack_from(">I", data, pos)
        digest = bytes(data[pos + 4 : pos + 24])
        flags = data[pos + 24]
        pos += 25
        if flags & ROW_REPEAT:
            if prev is None:
                raise wire.ProtocolError("REPEAT batch row without a previous row")
            rows.append(BatchRow(index, replace(prev, digest=digest, user_key=None)))
            continue
        info1 = info2 = info3 = 0
        generation = ttl = 0
        if flags & ROW_INFO:
            info1, info2, info3 = data[pos], data[pos + 1], data[pos + 2]
            pos += 3
        elif flags == 0:
            info1 = data[pos]
            pos += 1
        if flags & ROW_INFO4:
            pos += 1
        if flags & ROW_GEN:
            (generation,) = struct.unpack_from(">H", data, pos)
            pos += 2
        if flags & ROW_TTL:
            (ttl,) = struct.unpack_from(">I", data, pos)
            pos += 4
        n_fields, n_ops = struct.unpack_from(">HH", data, pos)
        fields, ops, pos = wire.parse_fields_and_ops(data, pos + 4, n_fields, n_ops)
        fmap = dict(fields)
        unsupported = [f"field {t}" for t in fmap if t == wire.FIELD_FILTER_EXP]
        key_field = fmap.get(wire.FIELD_KEY)
        prev = Command(
            info1=info1,
            info2=info2,
            info3=info3,
            namespace=fmap.get(wire.FIELD_NAMESPACE, b"").decode(),
            set_name=fmap.get(wire.FIELD_SET, b"").decode(),
            digest=digest,
            ops=ops,
            generation=generation,
            user_key=wire.decode_user_key(key_field) if key_field else None,
            ttl=ttl,
            unsupported=unsupported,
        )
        rows.append(BatchRow(index, prev))
    return rows


def response_frames(rows: list[wire.AsMsg]) -> list[bytes]:
    """Row messages grouped into proto frames, then the LAST frame."""
    frames: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for msg in rows:
        body = msg.encode()
        chunk.append(body)
        size += len(body)
        if size >= RESPONSE_FRAME_BYTES:
            frames.append(wire.frame(wire.TYPE_MSG, b"".join(chunk)))
            chunk, size = [], 0
    if chunk:
        frames.append(wire.frame(wire.TYPE_MSG, b"".join(chunk)))
    frames.append(last_frame(wire.OK))
    return frames


def last_frame(result_code: int) -> bytes:
    return wire.frame(
        wire.TYPE_MSG, wire.AsMsg(info3=wire.INFO3_LAST, result_code=result_code).encode()
    )

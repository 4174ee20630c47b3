"""The shared replica's index file: its format, owned here (docs/SHARED_REPLICA.md describes
it for readers in other languages; the segment files' format is sidecar/shm/_native.c's).

All integers little-endian. The index is one file, `DIR/index`, never shrunk or rewritten in
place except under its sequence number:

    0    8  magic b"SEGSHMI1"
    8    4  layout version (1)
    12   4  entry size (160)
    16   8  seq: a seqlock over the table (odd while the writer changes it)
    24   8  instance: random, new for every writer start (names the segment files)
    32   8  heartbeat: the writer's CLOCK_MONOTONIC in ms, every HEARTBEAT_S
    40   4  state: 1 open, 2 closed (the writer stopped, or moved to a new index file)
    44   4  capacity: entries the file has room for
    48   4  count: entries in use                 } the table: read between two equal,
    52  12  reserved                              } even values of seq
    64   .  count entries of 160 bytes            }

An entry: the segment id (128 bytes, ASCII, NUL-padded), then uint64 file number, version,
cardinality, updated_ms. A segment is listed exactly when the sidecar answers it locally
(`Replica.local`); its members are in `DIR/<instance as 16 hex digits>-<file number in
hex>.seg`, a file written once and never changed (a new version is a new file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SEGSHMI1"
LAYOUT = 1
HEADER = struct.Struct("<8sII Q Q Q II")  # magic, layout, entry size, seq, instance, beat, ...
SEQ_OFFSET = 16
INSTANCE_OFFSET = 24
HEARTBEAT_OFFSET = 32
STATE_OFFSET = 40
TABLE_OFFSET = 48  # the seqlocked part starts here
COUNT_OFFSET = 48
ENTRIES_OFFSET = 64
ENTRY = struct.Struct("<128sQQQQ")
ENTRY_SIZE = ENTRY.size
OPEN = 1
CLOSED = 2
INDEX_NAME = "index"
#: how often the writer stamps the heartbeat, and how old a reader lets it get before it
#: treats the writer as gone (its answers are then None and it tries to remap)
HEARTBEAT_S = 0.25
MAX_AGE_MS = 3000


@dataclass(frozen=True, slots=True)
class Entry:
    segment: str
    file: int
    version: int
    cardinality: int
    updated_ms: int


def segment_file(directory: str | Path, instance: int, file: int) -> Path:
    return Path(directory) / f"{instance:016x}-{file:x}.seg"


def header(capacity: int, instance: int, beat_ms: int) -> bytes:
    return HEADER.pack(MAGIC, LAYOUT, ENTRY_SIZE, 0, instance, beat_ms, OPEN, capacity)


def table(entries: list[Entry]) -> bytes:
    """The seqlocked part: count, reserved, then the entries."""
    out = [struct.pack("<I12x", len(entries))]
    for e in entries:
        out.append(
            ENTRY.pack(e.segment.encode("ascii"), e.file, e.version, e.cardinality, e.updated_ms)
        )
    return b"".join(out)


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(instance, state, capacity) of an index file's first 48 bytes; ValueError when it is
    not one this code reads."""
    magic, layout, entry_size, _seq, instance, _beat, state, capacity = HEADER.unpack_from(data)
    if magic != MAGIC or layout != LAYOUT or entry_size != ENTRY_SIZE:
        raise ValueError(f"not a layout {LAYOUT} shared-replica index")
    return instance, state, capacity


def parse_table(data: bytes) -> list[Entry]:
    """The entries of a table snapshot (from TABLE_OFFSET)."""
    (count,) = struct.unpack_from("<I", data)
    count = min(count, (len(data) - (ENTRIES_OFFSET - TABLE_OFFSET)) // ENTRY_SIZE)
    out = []
    for i in range(count):
        name, file, version, card, updated = ENTRY.unpack_from(
            data, ENTRIES_OFFSET - TABLE_OFFSET + i * ENTRY_SIZE
        )
        out.append(Entry(name.rstrip(b"\0").decode("ascii"), file, version, card, updated))
    return out

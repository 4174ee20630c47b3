"""Checkpoints: the replica's bitmaps, versions and delta offsets in one checksummed file.

`<state-dir>/checkpoint.seg` = b"SEGCKPT1" | sha256(payload) | payload (msgpack). Written to a
temporary file, fsynced and renamed over the old one, so a crash leaves either the old or the
new checkpoint, never a mix. A file whose checksum or log identity does not match is ignored
(the replica then bootstraps from the log).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from pyroaring import BitMap64

from .state import Age, SegmentState

log = logging.getLogger(__name__)

MAGIC = b"SEGCKPT1"
FILENAME = "checkpoint.seg"


@dataclass(slots=True)
class Checkpoint:
    log_id: str
    partitions: int
    offsets: dict[int, int]  # deltas partition -> next offset to read
    segments: dict[str, SegmentState]
    dropped: dict[str, int]
    written_ms: int = 0
    #: segments with a max_age_seconds: their max age and last affirmation (DESIGN "Freshness")
    ages: dict[str, Age] = field(default_factory=dict)


def save(state_dir: Path, ckpt: Checkpoint) -> int:
    """Write atomically; returns the file size."""
    state_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "format": 1,
        "log": ckpt.log_id,
        "partitions": ckpt.partitions,
        "offsets": ckpt.offsets,
        "segments": [
            [name, s.version, s.cardinality, s.updated_ms, s.bitmap.serialize()]
            for name, s in ckpt.segments.items()
            if s.fresh
        ],
        "dropped": ckpt.dropped,
        "ages": {name: [a.max_age_ms, a.heard_ms] for name, a in ckpt.ages.items()},
        "written_ms": int(time.time() * 1000),
    }
    payload = msgpack.packb(body, use_bin_type=True)
    tmp = state_dir / (FILENAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).digest())
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / FILENAME)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(payload) + len(MAGIC) + 32


def load(state_dir: Path, log_id: str) -> Checkpoint | None:
    """The stored checkpoint for this log, or None (absent, damaged, or another log's)."""
    path = state_dir / FILENAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    payload = memoryview(data)[40:]  # no copy of a checkpoint that may be 100s of MiB
    if data[:8] != MAGIC or hashlib.sha256(payload).digest() != data[8:40]:
        log.warning("ignoring %s: bad magic or checksum", path)
        return None
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if body.get("format") != 1:
            raise ValueError(f"unknown format {body.get('format')!r}")
        if body["log"] != log_id:
            log.warning("ignoring %s: it is of %s, not %s", path, body["log"], log_id)
            return None
        segments = {
            name: SegmentState(BitMap64.deserialize(bm), version, card, updated)
            for name, version, card, updated, bm in body["segments"]
        }
        return Checkpoint(
            log_id=body["log"],
            partitions=body["partitions"],
            offsets={int(p): o for p, o in body["offsets"].items()},
            segments=segments,
            dropped=dict(body["dropped"]),
            written_ms=body["written_ms"],
            # absent in checkpoints written before max ages: the next heartbeat sets them
            ages={name: Age(*pair) for name, pair in body.get("ages", {}).items()},
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None

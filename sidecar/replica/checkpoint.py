"""Checkpoints: the replica's bitmaps, versions and delta offsets in one checksummed file.

`<state-dir>/checkpoint.seg` = b"SEGCKPT1" | sha256(payload) | payload (msgpack). Written to a
temporary file, fsynced and renamed over the old one, so a crash leaves either the old or the
new checkpoint, never a mix. A file whose checksum or log identity does not match, or whose
offsets the log no longer holds (`restore`), is ignored: the reader then bootstraps from the log.
The replica and the publisher's state file (`RecoveredLog(state_dir=...)`) share this format;
`extra` carries what a writer needs beside the segments (its snapshot pacing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from pyroaring import BitMap64

from ..transport.base import LogReader
from . import forms
from .engine import Engine
from .expiry import ExpiryIndex
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
    #: TTL segments' expiry indexes (DESIGN "Freshness"): restored with their segment
    expiries: dict[str, ExpiryIndex] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # msgpack-able; readers may ignore it


def _dumped(state: SegmentState) -> list[Any]:
    data, form = forms.dump(state.bitmap)
    return [data] if form is None else [data, form]


def save(state_dir: Path, ckpt: Checkpoint) -> int:
    """Write atomically; returns the file size."""
    state_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "format": 1,
        "log": ckpt.log_id,
        "partitions": ckpt.partitions,
        "offsets": ckpt.offsets,
        # [name, version, cardinality, updated_ms, data] + [form] for a compact form
        "segments": [
            [name, s.version, s.cardinality, s.updated_ms, *_dumped(s)]
            for name, s in ckpt.segments.items()
            if s.fresh
        ],
        "dropped": ckpt.dropped,
        "ages": {name: [a.max_age_ms, a.heard_ms] for name, a in ckpt.ages.items()},
        "expiries": {
            name: [index.dropped_ms, [[at, bm.serialize()] for at, bm in index.pairs()]]
            for name, index in ckpt.expiries.items()
            if name in ckpt.segments and ckpt.segments[name].fresh
        },
        "written_ms": int(time.time() * 1000),
        "extra": ckpt.extra,
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
    ckpt = read(state_dir)
    return ckpt if ckpt is not None and is_of(ckpt, log_id, state_dir) else None


def is_of(ckpt: Checkpoint, log_id: str, state_dir: Path) -> bool:
    """Whether `ckpt` is of the log `log_id` (says why not)."""
    if ckpt.log_id != log_id:
        log.warning("ignoring %s: it is of %s, not %s", state_dir / FILENAME, ckpt.log_id, log_id)
        return False
    return True


def read(state_dir: Path) -> Checkpoint | None:
    """The stored checkpoint, whichever log's, or None (absent or damaged)."""
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
        segments = {
            name: SegmentState(forms.load(data, form[0] if form else None), version, card, updated)
            for name, version, card, updated, data, *form in body["segments"]
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
            # absent in checkpoints written before membership TTL
            expiries={
                name: ExpiryIndex.from_pairs(
                    ((at, BitMap64.deserialize(bm)) for at, bm in pairs), dropped_ms
                )
                for name, (dropped_ms, pairs) in body.get("expiries", {}).items()
            },
            extra=dict(body.get("extra") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def resume_offsets(
    engine: Engine, positions: dict[int, int], partition_of: Callable[[str], int]
) -> dict[int, int]:
    """Where a checkpoint of `engine` at `positions` resumes: a split delta still being
    assembled is read again from its first part."""
    offsets = {}
    for p, pos in positions.items():
        pending = engine.pending_offset(partition_of, p)
        offsets[p] = min(pos, pending) if pending is not None else pos
    return offsets


def restore(
    ckpt: Checkpoint,
    reader: LogReader,
    engine: Engine,
    holds: Callable[[str], bool] = lambda _segment: True,
) -> bool:
    """Install `ckpt` into `engine` when the log still holds every offset it resumes from (a
    log truncated, or with another partition count, is not this checkpoint's); False, having
    installed nothing, otherwise."""
    if ckpt.partitions != reader.partitions:
        log.warning("checkpoint is of %d partitions, the log has %d: full bootstrap",
                    ckpt.partitions, reader.partitions)  # fmt: skip
        return False
    marks = reader.watermarks_all("deltas")
    if set(ckpt.offsets) != set(marks):
        log.warning("checkpoint offsets cover partitions %s: full bootstrap", sorted(ckpt.offsets))
        return False
    for p, off in ckpt.offsets.items():
        low, end = marks[p]
        if off < low or off > end:
            log.warning(
                "checkpoint offset %d of deltas[%d] is gone (log holds %d..%d): full bootstrap",
                off,
                p,
                low,
                end,
            )
            return False
    for name, state in ckpt.segments.items():
        if holds(name):
            engine.install(name, state, expiries=ckpt.expiries.get(name))
    for name, version in ckpt.dropped.items():
        if holds(name):
            engine.install_drop(name, version)
    for name, age in ckpt.ages.items():
        if holds(name) and name in engine.segments:
            engine.ages[name] = age
    log.info("restored %d segments from the checkpoint", len(ckpt.segments))
    return True

"""Checkpoints: the replica's bitmaps, versions and delta offsets in one checksummed file.

`<state-dir>/checkpoint.seg` = b"SEGCKPT2" | sha256(rest) | rest, where rest = the segments'
members (`forms.dump` bytes: roaring's portable serialization, or a compact form; one after
another, in the order of the segment list) | the header (msgpack: names, versions, offsets,
each segment's byte length and form, expiry indexes) | the header's length (u32, big endian).
Members first, so a writer streams them out one segment at a time (no second copy of the
replica in memory) and a reader loads each from its place in the mapped file (no copy of a
file that may be GiBs); the checksum is computed beside that work, on the other core. Files
of the first format (b"SEGCKPT1" | sha256 | one msgpack map holding the bitmaps) are still
read. Written to a temporary file, fsynced and renamed over the old one, so a crash leaves
either the old or the new checkpoint, never a mix. A file whose checksum or log identity does
not match, or whose offsets the log no longer holds (`restore`), is ignored: the reader then
bootstraps from the log. The replica and the publisher's state file
(`RecoveredLog(state_dir=...)`) share this format; `extra` carries what a writer needs beside
the segments (its snapshot pacing).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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

MAGIC = b"SEGCKPT2"
MAGIC_V1 = b"SEGCKPT1"  # read, never written
FILENAME = "checkpoint.seg"
_HEAD = len(MAGIC) + 32  # magic and checksum
_TRAILER = 4  # the header's length


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


def save(state_dir: Path, ckpt: Checkpoint) -> int:
    """Write atomically; returns the file size."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fresh = [(name, s) for name, s in ckpt.segments.items() if s.fresh]
    tmp = state_dir / (FILENAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + bytes(32))  # the checksum, known at the end
        kinds: list[str | None] = []  # each segment's form (None: roaring)

        def dumped() -> Iterator[bytes]:
            for _, s in fresh:
                data, form = forms.dump(s.bitmap)
                kinds.append(form)
                yield data

        digest, lengths = _stream_bitmaps(f, dumped())
        header = msgpack.packb(
            {
                "format": 2,
                "log": ckpt.log_id,
                "partitions": ckpt.partitions,
                "offsets": ckpt.offsets,
                # [name, version, cardinality, updated_ms, bytes] + [form] for a compact form
                "segments": [
                    [name, s.version, s.cardinality, s.updated_ms, n, *([k] if k else [])]
                    for (name, s), n, k in zip(fresh, lengths, kinds, strict=True)
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
            },
            use_bin_type=True,
        )
        tail = header + len(header).to_bytes(_TRAILER, "big")
        f.write(tail)
        digest.update(tail)
        size = f.tell()
        f.seek(len(MAGIC))
        f.write(digest.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / FILENAME)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def _stream_bitmaps(f: Any, pieces: Iterable[bytes]) -> tuple[Any, list[int]]:
    """Write each piece to `f` and hash it, on a second thread (file writes and sha256
    release the GIL) while this one serializes the next (which holds it); at most a few
    serialized pieces wait in between. Returns (the sha256 so far, the byte lengths)."""
    digest = hashlib.sha256()
    pending: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
    failed: list[BaseException] = []

    def drain() -> None:
        while (piece := pending.get()) is not None:
            if not failed:
                try:
                    f.write(piece)
                    digest.update(piece)
                except BaseException as exc:  # re-raised on the calling thread
                    failed.append(exc)

    worker = threading.Thread(target=drain, name="checkpoint-writer", daemon=True)
    worker.start()
    lengths = []
    try:
        for piece in pieces:
            lengths.append(len(piece))
            pending.put(piece)
            if failed:
                break
    finally:
        pending.put(None)
        worker.join()
    if failed:
        raise failed[0]
    return digest, lengths


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
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEAD:
                log.warning("ignoring %s: bad magic or checksum", path)
                return None
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None
    view = memoryview(data)
    try:
        return _parse(path, view)
    finally:
        view.release()
        data.close()


def _parse(path: Path, data: memoryview) -> Checkpoint | None:
    magic, stored, payload = bytes(data[:8]), bytes(data[8:_HEAD]), data[_HEAD:]
    if magic not in (MAGIC, MAGIC_V1):
        log.warning("ignoring %s: bad magic or checksum", path)
        return None
    # the checksum is computed on another thread (sha256 releases the GIL) while this one
    # deserializes; nothing is returned before it is known to match
    digest: list[bytes] = []
    hasher = threading.Thread(
        target=lambda: digest.append(hashlib.sha256(payload).digest()), name="checkpoint-hash"
    )
    hasher.start()
    try:
        body, segments = _decode_v2(payload) if magic == MAGIC else _decode_v1(payload)
        ckpt = Checkpoint(
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
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        hasher.join()
        if digest[0] != stored:
            log.warning("ignoring %s: bad magic or checksum", path)
        else:
            log.warning("ignoring %s: %s", path, exc)
        return None
    finally:
        hasher.join()
        payload.release()
    if digest[0] != stored:
        log.warning("ignoring %s: bad magic or checksum", path)
        return None
    return ckpt


def _decode_v2(payload: memoryview) -> tuple[dict[str, Any], dict[str, SegmentState]]:
    if len(payload) < _TRAILER:
        raise ValueError("truncated")
    n = int.from_bytes(payload[-_TRAILER:], "big")
    if n > len(payload) - _TRAILER:
        raise ValueError("truncated")
    end = len(payload) - _TRAILER - n
    body = msgpack.unpackb(payload[end : end + n], raw=False, strict_map_key=False)
    if body.get("format") != 2:
        raise ValueError(f"unknown format {body.get('format')!r}")
    segments = {}
    at = 0
    for name, version, card, updated, length, *form in body["segments"]:
        if at + length > end:
            raise ValueError("bitmaps overrun the header")
        members = forms.load(payload[at : at + length], form[0] if form else None)
        segments[name] = SegmentState(members, version, card, updated)
        at += length
    if at != end:
        raise ValueError("bytes between the bitmaps and the header")
    return body, segments


def _decode_v1(payload: memoryview) -> tuple[dict[str, Any], dict[str, SegmentState]]:
    body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if body.get("format") != 1:
        raise ValueError(f"unknown format {body.get('format')!r}")
    segments = {
        name: SegmentState(forms.load(data, form[0] if form else None), version, card, updated)
        for name, version, card, updated, data, *form in body["segments"]
    }
    return body, segments


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

"""The embedded log: a local directory with the same records and guarantees as Kafka.

Layout: `meta.json` ({"format": 1, "partitions": N}) and `log`, one append-only file of
batches. A batch is one transaction: `b"SGB1" | length u32 | crc32 u32 | msgpack payload`,
the payload a list of `[topic, partition, key, value]`. Offsets are counted per
(topic, partition) in file order. A batch is visible only when complete and its checksum
matches, so a torn tail after a crash is never read; the next writer truncates it.
One writer at a time (an exclusive `flock` on `writer.lock`); any number of readers tail the
file. There is no retention or compaction: every record stays.

Damage is not a torn tail: when a valid batch follows bytes that are not one (flipped bytes
inside an earlier batch), committed history lies beyond them. Readers serve the intact prefix
and report the damage (`LogDirReader.damage()`); a writer refuses to open, and
`repair()` (`seg-publish --log-dir DIR --repair-log`) keeps the intact prefix only when told,
saving the rest beside the log and giving the log a new identity. A reader stats meta.json
on every poll and fails once the identity changed under it; a serving replica then bootstraps
again by itself (sidecar/replica/runner.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .base import (
    TOPICS,
    LogReader,
    LogRecord,
    LogWriter,
    NewLogIdentity,
    Topic,
    Transport,
    TransportError,
)

MAGIC = b"SGB1"
_HEADER = struct.Struct(">4sII")
_TOPIC_INDEX = {t: i for i, t in enumerate(TOPICS)}
DEFAULT_PARTITIONS = 4


def _read_meta(path: Path) -> tuple[int, str]:
    """(partitions, log id): the id is new each time a log directory is created."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise TransportError(f"{path} is not a log directory (no meta.json)") from None
    except (OSError, ValueError) as exc:
        raise TransportError(f"{path}/meta.json is unreadable: {exc}") from exc
    if meta.get("format") != 1 or type(meta.get("partitions")) is not int:
        raise TransportError(f"{path}/meta.json has an unknown format: {meta!r}")
    return meta["partitions"], str(meta.get("log_id", ""))


def _meta_stat(path: Path) -> tuple[int, int, int]:
    """What changes when meta.json is replaced (`repair()` writes a new one and renames it)."""
    try:
        st = os.stat(path / "meta.json")
    except OSError as exc:
        raise TransportError(f"{path}/meta.json is unreadable: {exc}") from exc
    return st.st_ino, st.st_mtime_ns, st.st_size


def _identity(path: Path, log_id: str) -> str:
    """`Transport.identity()` of the log directory at `path` with id `log_id`."""
    return f"log directory {path} id {log_id}"


def _batch(data: bytes, pos: int) -> tuple[int, list[list]] | None:
    """(end, entries) of the whole, valid batch starting at `pos`, or None: the checksum
    must match and the payload be a list of [topic, partition, key, value] entries (an empty
    payload has a zero checksum too)."""
    if pos + _HEADER.size > len(data):
        return None
    magic, length, crc = _HEADER.unpack_from(data, pos)
    start = pos + _HEADER.size
    if magic != MAGIC or start + length > len(data):
        return None
    if zlib.crc32(memoryview(data)[start : start + length]) != crc:
        return None
    try:
        entries = msgpack.unpackb(data[start : start + length], raw=False)
    except Exception:  # msgpack raises ValueError or its own errors
        return None
    if type(entries) is not list or not all(
        type(e) is list and len(e) == 4 and e[0] in (0, 1) and type(e[1]) is int for e in entries
    ):
        return None
    return start + length, entries


def _scan(data: bytes, pos: int) -> tuple[list[list], int]:
    """Parse whole, valid batches from `pos`; returns their entries and the next position."""
    out: list[list] = []
    while (batch := _batch(data, pos)) is not None:
        pos, entries = batch
        out.extend(entries)
    return out, pos


def _next_valid(data: bytes, pos: int) -> int | None:
    """Where the first whole, valid batch after `pos` starts, or None."""
    while (pos := data.find(MAGIC, pos + 1)) >= 0:
        if _batch(data, pos) is not None:
            return pos
    return None


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes that are not a valid batch with valid batches after them: committed history the
    intact prefix (bytes 0..`at`) does not hold. (Invalid bytes with nothing valid after them
    are a torn tail, not damage.)"""

    at: int  # where the intact prefix ends
    size: int  # of the log file
    kept_batches: int  # in the intact prefix
    dropped_batches: int  # valid batches after `at`
    dropped_records: int  # in those batches

    def __str__(self) -> str:
        return (
            f"damaged at byte {self.at} of {self.size}: {self.dropped_batches} valid batches "
            f"({self.dropped_records} records) follow bytes that are not a batch; readers see "
            f"only the {self.kept_batches} batches before byte {self.at}"
        )


def survey(data: bytes) -> tuple[int, Damage | None]:
    """(end of the intact prefix, the damage past it if any) of a whole log file."""
    kept, pos = 0, 0
    while (batch := _batch(data, pos)) is not None:
        kept, pos = kept + 1, batch[0]
    prefix = pos
    resume = _next_valid(data, pos)
    if resume is None:
        return prefix, None
    batches = records = 0
    pos = resume
    while True:
        while (batch := _batch(data, pos)) is not None:
            batches += 1
            pos, entries = batch
            records += len(entries)
        nxt = _next_valid(data, pos)
        if nxt is None:
            break
        pos = nxt
    return prefix, Damage(prefix, len(data), kept, batches, records)


def _lock(path: Path):  # type: ignore[no-untyped-def]
    """The writer lock of `path`, held until the returned file is closed."""
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / "writer.lock", "a+")  # noqa: SIM115 - held by the caller
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise TransportError(f"another writer holds the log directory {path}") from None
    return lock


def repair(path: str | os.PathLike[str]) -> str:
    """Keep the intact prefix of a damaged log directory: the bytes after it go to
    `log.damaged-<UTC time>` beside the log, the log gets a new identity (so no checkpoint of
    the old one is trusted). Returns what was done, in one line."""
    path = Path(path)
    _read_meta(path)
    lock = _lock(path)
    try:
        with open(path / "log", "r+b") as f:
            data = f.read()
            prefix, damage = survey(data)
            if prefix == len(data):
                return f"{path}: the log is intact ({prefix} bytes); nothing to repair"
            kept = path / f"log.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            with open(kept, "wb") as out:
                out.write(data[prefix:])
                out.flush()
                os.fsync(out.fileno())
            f.truncate(prefix)
            f.flush()
            os.fsync(f.fileno())
        if damage is None:
            return (
                f"{path}: dropped a torn tail of {len(data) - prefix} bytes (saved to "
                f"{kept.name}); no valid batch was lost"
            )
        meta = json.loads((path / "meta.json").read_text())
        meta["log_id"] = uuid.uuid4().hex
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path / "meta.json")
        return (
            f"{path}: kept the intact prefix ({damage.kept_batches} batches, {prefix} bytes); "
            f"dropped {damage.dropped_batches} valid batches ({damage.dropped_records} records) "
            f"and {len(data) - prefix} bytes in all, saved to {kept.name}; the log has a new "
            "identity (its running sidecars bootstrap again by themselves): re-run the last "
            "publishes to restore the dropped changes"
        )
    finally:
        lock.close()


class LogDirWriter(LogWriter):
    def __init__(self, path: Path, partitions: int) -> None:
        self._path = path
        self._lock = _lock(path)
        # The log file exists before meta.json, so a reader that sees meta.json can open it.
        self._fd = os.open(path / "log", os.O_RDWR | os.O_CREAT, 0o644)
        if (path / "meta.json").exists():
            self.partitions = _read_meta(path)[0]
        else:
            tmp = path / "meta.json.tmp"
            meta = {"format": 1, "partitions": partitions, "log_id": uuid.uuid4().hex}
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, path / "meta.json")
            self.partitions = partitions
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        valid_end, damage = survey(data)
        if damage is not None:  # never cut committed history on our own
            self.close()
            raise TransportError(
                f"log directory {path} is {damage}; nothing was written. To keep only the "
                f"intact prefix run `seg-publish --log-dir {path} --repair-log`"
            )
        if valid_end < len(data):  # a torn tail from a crash: never visible, now dropped
            os.ftruncate(self._fd, valid_end)
            os.fsync(self._fd)
        self._end = valid_end
        self._pending: list[list] | None = None

    def begin(self) -> None:
        if self._pending is not None:
            raise TransportError("a transaction is already open")
        self._pending = []

    def append(self, topic: Topic, partition: int, key: bytes | None, value: bytes | None) -> int:
        if self._pending is None:
            raise TransportError("append outside a transaction")
        if not 0 <= partition < self.partitions:
            raise TransportError(f"partition {partition} out of range 0..{self.partitions - 1}")
        self._pending.append([_TOPIC_INDEX[topic], partition, key, value])
        return len(key or b"") + len(value or b"")

    def commit(self) -> None:
        if self._pending is None:
            raise TransportError("commit outside a transaction")
        entries, self._pending = self._pending, None
        if not entries:
            return
        payload = msgpack.packb(entries, use_bin_type=True)
        batch = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        written = os.pwrite(self._fd, batch, self._end)
        if written != len(batch):
            raise TransportError(f"short write to {self._path}/log")
        os.fsync(self._fd)
        self._end += written

    def abort(self) -> None:
        self._pending = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._lock.close()


class LogDirReader(LogReader):
    _IDLE_SLEEP = 0.005

    def __init__(self, path: Path) -> None:
        self._path = path
        _read_meta(path)  # its errors first
        # the stat before the read: a file replaced in between is read again on the first poll
        self._meta_seen = _meta_stat(path)
        self.partitions, self._log_id = _read_meta(path)
        try:
            self._file = open(path / "log", "rb")  # noqa: SIM115 - held for our lifetime
        except OSError as exc:
            raise TransportError(f"cannot open {path}/log: {exc}") from exc
        self._assigned: dict[tuple[Topic, int], int] = {}
        self._reset()
        self._damage: Damage | None = None
        self._damage_seen_at = (-1, -1)  # (position, file size) the damage was looked for at
        # A separate counter over the whole file for watermarks.
        self._wm_pos = 0
        self._wm_counts: dict[tuple[Topic, int], int] = {}

    def _reset(self) -> None:
        self._pos = 0
        self._next: dict[tuple[Topic, int], int] = {}

    def _read_from(self, pos: int) -> bytes:
        self._file.seek(pos)
        return self._file.read()

    def watermarks(self, topic: Topic, partition: int) -> tuple[int, int]:
        entries, used = _scan(self._read_from(self._wm_pos), 0)
        self._wm_pos += used
        for t, p, _k, _v in entries:
            tp = (TOPICS[t], p)
            self._wm_counts[tp] = self._wm_counts.get(tp, 0) + 1
        return 0, self._wm_counts.get((topic, partition), 0)

    def assign(self, assignments: dict[tuple[Topic, int], int]) -> None:
        self._assigned = dict(assignments)
        self._reset()

    def position(self, topic: Topic, partition: int) -> int:
        tp = (topic, partition)
        return max(self._assigned.get(tp, 0), self._next.get(tp, 0))

    def identity(self) -> str:
        return _identity(self._path, self._log_id)

    def _check_identity(self) -> None:
        """TransportError once meta.json names another log than the one this reader opened
        (`repair()` gave it a new identity): offsets and versions may mean other changes now.
        One stat per poll; the file is read only when it was replaced."""
        seen = _meta_stat(self._path)
        if seen == self._meta_seen:
            return
        self._meta_seen = seen
        log_id = _read_meta(self._path)[1]
        if log_id != self._log_id:
            raise NewLogIdentity(
                f"{self._path} has a new identity (repaired?): its offsets may mean other "
                "records now; reading it again from the start"
            )

    def damage(self) -> str | None:
        return None if self._damage is None else f"log directory {self._path} is {self._damage}"

    def _look_for_damage(self, data: bytes, used: int) -> None:
        """Bytes past the last whole batch are usually a batch being written; they are damage
        when a valid batch follows them. Looked for once per (position, size)."""
        seen = (self._pos, self._pos + len(data))
        if seen == self._damage_seen_at:
            return
        self._damage_seen_at = seen
        if _next_valid(data, used) is None:
            return
        self._file.seek(0)
        self._damage = survey(self._file.read())[1]

    def poll(self, timeout: float) -> list[LogRecord]:
        deadline = time.monotonic() + timeout
        while True:
            self._check_identity()
            if os.fstat(self._file.fileno()).st_size < self._pos:
                # only a repair shrinks a log (meta.json's new identity may come a moment later)
                raise NewLogIdentity(
                    f"{self._path}/log shrank under this reader (repaired?): reading it again"
                )
            data = self._read_from(self._pos)
            entries, used = _scan(data, 0)
            self._pos += used
            if used < len(data):
                self._look_for_damage(data, used)
            out: list[LogRecord] = []
            for t, p, key, value in entries:
                tp = (TOPICS[t], p)
                offset = self._next.get(tp, 0)
                self._next[tp] = offset + 1
                start = self._assigned.get(tp)
                if start is not None and offset >= start:
                    out.append(LogRecord(tp[0], p, offset, key, value))
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(self._IDLE_SLEEP)

    def close(self) -> None:
        self._file.close()


class LogDirTransport(Transport):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def reader(self) -> LogDirReader:
        return LogDirReader(self.path)

    def writer(self, writer_id: str, partitions: int | None = None) -> LogDirWriter:
        return LogDirWriter(self.path, partitions or DEFAULT_PARTITIONS)

    def describe(self) -> str:
        return f"log directory {self.path}"

    def identity(self) -> str:
        return _identity(self.path, _read_meta(self.path)[1])

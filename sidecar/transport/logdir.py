"""The embedded log: a local directory with the same records and guarantees as Kafka.

Layout: `meta.json` ({"format": 1, "partitions": N}) and `log`, one append-only file of
batches. A batch is one transaction: `b"SGB1" | length u32 | crc32 u32 | msgpack payload`,
the payload a list of `[topic, partition, key, value]`. Offsets are counted per
(topic, partition) in file order. A batch is visible only when complete and its checksum
matches, so a torn tail after a crash is never read; the next writer truncates it.
One writer at a time (an exclusive `flock` on `writer.lock`); any number of readers tail the
file. There is no retention or compaction: every record stays.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import uuid
import zlib
from pathlib import Path

import msgpack

from .base import TOPICS, LogReader, LogRecord, LogWriter, Topic, Transport, TransportError

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


def _scan(data: bytes | memoryview, pos: int) -> tuple[list[list], int]:
    """Parse whole, valid batches from `pos`; returns their entries and the next position."""
    entries: list[list] = []
    end = len(data)
    while pos + _HEADER.size <= end:
        magic, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if magic != MAGIC or start + length > end:
            break
        payload = bytes(data[start : start + length])
        if zlib.crc32(payload) != crc:
            break
        entries.extend(msgpack.unpackb(payload, raw=False))
        pos = start + length
    return entries, pos


class LogDirWriter(LogWriter):
    def __init__(self, path: Path, partitions: int) -> None:
        self._path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / "writer.lock", "a+")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TransportError(f"another writer holds the log directory {path}") from None
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
        _, valid_end = _scan(data, 0)
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
        self.partitions = _read_meta(path)[0]
        try:
            self._file = open(path / "log", "rb")  # noqa: SIM115 - held for our lifetime
        except OSError as exc:
            raise TransportError(f"cannot open {path}/log: {exc}") from exc
        self._assigned: dict[tuple[Topic, int], int] = {}
        self._reset()
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

    def poll(self, timeout: float) -> list[LogRecord]:
        deadline = time.monotonic() + timeout
        while True:
            data = self._read_from(self._pos)
            entries, used = _scan(data, 0)
            self._pos += used
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
        return f"{self.describe()} id {_read_meta(self.path)[1]}"

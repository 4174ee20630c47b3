"""The log's state as a writer needs it (the publisher's contract with the replica code):
recovered from the log the way a replica bootstraps, kept current by reading on, and told of
the writer's own committed changes so the next write needs no re-read of them.

With a `state_dir` the state is also kept in a local file between runs (the replica's
checkpoint format, sidecar/replica/checkpoint.py): a file of this log (its identity) whose
offsets the log still holds is installed and only the log's records after them are read; any
other file (absent, damaged, of another log, of a truncated log) is ignored and the log is
replayed in full. The file only shortens the reading, it is never trusted over the log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..partitioner import partition_for
from ..record import Delta, Heartbeat
from ..transport.base import Transport, TransportError
from . import checkpoint
from .engine import Engine, LogObserver
from .expiry import ExpiryIndex
from .forms import Forms
from .recovery import SnapshotAssembler, bootstrap
from .state import SegmentState

log = logging.getLogger(__name__)


class StatefulObserver(LogObserver, Protocol):
    """An observer whose knowledge goes into the state file with the segments."""

    def export(self) -> Any:
        """What to keep (msgpack-able)."""

    def load(self, data: Any) -> None:
        """Take back what `export` gave (from a verified state file)."""


class _After:
    """Passes on the deltas of a segment newer than `covered[segment]`."""

    def __init__(
        self, observer: LogObserver, covered: dict[str, int], version_of: Callable[[str], int]
    ) -> None:
        self._observer, self._covered, self._version_of = observer, covered, version_of

    def snapshot(self, segment: str, version: int, chunks: int) -> None:
        self._observer.snapshot(segment, version, chunks)

    def delta(self, segment: str, changed: int) -> None:
        if self._version_of(segment) > self._covered.get(segment, 0):  # the applied version
            self._observer.delta(segment, changed)


class RecoveredLog:
    """`RecoveredLog(transport, observer=...)` reads the log's snapshots and deltas up to the
    end offsets seen now; `catch_up()` reads what was written since. `observer` is told every
    snapshot and applied delta (the publisher paces its snapshots by them)."""

    def __init__(
        self,
        transport: Transport,
        *,
        observer: StatefulObserver | None = None,
        progress: Callable[[str], None] | None = None,
        state_dir: str | Path | None = None,
        before_reading: Callable[[], None] | None = None,
    ) -> None:
        """`before_reading` is called once the state file is loaded, before the log is read
        (the publisher waits there for its writer, started meanwhile)."""
        self._engine = Engine(observer=observer, forms=Forms(None))  # diffed: roaring
        self._observer = observer
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._log_id = ""
        #: "state file" when the state came from a verified state file, else "log"
        self.recovered_from = "log"
        # the file is read (bitmaps deserialized) before the log is touched: a writer starting
        # meanwhile may create the log
        ckpt = checkpoint.read(self._state_dir) if self._state_dir is not None else None
        if ckpt is not None:
            try:  # a file means the log exists: ask its identity while the writer starts too
                self._log_id = transport.identity()
            except TransportError as exc:
                log.warning("state file not used: %s", exc)
                ckpt = None
        # with a file the log exists: the reader connects while the writer starts too
        early = transport.reader() if ckpt is not None else None
        try:
            if before_reading is not None:
                before_reading()
            self._reader = early or transport.reader()
        except BaseException:
            if early is not None:
                early.close()
            raise
        try:
            if self._state_dir is not None:
                # the identity of what the reader reads, when it knows it
                self._log_id = self._reader.identity() or self._log_id or transport.identity()
                if ckpt is not None and not checkpoint.is_of(ckpt, self._log_id, self._state_dir):
                    ckpt = None
            if ckpt is not None and self._resume(ckpt):
                self.recovered_from = "state file"
                if progress:
                    progress(f"state file: {len(ckpt.segments)} segments, then the log's tail")
            else:
                bootstrap(self._reader, self._engine, progress)
        except BaseException:
            self._reader.close()
            raise

    def _resume(self, ckpt: checkpoint.Checkpoint) -> bool:
        """Install a verified state file, then read the snapshots and deltas after it."""
        snapshot_offsets = {int(p): o for p, o in (ckpt.extra.get("snapshots") or {}).items()}
        marks = self._reader.watermarks_all("snapshots")
        if set(snapshot_offsets) != set(marks) or any(
            not marks[p][0] <= off <= marks[p][1] for p, off in snapshot_offsets.items()
        ):
            log.warning("state file's snapshot offsets are not in the log: full replay")
            return False
        if not checkpoint.restore(ckpt, self._reader, self._engine):
            return False
        observer = self._observer
        if observer is not None:
            observer.load(ckpt.extra.get("observer"))
            # snapshots written since (by another writer) tell the pacing their chunks; the
            # engine gets their changes from the deltas
            asm = SnapshotAssembler(self._engine.holds, self._engine.counters)
            # only partitions with new snapshots: the consumer's fetch of an assignment with
            # nothing to read is held by the broker (fetch.wait.max.ms), and the deltas'
            # first fetch would wait behind it
            ends = {
                ("snapshots", p): end for p, (_, end) in marks.items() if end > snapshot_offsets[p]
            }
            if ends:
                self._reader.assign({tp: snapshot_offsets[tp[1]] for tp in ends})
                for rec in self._reader.read_until(ends):
                    asm.add(rec)
            for snap in asm.complete.values():
                observer.snapshot(snap.segment, snap.version, snap.chunks)
            # as in a full replay, a delta a snapshot covers is no churn since it
            covered = {s.segment: s.version for s in asm.complete.values()}
            self._engine.observer = _After(observer, covered, self._engine.version_of)
        try:
            self._reader.assign({("deltas", p): off for p, off in ckpt.offsets.items()})
            self.catch_up()
        finally:
            self._engine.observer = observer
        return True

    # -- reading -----------------------------------------------------------------------------
    @property
    def segments(self) -> Mapping[str, SegmentState]:
        """Segment -> its state in the log (a stale or diverged one needs restating whole)."""
        return self._engine.segments

    def version_of(self, segment: str) -> int:
        """The segment's current version in the log (its drop's for a dropped one, else 0)."""
        return self._engine.version_of(segment)

    def max_age_of(self, segment: str) -> int:
        """The segment's max_age_seconds as its last heartbeat set it; 0 for none."""
        age = self._engine.ages.get(segment)
        return age.max_age_ms // 1000 if age is not None else 0

    def expiries_of(self, segment: str) -> ExpiryIndex | None:
        """The TTL segment's expiry index (None for a segment without one); the writer must
        not change it (`ExpiryIndex.copy` first)."""
        return self._engine.expiries.get(segment)

    def expire(self, now_ms: int) -> None:
        """Expire TTL memberships due at `now_ms` (a writer does it with the time it stamps on
        its records: their cardinalities count as of then)."""
        self._engine.expire(now_ms)

    def offsets(self) -> dict[int, int]:
        """Deltas partition -> the next offset: where a snapshot written now takes over."""
        return {p: self._reader.position("deltas", p) for p in range(self._reader.partitions)}

    # -- keeping current ---------------------------------------------------------------------
    def catch_up(self) -> None:
        """Read the deltas written since, up to the end offsets seen now."""
        marks = self._reader.watermarks_all("deltas")
        for rec in self._reader.read_until({("deltas", p): end for p, (_, end) in marks.items()}):
            self._engine.apply_record(rec)

    def wrote_delta(self, delta: Delta) -> None:
        """The writer's own committed delta."""
        self._engine.apply_delta(delta)

    def wrote_state(
        self, segment: str, state: SegmentState, expiries: ExpiryIndex | None = None
    ) -> None:
        """The writer's own committed snapshot (with a TTL segment's expiries); the engine
        keeps both and changes them in place later, so pass ones the caller does not hold."""
        self._engine.install(segment, state, expiries=expiries)

    def wrote_drop(self, segment: str, version: int) -> None:
        """The writer's own committed drop."""
        self._engine.install_drop(segment, version)

    def wrote_heartbeat(self, beat: Heartbeat) -> None:
        """The writer's own committed heartbeat."""
        self._engine.apply_heartbeat(beat)

    # -- the state file ----------------------------------------------------------------------
    def save_state(self) -> None:
        """Write the state file (with `state_dir`; call it with every change committed and told).
        A segment whose history is damaged is not in it, so none is written then (and an old
        one is removed): the next run replays the log in full."""
        if self._state_dir is None:
            return
        path = self._state_dir / checkpoint.FILENAME
        if any(not s.fresh for s in self._engine.segments.values()):
            path.unlink(missing_ok=True)
            return
        snapshots = {p: end for p, (_, end) in self._reader.watermarks_all("snapshots").items()}
        extra: dict[str, Any] = {"snapshots": snapshots}
        if self._observer is not None:
            extra["observer"] = self._observer.export()
        positions = self.offsets()
        checkpoint.save(
            self._state_dir,
            checkpoint.Checkpoint(
                log_id=self._log_id,
                partitions=self._reader.partitions,
                offsets=checkpoint.resume_offsets(self._engine, positions, self._partition_of),
                segments=dict(self._engine.segments),
                dropped=dict(self._engine.dropped),
                ages=dict(self._engine.ages),
                expiries=dict(self._engine.expiries),
                extra=extra,
            ),
        )

    def _partition_of(self, segment: str) -> int:
        return partition_for(segment, self._reader.partitions)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> RecoveredLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

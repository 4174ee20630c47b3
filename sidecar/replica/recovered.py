"""The log's state as a writer needs it (the publisher's contract with the replica code):
recovered from the log the way a replica bootstraps, kept current by reading on, and told of
the writer's own committed changes so the next write needs no re-read of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..record import Delta, Heartbeat
from ..transport.base import Transport
from .engine import Engine, LogObserver
from .recovery import bootstrap
from .state import SegmentState


class RecoveredLog:
    """`RecoveredLog(transport, observer=...)` reads the log's snapshots and deltas up to the
    end offsets seen now; `catch_up()` reads what was written since. `observer` is told every
    snapshot and applied delta (the publisher paces its snapshots by them)."""

    def __init__(
        self,
        transport: Transport,
        *,
        observer: LogObserver | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = Engine(observer=observer)
        self._reader = transport.reader()
        try:
            bootstrap(self._reader, self._engine, progress)
        except BaseException:
            self._reader.close()
            raise

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

    def wrote_state(self, segment: str, state: SegmentState) -> None:
        """The writer's own committed snapshot; the engine keeps `state` and changes its bitmap
        in place later, so pass one the caller does not hold."""
        self._engine.install(segment, state)

    def wrote_drop(self, segment: str, version: int) -> None:
        """The writer's own committed drop."""
        self._engine.install_drop(segment, version)

    def wrote_heartbeat(self, beat: Heartbeat) -> None:
        """The writer's own committed heartbeat."""
        self._engine.apply_heartbeat(beat)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> RecoveredLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

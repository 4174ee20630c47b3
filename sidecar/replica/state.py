"""What the replica holds for one segment, as the servers read it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroaring import BitMap64

T = TypeVar("T")

#: Why a segment is not answered locally, besides its Health value and "dropped"/"unknown"
NOT_READY = "not_ready"
NOT_HELD = "not_held"
#: read-your-publish: this replica has not reached the version asked for (or cannot answer yet)
BEHIND = "behind"
#: a segment with a max_age_seconds not republished (or heartbeaten) within it
STALE_AGE = "stale_age"


class Health(enum.Enum):
    FRESH = "fresh"  # complete and current: local answers are authoritative
    STALE = "stale"  # a version gap was seen: waiting for a resync
    DIVERGED = "diverged"  # the cardinality after an apply did not match: waiting for a resync


@dataclass(frozen=True, slots=True)
class SegmentState:
    """A change builds a new state and swaps it into the table in one assignment, so version,
    cardinality and health always belong together. The bitmap is the exception: a delta
    changes it in place (a copy would cost time in proportion to the segment, holding the
    GIL). Each bitmap operation runs under the GIL, so a reader on another thread sees any one
    user either before or after a change; readers must not iterate an engine bitmap outside
    the replica's thread unless they hold `Engine.lock` (sidecar/replica/view.py does), and
    whatever changes a bitmap in place must hold it.

    `bitmap` is in the form the engine chose by the segment's shape (sidecar/replica/forms.py):
    a BitMap64, or a compact immutable form with the same `in`, len() and to_array(); set
    algebra takes `sorted_ids.operands` (or `forms.to_bitmap(state.bitmap)`)."""

    bitmap: BitMap64 | Any
    version: int
    cardinality: int
    updated_ms: int
    health: Health = Health.FRESH

    @property
    def fresh(self) -> bool:
        return self.health is Health.FRESH


@dataclass(slots=True)
class Age:
    """A segment's `max_age_seconds` (as ms) and the publisher's time of the last publish
    that affirmed its current version (a change or a heartbeat)."""

    max_age_ms: int
    heard_ms: int

    @property
    def deadline_ms(self) -> int:
        return self.heard_ms + self.max_age_ms

    def passed(self, now_ms: int) -> bool:
        """The segment is stale by age at `now_ms`: not affirmed within its max age."""
        return now_ms > self.deadline_ms


@dataclass(slots=True)
class Counters:
    """Monotonic counts of what the engine did with the log; exported as metrics."""

    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    diverged: int = 0
    resyncs: int = 0
    #: full bootstraps of a serving replica whose log got a new identity (--repair-log)
    rebootstraps: int = 0
    unknown: int = 0
    corrupt: int = 0
    drops: int = 0
    ignored: int = 0  # records of segments this replica does not hold (--segments)
    heartbeats: int = 0  # heartbeats applied (segments with a max_age_seconds)
    expired: int = 0  # memberships dropped at their TTL expiry
    #: TTL deltas applied without their cardinality check: this replica's clock had already
    #: expired members past the delta's time (a lagging replica; DESIGN.md "Freshness")
    ttl_unchecked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    #: records skipped because they cannot be applied, by `RecordError.reason` (and the
    #: assembly checks: `parts_mismatch`, `chunks_mismatch`, `snapshot_cardinality`)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, *, unknown: bool = False) -> None:
        """Count one record that was not applied: unknown (a newer format or kind) or
        corrupt, and by reason."""
        if unknown:
            self.unknown += 1
        else:
            self.corrupt += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def retry_changed(read: Callable[[], T], attempts: int = 5) -> T:
    """`read()`, retried when the replica thread changed a dict it iterates (servers read
    the replica's tables from the event loop thread while the replica thread inserts)."""
    for _ in range(attempts - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()

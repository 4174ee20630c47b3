"""Membership TTL (DESIGN.md "Freshness"): the expiry index of one TTL segment.

Time-bucketed: one roaring bitmap per expiry deadline (whole seconds, `record.ttl_deadline`),
each member in exactly one bucket, the one of the latest publish that listed it (a shorter
`ttl_seconds` shortens a re-affirmed member's expiry too). Expiring drops whole buckets; the
segment's bitmap holds only live members, so a check stays one bitmap lookup. The engine
(engine.py) owns when buckets are applied and dropped; the publisher's plan uses the same
`affirm` to build the state a snapshot carries.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyroaring import BitMap64


class ExpiryIndex:
    __slots__ = ("buckets", "dropped_ms")

    def __init__(self, buckets: dict[int, BitMap64] | None = None, dropped_ms: int = 0) -> None:
        #: expires_at_ms -> the members expiring then (never empty)
        self.buckets: dict[int, BitMap64] = buckets if buckets is not None else {}
        #: the latest deadline whose bucket was dropped: a change stamped before it is applied
        #: to a state that already lost members the change's author still held
        self.dropped_ms = dropped_ms

    def copy(self) -> ExpiryIndex:
        return ExpiryIndex({at: BitMap64(b) for at, b in self.buckets.items()}, self.dropped_ms)

    def affirm(self, members: BitMap64, at: int) -> None:
        """`members` expire at `at` (and at no other deadline)."""
        if not members:
            return
        for deadline in [d for d in self.buckets if d != at]:
            bucket = self.buckets[deadline]
            bucket -= members
            if not bucket:
                del self.buckets[deadline]
        bucket = self.buckets.get(at)
        if bucket is None:
            self.buckets[at] = BitMap64(members)
        else:
            bucket |= members

    def take_due(self, now_ms: int) -> BitMap64 | None:
        """Remove the buckets whose deadline is at or before `now_ms`; their members (None
        when none was due)."""
        due = [d for d in self.buckets if d <= now_ms]
        if not due:
            return None
        self.dropped_ms = max(self.dropped_ms, *due)
        return BitMap64.union(*(self.buckets.pop(d) for d in due))

    def expires_at(self, user: int) -> int | None:
        for deadline, bucket in self.buckets.items():
            if user in bucket:
                return deadline
        return None

    def members(self) -> BitMap64:
        return BitMap64.union(*self.buckets.values()) if self.buckets else BitMap64()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpiryIndex) and self.buckets == other.buckets

    def __repr__(self) -> str:
        sizes = {d: len(b) for d, b in sorted(self.buckets.items())}
        return f"ExpiryIndex({sizes}, dropped_ms={self.dropped_ms})"

    # -- the snapshot and checkpoint form: [[expires_at_ms, roaring64 bytes], ...] ------------
    def pairs(self) -> list[tuple[int, BitMap64]]:
        return sorted(self.buckets.items())

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, BitMap64]], dropped_ms: int = 0) -> ExpiryIndex:
        """Buckets from (deadline, members) pairs, pieces of one deadline merged (the chunks
        of a snapshot each carry their id range's piece)."""
        buckets: dict[int, BitMap64] = {}
        for at, members in pairs:
            if not members:
                continue
            bucket = buckets.get(at)
            if bucket is None:
                buckets[at] = BitMap64(members)
            else:
                bucket |= members
        return cls(buckets, dropped_ms)

"""Engine.pin (the periodic checkpoint's state, serialized on another thread) against a model:
whatever deltas, TTL expiries and an adopted state do meanwhile, the pinned bitmaps stay as
they were taken (copy-on-write), and the engine's own answers follow the model throughout."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pyroaring import BitMap64

from sidecar.record import Delta
from sidecar.replica.engine import Engine
from sidecar.replica.forms import Forms
from sidecar.replica.state import Health, SegmentState

SEGMENTS = ["a", "b", "c"]
ids = st.sets(st.integers(0, 40) | st.sampled_from([2**40, 2**63, 2**64 - 1]), max_size=8)


class PinnedCheckpoint(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000
        self.engine = self._engine()
        #: segment -> {member: deadline ms, or 0 for permanent}
        self.model: dict[str, dict[int, int]] = {}
        #: what a checkpoint took: its states, and their members as taken
        self.taken: list[tuple[dict[str, SegmentState], dict[str, set[int]], dict[str, Any]]] = []

    def _engine(self) -> Engine:
        return Engine(clock_ms=lambda: self.now, forms=Forms(None))

    def _expire_model(self, now: int) -> None:
        for members in self.model.values():
            for user in [u for u, at in members.items() if at and at <= now]:
                del members[user]

    @rule(segment=st.sampled_from(SEGMENTS), add=ids, remove=ids, ttl_s=st.sampled_from([0, 1, 5]))
    def publish(self, segment: str, add: set[int], remove: set[int], ttl_s: int) -> None:
        """A delta as the publisher writes one: a TTL one adds or re-affirms (removes none);
        a plain one after TTL members lists them all, made permanent."""
        self._expire_model(self.now)  # the engine expires through the delta's ts first
        members = self.model.setdefault(segment, {})
        if ttl_s:
            remove = set()
            expires_at = self.now + ttl_s * 1000
            for user in add:
                members[user] = expires_at
        else:
            expires_at = 0
            if any(members.values()):
                add = add | set(members)
            for user in add:
                members[user] = 0
            for user in remove - add:
                members.pop(user, None)
            for user in members:
                members[user] = 0
            remove = remove - add
        version = self.engine.version_of(segment)
        self.engine.apply_delta(
            Delta(
                segment=segment,
                base=version,
                version=version + 1,
                add=BitMap64(add),
                remove=BitMap64(remove),
                cardinality=len(members),
                ts=self.now,
                expires_at=expires_at,
            )
        )

    @rule(ms=st.integers(1, 3000))
    def time_passes(self, ms: int) -> None:
        self.now += ms
        self.engine.expire()
        self._expire_model(self.now)

    @precondition(lambda self: not self.taken)
    @rule()
    def take(self) -> None:
        """As Replica._take_checkpoint: between two polls, under the lock."""
        engine = self.engine
        with engine.lock:
            segments = dict(engine.segments)
            engine.pin(segments.values())
            expiries = {n: i.copy() for n, i in engine.expiries.items()}
        as_taken = {n: set(s.bitmap) for n, s in segments.items()}
        self.taken.append((segments, as_taken, expiries))

    @precondition(lambda self: bool(self.taken))
    @rule()
    def written(self) -> None:
        self.engine.unpin()
        self.taken.clear()

    @rule(state=st.fixed_dictionaries({s: ids for s in SEGMENTS}))
    def adopt(self, state: dict[str, set[int]]) -> None:
        """A re-bootstrap built aside (plain segments, at versions of their own)."""
        fresh = self._engine()
        for name, members in state.items():
            if members:
                fresh.install(name, SegmentState(BitMap64(members), 7, len(members), self.now))
        self.engine.adopt(fresh)
        self.model = {n: dict.fromkeys(m, 0) for n, m in state.items() if m}

    @invariant()
    def pinned_bitmaps_stay_as_taken(self) -> None:
        for segments, as_taken, _ in self.taken:
            assert {n: set(s.bitmap) for n, s in segments.items()} == as_taken

    @invariant()
    def the_engine_answers_the_model(self) -> None:
        got = {n: set(s.bitmap) for n, s in self.engine.segments.items()}
        want = {n: set(m) for n, m in self.model.items() if n in got or m}
        assert got == want
        assert all(s.health is Health.FRESH for s in self.engine.segments.values())
        assert all(s.cardinality == len(s.bitmap) for s in self.engine.segments.values())


PinnedCheckpoint.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_pinned_checkpoint = PinnedCheckpoint.TestCase

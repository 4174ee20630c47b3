"""Membership TTL in the engine (DESIGN.md "Freshness"): the record fields, and a hypothesis
state machine of the engine's expiry index against a model `{member: expires_at}` on a test
clock: TTL publishes (adds and re-affirmations, some stamped before the replica's clock, as a
lagging replica receives them), plain publishes, drops, expiry steps, checkpoint and snapshot
round trips."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pyroaring import BitMap64

from publisher.plan import Change, records
from sidecar.record import (
    CorruptRecord,
    Delta,
    Drop,
    SnapshotChunk,
    decode,
    encode,
    ttl_deadline,
)
from sidecar.replica import checkpoint
from sidecar.replica.engine import Engine
from sidecar.replica.expiry import ExpiryIndex
from sidecar.replica.forms import nbytes
from sidecar.replica.recovery import SnapshotAssembler, install
from sidecar.replica.state import Counters
from sidecar.transport import LogDirTransport
from sidecar.transport.base import LogRecord

SEG = "ttl"
START = 1_800_000_000_000
_ids = st.one_of(st.integers(0, 200), st.integers(2**64 - 20, 2**64 - 1))
members = st.lists(_ids, max_size=20).map(BitMap64)

# -- the record ------------------------------------------------------------------------------------


def test_ttl_deadline_rounds_up_to_the_second() -> None:
    assert ttl_deadline(1_000, 2) == 3_000
    assert ttl_deadline(1_001, 2) == 4_000
    assert ttl_deadline(1_999, 1) == 3_000


@given(members, st.integers(0, 2**40), st.integers(1, 2**31 - 1))
def test_a_ttl_delta_round_trips(add: BitMap64, ts: int, ttl: int) -> None:
    delta = Delta(SEG, 3, 4, add, BitMap64(), len(add) + 5, ts, expires_at=ttl_deadline(ts, ttl))
    assert decode(encode(delta)) == delta
    plain = Delta(SEG, 3, 4, add, BitMap64(), len(add), ts)
    assert "expires_at" not in msgpack.unpackb(encode(plain))  # older readers see no change


def _body(record: Delta | SnapshotChunk, **changes: object) -> bytes:
    body = msgpack.unpackb(encode(record))
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


def test_bad_ttl_fields_are_corrupt() -> None:
    delta = Delta(SEG, 0, 1, BitMap64([1]), BitMap64(), 1, 5_000, expires_at=9_000)
    for bad in (-1, 5_000, 4_000, "9000", 2**63, 1.5):  # not after ts, not an integer, too big
        with pytest.raises(CorruptRecord) as exc:
            decode(_body(delta, expires_at=bad))
        assert exc.value.reason == "bad_expires_at"
    with pytest.raises(CorruptRecord, match="removes nothing"):
        decode(_body(delta, remove=BitMap64([2]).serialize()))
    chunk = SnapshotChunk(SEG, 1, 0, 1, BitMap64([1, 2]), 2, 0, 5_000, ((9_000, BitMap64([1])),))
    assert decode(encode(chunk), snapshots=True) == chunk
    outside = [[9_000, BitMap64([3]).serialize()]]
    twice = [[9_000, BitMap64([1]).serialize()], [9_000, BitMap64([2]).serialize()]]
    for bad in (outside, twice, [[4_000, BitMap64([1]).serialize()]], [[9_000]], {}, [[9_000, 1]]):
        with pytest.raises(CorruptRecord):
            decode(_body(chunk, expiries=bad), snapshots=True)


def test_the_index_keeps_each_member_in_its_latest_publishs_bucket() -> None:
    index = ExpiryIndex()
    index.affirm(BitMap64([1, 2]), 5_000)
    index.affirm(BitMap64([2, 3]), 9_000)
    index.affirm(BitMap64([3]), 7_000)  # a later publish with a shorter TTL: its deadline
    assert index.pairs() == [(5_000, BitMap64([1])), (7_000, BitMap64([3])), (9_000, BitMap64([2]))]
    assert index.take_due(6_999) == BitMap64([1]) and index.dropped_ms == 5_000
    assert index.take_due(6_999) is None
    assert index.expires_at(2) == 9_000 and index.expires_at(1) is None


# -- the state machine -------------------------------------------------------------------------


class ExpiryMachine(RuleBasedStateMachine):
    """`pub` is the publisher's view (expired through each publish's time), `rep` the
    replica's (expired through its own clock too). After every step the engine holds exactly
    `rep`'s members with `rep`'s expiries, fresh, and never counted a mismatch."""

    @initialize()
    def setup(self) -> None:
        self.now = START
        self.engine = Engine(clock_ms=lambda: self.now)
        self.pub: dict[int, int | None] = {}  # member -> expires_at, None: permanent
        self.rep: dict[int, int | None] = {}
        self.version = 0
        self.last_ts = START
        self.exists = False
        self.dir = Path(tempfile.mkdtemp(prefix="ttlm"))
        self.log = LogDirTransport(self.dir / "log")
        with self.log.writer("w", 1):
            pass

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _expire(model: dict[int, int | None], through: int) -> None:
        for m in [m for m, at in model.items() if at is not None and at <= through]:
            del model[m]

    def _ts(self, lag: int) -> int:
        # a publish stamped before the replica's clock (it reaches a lagging replica late);
        # publishes stay in order
        self.last_ts = max(self.last_ts, self.now - lag)
        return self.last_ts

    @rule(listed=members, ttl=st.integers(1, 5), lag=st.sampled_from([0, 700, 2_500, 10**9]))
    def ttl_publish(self, listed: BitMap64, ttl: int, lag: int) -> None:
        ts = self._ts(lag)
        at = ttl_deadline(ts, ttl)
        self._expire(self.pub, ts)
        for m in listed:
            self.pub[m] = at
        self._expire(self.rep, ts)
        for m in listed:
            self.rep[m] = at
        delta = Delta(SEG, self.version, self.version + 1, listed, BitMap64(), len(self.pub), ts,
                      expires_at=at)  # fmt: skip
        self.engine.apply_delta(decode(encode(delta)))  # type: ignore[arg-type]
        if at <= self.now:  # late: applied and expired in one step
            self._expire(self.rep, self.now)
        self.version += 1
        self.exists = True

    @rule(listed=members, lag=st.sampled_from([0, 700]))
    def plain_publish(self, listed: BitMap64, lag: int) -> None:
        ts = self._ts(lag)
        self._expire(self.pub, ts)
        old = BitMap64(self.pub)
        expiring = any(at is not None for at in self.pub.values())
        add = BitMap64(listed) if expiring else listed - old  # as plan.diff writes it
        delta = Delta(SEG, self.version, self.version + 1, add, old - listed, len(listed), ts)
        self.engine.apply_delta(delta)
        self.pub = dict.fromkeys(listed)
        self.rep = dict.fromkeys(listed)
        self.version += 1
        self.exists = True

    @rule()
    def drop(self) -> None:
        self.engine.apply_drop(Drop(SEG, self.version, self.version + 1, self._ts(0)))
        self.pub, self.rep, self.version, self.exists = {}, {}, self.version + 1, False

    @rule(ms=st.sampled_from([1, 300, 999, 1_000, 2_000, 4_000]))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule(ms=st.sampled_from([1_000, 2_000]))
    def advance_and_expire(self, ms: int) -> None:
        self.advance(ms)
        self.expire()

    @rule()
    def expire(self) -> None:
        before = dict(self.rep)
        changed = self.engine.expire()
        self._expire(self.rep, self.now)
        assert changed == ([SEG] if self.rep != before else [])

    @rule()
    def checkpoint_round_trip(self) -> None:
        """Save, read back into a new engine (its clock the same): nothing changes."""
        engine = self.engine
        ckpt = checkpoint.Checkpoint("id", 1, {0: 0}, dict(engine.segments), dict(engine.dropped),
                                     expiries=dict(engine.expiries))  # fmt: skip
        checkpoint.save(self.dir, ckpt)
        loaded = checkpoint.read(self.dir)
        assert loaded is not None
        fresh = Engine(clock_ms=lambda: self.now)
        with self.log.reader() as reader:
            assert checkpoint.restore(loaded, reader, fresh)
        fresh.counters = engine.counters
        self.engine = fresh

    @rule(max_bytes=st.sampled_from([16, 64, 900 * 1024]))
    def snapshot_round_trip(self, max_bytes: int) -> None:
        """A snapshot of the publisher's state (written with a publish, as of its time, cut
        into chunks of `max_bytes`), installed into a new engine as a cold start does."""
        if not self.exists:
            return
        ts = self.last_ts
        self._expire(self.pub, ts)
        index = ExpiryIndex.from_pairs(
            (at, BitMap64([m])) for m, at in self.pub.items() if at is not None
        )
        bitmap = BitMap64(self.pub)
        change = Change(SEG, self.version - 1, self.version, BitMap64(), BitMap64(), len(bitmap))
        change.snapshot, change.snapshot_expiries = bitmap, index
        asm = SnapshotAssembler(lambda _s: True, Counters())
        for i, (topic, p, key, value) in enumerate(records(change, 1, ts, {0: 0}, 0, max_bytes)):
            if topic == "snapshots":
                asm.add(LogRecord(topic, p, i, key, value))
        fresh = Engine(clock_ms=lambda: self.now)
        install(fresh, asm.complete[SEG])
        fresh.counters = self.engine.counters
        self.engine = fresh
        self.rep = dict(self.pub)  # the cold start holds the log's state, not yet expired

    @invariant()
    def holds_the_model(self) -> None:
        if not hasattr(self, "engine"):
            return
        engine = self.engine
        assert engine.counters.diverged == 0
        state = engine.segments.get(SEG)
        if not self.exists:
            assert state is None and SEG not in engine.expiries
            return
        assert state is not None and state.fresh
        assert state.bitmap == BitMap64(self.rep) and state.cardinality == len(self.rep)
        assert state.version == self.version
        for m, at in self.rep.items():
            assert engine.expires_at(SEG, m) == at
        index = engine.expiries.get(SEG)
        expiring = {m for m, at in self.rep.items() if at is not None}
        assert (index.members() if index is not None else BitMap64()) == BitMap64(expiring)
        nxt = engine.next_expiry()
        if expiring:  # the timer is due no later than the first live deadline
            assert nxt is not None and nxt <= min(at for at in self.rep.values() if at)


ExpiryMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExpiryMachine = ExpiryMachine.TestCase


def test_a_lagging_replica_skips_the_count_and_says_so() -> None:
    """Its clock expired a bucket the publisher still counted: the TTL delta applies
    unchecked (counted), and the members it re-affirms are back."""
    now = [10_000]
    engine = Engine(clock_ms=lambda: now[0])
    engine.apply_delta(Delta(SEG, 0, 1, BitMap64([1, 2]), BitMap64(), 2, 9_000, expires_at=11_000))
    now[0] = 11_500
    assert engine.expire() == [SEG] and len(engine.segments[SEG].bitmap) == 0
    # stamped at 10_900, when the publisher still held 1 and 2: it counts 3
    engine.apply_delta(Delta(SEG, 1, 2, BitMap64([2, 3]), BitMap64(), 3, 10_900, expires_at=13_000))
    state = engine.segments[SEG]
    assert state.fresh and state.bitmap == BitMap64([2, 3])
    assert engine.counters.ttl_unchecked == 1 and engine.counters.diverged == 0
    assert engine.counters.expired == 2


def test_a_delta_past_its_deadline_is_never_readable() -> None:
    """A lagging replica applies a TTL delta after its deadline: its members are not in the
    segment once apply_delta returns, without waiting for the next expire()."""
    engine = Engine(clock_ms=lambda: 20_000)
    engine.apply_delta(Delta(SEG, 0, 1, BitMap64([1, 2]), BitMap64(), 2, 9_000, expires_at=11_000))
    state = engine.segments[SEG]
    assert state.fresh and 1 not in state.bitmap and len(state.bitmap) == 0
    assert engine.counters.expired == 2 and engine.counters.diverged == 0
    engine.apply_delta(Delta(SEG, 1, 2, BitMap64([3]), BitMap64(), 1, 19_000, expires_at=21_000))
    assert 3 in engine.segments[SEG].bitmap


def test_a_late_delta_is_judged_at_one_moment() -> None:
    """The clock moves while a late delta is applied (a loaded host): its members go as of
    the moment it was found late, and a member whose deadline comes after that moment stays
    until an `expire` reaches it."""
    ticks = iter([10_000, 12_000, 16_000])  # each read of the clock is a later moment
    engine = Engine(clock_ms=lambda: next(ticks))
    engine.apply_delta(Delta(SEG, 0, 1, BitMap64([1]), BitMap64(), 1, 9_000, expires_at=15_000))
    # stamped 10_000 with a 1 s TTL, applied at 12_000: late; 1 is due only at 15_000
    engine.apply_delta(Delta(SEG, 1, 2, BitMap64([2]), BitMap64(), 2, 10_000, expires_at=11_000))
    state = engine.segments[SEG]
    assert state.fresh and state.bitmap == BitMap64([1]) and state.cardinality == 1
    assert engine.expires_at(SEG, 1) == 15_000 and engine.counters.expired == 1
    assert engine.expire() == [SEG] and len(engine.segments[SEG].bitmap) == 0  # at 16_000


def test_a_split_ttl_delta_applies_whole_with_its_expiry() -> None:
    """A TTL delta cut into parts (as a large publish is) carries `expires_at` in every part;
    the engine applies it once all parts are in, and a part disagreeing on it is refused."""
    listed = BitMap64(range(0, 40_000, 3))
    change = Change(SEG, 0, 1, listed, BitMap64(), len(listed), expires_at_ms=START + 5_000)
    written = records(change, 1, START, {0: 0}, 0, max_bytes=2_000)
    parts = [LogRecord(t, p, i, k, v) for i, (t, p, k, v) in enumerate(written) if t == "deltas"]
    assert len(parts) > 2
    engine = Engine(clock_ms=lambda: START)
    for rec in parts[:-1]:
        engine.apply_record(rec)
        assert SEG not in engine.segments  # half a change is never applied
    engine.apply_record(parts[-1])
    assert engine.segments[SEG].bitmap == listed and engine.segments[SEG].fresh
    assert engine.expiries[SEG].pairs() == [(START + 5_000, listed)]
    assert engine.bitmap_bytes() >= 2 * nbytes(listed)  # the bucket is memory too
    other = Engine()
    first = decode(parts[0].value)  # type: ignore[arg-type]
    assert isinstance(first, Delta)
    other.apply_delta(first, 0)
    other.apply_delta(replace(decode(parts[1].value), expires_at=START + 9_000), 1)  # type: ignore[arg-type]
    assert other.counters.skipped == {"parts_mismatch": 1} and SEG not in other.segments

"""The checkpoint file (sidecar/replica/checkpoint.py): what `save` writes `read` gives back
exactly (format 2: bitmaps streamed first, the header last); files of the first format are
still read; any damage (a flipped byte anywhere, a cut) is ignored as a whole, never half
trusted; a failed write leaves the old file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.replica import checkpoint
from sidecar.replica.checkpoint import FILENAME, MAGIC_V1, Checkpoint
from sidecar.replica.state import Age, Health, SegmentState

ids = st.integers(min_value=0, max_value=2**64 - 1)
bitmaps = st.one_of(
    st.sets(ids, max_size=40).map(BitMap64),
    st.tuples(st.integers(0, 2**40), st.integers(1, 200_000)).map(
        lambda a: BitMap64(range(a[0], a[0] + a[1]))  # runs and bitsets, many containers
    ),
)
names = st.text("abcxyz-_.0123456789", min_size=1, max_size=12)


@st.composite
def checkpoints(draw: st.DrawFn) -> Checkpoint:
    segs = draw(st.dictionaries(names, bitmaps, max_size=6))
    segments = {
        n: SegmentState(b, draw(st.integers(1, 2**40)), len(b), draw(st.integers(0, 2**45)))
        for n, b in segs.items()
    }
    return Checkpoint(
        log_id=draw(st.text(max_size=30)),
        partitions=draw(st.integers(1, 64)),
        offsets=draw(st.dictionaries(st.integers(0, 63), st.integers(0, 2**62), max_size=4)),
        segments=segments,
        dropped=draw(st.dictionaries(names, st.integers(1, 2**40), max_size=3)),
        ages={
            n: Age(draw(st.integers(1, 2**40)), draw(st.integers(0, 2**45)))
            for n in draw(st.sets(st.sampled_from(sorted(segs) or ["x"]), max_size=3))
        },
        extra=draw(
            st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3)
        ),
    )


def _same(a: Checkpoint, b: Checkpoint | None) -> None:
    assert b is not None
    assert (a.log_id, a.partitions, a.offsets, a.dropped, a.ages, a.extra) == (
        b.log_id,
        b.partitions,
        b.offsets,
        b.dropped,
        b.ages,
        b.extra,
    )
    assert set(a.segments) == set(b.segments)
    for name, s in a.segments.items():
        t = b.segments[name]
        assert (s.version, s.cardinality, s.updated_ms) == (t.version, t.cardinality, t.updated_ms)
        assert s.bitmap == t.bitmap


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ckpt=checkpoints())
def test_what_is_saved_is_read_back(tmp_path: Path, ckpt: Checkpoint) -> None:
    size = checkpoint.save(tmp_path, ckpt)
    assert size == (tmp_path / FILENAME).stat().st_size
    _same(ckpt, checkpoint.read(tmp_path))


def test_unhealthy_segments_are_not_saved(tmp_path: Path) -> None:
    good = SegmentState(BitMap64([1, 2]), 3, 2, 0)
    bad = SegmentState(BitMap64([5]), 4, 1, 0, Health.STALE)
    checkpoint.save(tmp_path, Checkpoint("log", 1, {0: 7}, {"a": good, "b": bad}, {}))
    back = checkpoint.read(tmp_path)
    assert back is not None and set(back.segments) == {"a"}


def _v1_file(path: Path, ckpt: Checkpoint) -> None:
    """A file as the first format wrote it (one msgpack map, bitmaps inside)."""
    body = {
        "format": 1,
        "log": ckpt.log_id,
        "partitions": ckpt.partitions,
        "offsets": ckpt.offsets,
        "segments": [
            [n, s.version, s.cardinality, s.updated_ms, s.bitmap.serialize()]
            for n, s in ckpt.segments.items()
        ],
        "dropped": ckpt.dropped,
        "ages": {n: [a.max_age_ms, a.heard_ms] for n, a in ckpt.ages.items()},
        "written_ms": 5,
        "extra": ckpt.extra,
    }
    payload = msgpack.packb(body, use_bin_type=True)
    path.write_bytes(MAGIC_V1 + hashlib.sha256(payload).digest() + payload)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ckpt=checkpoints())
def test_a_first_format_file_is_still_read(tmp_path: Path, ckpt: Checkpoint) -> None:
    _v1_file(tmp_path / FILENAME, ckpt)
    _same(ckpt, checkpoint.read(tmp_path))


def _sample() -> Checkpoint:
    segments = {
        "dense": SegmentState(BitMap64(range(2**33, 2**33 + 300_000)), 4, 300_000, 9),
        "sparse": SegmentState(BitMap64([3, 2**40, 2**63 + 5]), 2, 3, 8),
    }
    return Checkpoint("log", 2, {0: 1, 1: 2}, segments, {"gone": 3}, ages={"dense": Age(60, 1)})


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), v1=st.booleans())
def test_a_flipped_bit_anywhere_is_ignored(
    tmp_path: Path, where: float, bit: int, v1: bool
) -> None:
    path = tmp_path / FILENAME
    if v1:
        _v1_file(path, _sample())
    else:
        checkpoint.save(tmp_path, _sample())
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    path.write_bytes(bytes(data))
    assert checkpoint.read(tmp_path) is None


@pytest.mark.parametrize("keep", [0, 1, 8, 39, 40, 41, 44, -1, -4, -5, -100])
def test_a_cut_file_is_ignored(tmp_path: Path, keep: int) -> None:
    checkpoint.save(tmp_path, _sample())
    path = tmp_path / FILENAME
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    assert checkpoint.read(tmp_path) is None


def test_a_good_checksum_over_a_bad_layout_is_ignored(tmp_path: Path) -> None:
    """A header length pointing past the file, written with a matching checksum."""
    for rest in (b"\xff\xff\xff\xff", b"", msgpack.packb({"format": 2}) + b"\0\0\0\x09"):
        path = tmp_path / FILENAME
        path.write_bytes(checkpoint.MAGIC + hashlib.sha256(rest).digest() + rest)
        assert checkpoint.read(tmp_path) is None


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _sample())

    class Broken:
        fresh = True
        version, cardinality, updated_ms = 1, 1, 0

        @property
        def bitmap(self) -> BitMap64:
            raise OSError("disk gone")

    bad = _sample()
    bad.segments["broken"] = Broken()  # type: ignore[assignment]
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.save(tmp_path, bad)
    _same(_sample(), checkpoint.read(tmp_path))


def test_compact_segments_and_expiry_indexes_are_read_back(tmp_path: Path) -> None:
    """A segment in the compact form (sidecar/replica/forms.py) keeps its form; a TTL
    segment's expiry index comes back with it."""
    import random

    from sidecar.replica.expiry import ExpiryIndex
    from sidecar.replica.forms import Forms

    rng = random.Random(5)
    sparse = BitMap64(rng.randrange(2**64) for _ in range(6000))
    members = Forms().settle(sparse, 3)
    if type(members) is BitMap64:
        pytest.skip("the C extension is not built: no compact form here")
    ckpt = _sample()
    ckpt.segments["spread"] = SegmentState(members, 3, len(sparse), 7)
    index = ExpiryIndex.from_pairs([(10_000, BitMap64([3])), (20_000, BitMap64([2**40]))], 5)
    ckpt.expiries = {"sparse": index}
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.read(tmp_path)
    assert back is not None
    got = back.segments["spread"].bitmap
    assert type(got) is type(members) and list(got.to_array()) == list(sparse.to_array())
    assert back.expiries == {"sparse": index}
    assert back.segments["dense"].bitmap == ckpt.segments["dense"].bitmap


def test_a_periodic_checkpoint_that_fails_to_write_stops_nothing(tmp_path: Path) -> None:
    """The periodic checkpoint's writer thread raising (here: its temporary file cannot be
    created) leaves the old file, the replica serving and tailing, and the next interval
    writes the state of then; a restart from it answers as the running replica."""
    import time

    from publisher import Publisher
    from sidecar.transport import LogDirTransport
    from tests.logtools import started_replica

    def until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    transport = LogDirTransport(tmp_path / "log")
    publisher = Publisher(transport, partitions=2)
    publisher.publish({"a": BitMap64([1])})
    state = tmp_path / "state"
    (state / (FILENAME + ".tmp")).mkdir(parents=True)  # open(tmp, "wb") fails
    options = {"poll_interval": 0.01, "state_dir": state, "checkpoint_interval": 0.05}
    with started_replica(transport, **options) as r:  # type: ignore[arg-type]
        assert r.wait_ready(30), r.status()
        time.sleep(0.3)  # several intervals, each write failing
        assert r.checkpoints_written == 0 and not (state / FILENAME).exists()
        publisher.publish({"a": BitMap64([1, 2]), "b": BitMap64([7])})
        until(lambda: r.contains(7, "b") is True, "the tail goes on")
        assert r.error is None and r._thread is not None and r._thread.is_alive()
        (state / (FILENAME + ".tmp")).rmdir()
        until(lambda: r.checkpoints_written >= 1, "a checkpoint once the write can succeed")
        r.stop(save=False)
        saved = checkpoint.read(state)
        assert saved is not None
        assert {n: list(s.bitmap) for n, s in saved.segments.items()} == {"a": [1, 2], "b": [7]}
    with started_replica(transport, poll_interval=0.01, state_dir=state) as again:
        assert again.wait_ready(30) and again.started_from == "checkpoint"
        assert [again.contains(u, "a") for u in (1, 2, 3)] == [True, True, False]

"""The publisher (publisher/): diffing against the log, versions, drops, snapshot cadence,
chunked snapshots and split deltas, input validation, and crash safety at every failpoint
(a SIGKILLed publish re-run converges: versions neither skipped nor repeated)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from pyroaring import BitMap64

from publisher import InputError, Publisher, SnapshotPolicy, read_segment_set
from publisher.cli import main as publish_main
from publisher.publish import FAULT_ENV, FAULT_POINTS
from sidecar.record import (
    MAX_RECORD_BITMAP_BYTES,
    Delta,
    Drop,
    DropMarker,
    SnapshotChunk,
    decode,
)
from sidecar.replica import Health, Replica
from sidecar.replica.forms import to_bitmap
from sidecar.transport import LogDirTransport, Transport, TransportError
from tests.logtools import ready_replica, started_replica

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 3
WAIT = 30.0


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def log(tmp_path: Path) -> LogDirTransport:
    return LogDirTransport(tmp_path / "log")


def _writer_id(transport: Transport) -> str:
    prefix = getattr(transport, "prefix", "logdir")
    return f"{prefix}-publisher"


def publisher(transport: Transport, **policy: object) -> Publisher:
    return Publisher(
        transport,
        writer_id=_writer_id(transport),
        partitions=PARTITIONS,
        policy=SnapshotPolicy(**policy),  # type: ignore[arg-type]
    )


def log_ends(transport: Transport) -> dict[tuple[str, int], int]:
    with transport.reader() as reader:
        return {
            (t, p): reader.watermarks(t, p)[1]  # type: ignore[arg-type]
            for t in ("deltas", "snapshots")
            for p in range(reader.partitions)
        }


def read_log(transport: Transport) -> list[tuple[str, int, int, bytes | None, object]]:
    """Every committed record: (topic, partition, offset, key, decoded value or None)."""
    out = []
    with transport.reader() as reader:
        ends = {
            (t, p): reader.watermarks(t, p)[1]  # type: ignore[arg-type]
            for t in ("deltas", "snapshots")
            for p in range(reader.partitions)
        }
        reader.assign(dict.fromkeys(ends, 0))  # type: ignore[arg-type]
        deadline = time.monotonic() + WAIT
        while any(reader.position(*tp) < end for tp, end in ends.items()):  # type: ignore[arg-type]
            for r in reader.poll(0.1):
                value = None if r.value is None else decode(r.value, snapshots=r.topic != "deltas")
                out.append((r.topic, r.partition, r.offset, r.key, value))
            assert time.monotonic() < deadline, "could not read the log to its end"
    return out


def deltas_of(records: list, segment: str) -> list[Delta | Drop]:
    return [
        v
        for topic, *_rest, v in records
        if topic == "deltas" and isinstance(v, Delta | Drop) and v.segment == segment
    ]


def snapshots_of(records: list, segment: str) -> list[SnapshotChunk | DropMarker]:
    return [
        v
        for topic, *_rest, v in records
        if topic == "snapshots"
        and isinstance(v, SnapshotChunk | DropMarker)
        and v.segment == segment
    ]


def assert_version_chain(records: list) -> None:
    """Per segment, the changes in the deltas topic form one chain 0 -> 1 -> 2 ...: no version
    skipped, none written twice (split parts of one change count once)."""
    segments = {v.segment for topic, *_r, v in records if topic == "deltas" and v is not None}
    for seg in segments:
        changes = []
        for d in deltas_of(records, seg):
            if isinstance(d, Delta) and d.part > 0:
                continue
            changes.append((d.base, d.version))
        expected = [(i, i + 1) for i in range(len(changes))]
        assert changes == expected, f"{seg}: {changes}"


def cold_answers(transport: Transport) -> tuple[dict[str, tuple[int, BitMap64]], dict[str, int]]:
    """What a freshly started replica holds: segment -> (version, members), and drops."""
    with ready_replica(transport, WAIT) as replica:
        deadline = time.monotonic() + WAIT
        while replica.engine.needs_resync or any(
            not s.fresh for s in list(replica.engine.segments.values())
        ):
            assert time.monotonic() < deadline, replica.status()
            time.sleep(0.01)
        assert replica.error is None
        segments = {
            s: (st.version, to_bitmap(st.bitmap)) for s, st in replica.engine.segments.items()
        }
        return segments, dict(replica.engine.dropped)


def rnd_bitmap(seed: int, n: int, top: int = 2**64) -> BitMap64:
    rnd = random.Random(seed)
    return BitMap64(rnd.randrange(0, top) for _ in range(n))


# -- identical republish, prune, drop ------------------------------------------------------------


def test_first_publish_versions_and_records(log: LogDirTransport) -> None:
    pub = publisher(log)
    result = pub.publish({"a": BitMap64([1, 2]), "b": BitMap64(), "c": BitMap64([2**64 - 1])})
    assert result.versions == {"a": 1, "b": 1, "c": 1}
    assert (result.adds, result.removes, result.drops, result.snapshots) == (3, 0, 0, 3)
    records = read_log(log)
    assert result.records == len(records)
    for seg in ("a", "b", "c"):
        (d,) = deltas_of(records, seg)
        assert (d.base, d.version) == (0, 1)
        (s,) = snapshots_of(records, seg)
        assert isinstance(s, SnapshotChunk) and s.version == 1
    segments, dropped = cold_answers(log)
    assert segments == {
        "a": (1, BitMap64([1, 2])),
        "b": (1, BitMap64()),
        "c": (1, BitMap64([2**64 - 1])),
    }
    assert dropped == {}


def test_identical_republish_writes_nothing(log: LogDirTransport) -> None:
    pub = publisher(log)
    desired = {"a": BitMap64([1, 2, 3]), "b": BitMap64(range(1000)), "empty": BitMap64()}
    pub.publish(desired)
    pub.publish({"a": BitMap64([1, 2, 4])})
    before = log_ends(log)
    size = (log.path / "log").stat().st_size
    for again in (
        {"a": BitMap64([1, 2, 4]), "b": BitMap64(range(1000)), "empty": BitMap64()},
        {"a": BitMap64([4, 2, 1])},
        {},
    ):
        result = publisher(log).publish(again)
        assert result.versions == {}
        assert result.records == 0
        assert log_ends(log) == before
        assert (log.path / "log").stat().st_size == size
    segments, _ = cold_answers(log)
    assert {s: v for s, (v, _bm) in segments.items()} == {"a": 2, "b": 1, "empty": 1}


def test_segments_absent_from_the_manifest_stay_unless_pruned(log: LogDirTransport) -> None:
    pub = publisher(log)
    pub.publish({"a": BitMap64([1]), "b": BitMap64([2]), "c": BitMap64([3])})
    result = pub.publish({"a": BitMap64([1, 5])})
    assert result.versions == {"a": 2}
    segments, _ = cold_answers(log)
    assert set(segments) == {"a", "b", "c"}
    result = pub.publish({"a": BitMap64([1, 5]), "b": BitMap64([2])}, prune=True)
    assert result.versions == {"c": 2}
    assert result.drops == 1
    segments, dropped = cold_answers(log)
    assert segments == {"a": (2, BitMap64([1, 5])), "b": (1, BitMap64([2]))}
    assert dropped == {"c": 2}
    # prune with an empty manifest drops everything
    result = pub.publish({}, prune=True)
    assert result.versions == {"a": 3, "b": 2}
    segments, dropped = cold_answers(log)
    assert segments == {}
    assert dropped == {"a": 3, "b": 2, "c": 2}


def test_drop(log: LogDirTransport) -> None:
    pub = publisher(log)
    pub.publish({"a": BitMap64([1, 2]), "b": BitMap64([3])})
    result = pub.publish({}, drop=["a", "never-published"])
    assert result.versions == {"a": 2}
    assert (result.drops, result.removes) == (1, 0)
    records = read_log(log)
    drop = deltas_of(records, "a")[-1]
    assert isinstance(drop, Drop) and (drop.base, drop.version) == (1, 2)
    marker = snapshots_of(records, "a")[-1]
    assert isinstance(marker, DropMarker) and marker.version == 2
    assert deltas_of(records, "never-published") == []
    # dropping again is a no-op
    assert pub.publish({}, drop=["a"]).versions == {}
    segments, dropped = cold_answers(log)
    assert set(segments) == {"b"}
    assert dropped == {"a": 2}


def test_a_drop_of_an_invalid_segment_id_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = LogDirTransport(tmp_path / "log")
    pub = publisher(log)
    pub.publish({"a": BitMap64([1, 2])})
    before = read_log(log)
    with pytest.raises(ValueError, match="drop 'bad seg!' is not a valid segment id"):
        pub.publish({}, drop=["a", "bad seg!"])
    assert read_log(log) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_:
        publish_main(["--log-dir", str(fresh), "--drop", "bad seg!"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seg-publish: error: drop 'bad seg!' is not a valid segment id")
    assert "\n" not in err and not fresh.exists()


def test_drop_removes_chunk_keys_of_a_multi_chunk_snapshot(log: LogDirTransport) -> None:
    pub = publisher(log)
    big = rnd_bitmap(1, 60_000)  # ~1.5 MB: a snapshot of several chunks
    pub.publish({"big": big})
    chunks = [s for s in snapshots_of(read_log(log), "big") if isinstance(s, SnapshotChunk)]
    n = chunks[0].chunks
    assert n > 1
    pub.publish({}, drop=["big"])
    snaps = [(r[3], r[4]) for r in read_log(log) if r[0] == "snapshots"]
    assert snaps[-n:][0][0] == b"big#0" and isinstance(snaps[-n:][0][1], DropMarker)
    assert snaps[-n + 1 :] == [(f"big#{i}".encode(), None) for i in range(1, n)]


@pytest.mark.parametrize("cold", [False, True])
def test_republish_after_drop_continues_the_version(tmp_path: Path, cold: bool) -> None:
    log = LogDirTransport(tmp_path / "log")
    pub = publisher(log)
    pub.publish({"s": BitMap64([1, 2])})
    pub.publish({"s": BitMap64([2, 3])})
    assert pub.publish({}, drop=["s"]).versions == {"s": 3}
    if cold:  # a new process: the publisher recovers only from the log
        code = (
            "import sys\n"
            "from pyroaring import BitMap64\n"
            "from publisher import Publisher\n"
            "from sidecar.transport import LogDirTransport\n"
            "r = Publisher(LogDirTransport(sys.argv[1])).publish({'s': BitMap64([9])})\n"
            "print(r.versions['s'])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "log")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=True,
        )
        assert out.stdout.strip() == "4"
    else:
        assert pub.publish({"s": BitMap64([9])}).versions == {"s": 4}
    records = read_log(log)
    assert_version_chain(records)
    assert [(d.base, d.version) for d in deltas_of(records, "s")] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
    ]
    segments, dropped = cold_answers(log)
    assert segments == {"s": (4, BitMap64([9]))}
    assert dropped == {}
    # and it survives the loss of the old deltas: the snapshots topic alone says v3 was a drop
    markers = [s for s in snapshots_of(records, "s") if isinstance(s, DropMarker)]
    assert [m.version for m in markers] == [3]


def test_a_segment_both_desired_and_dropped_is_not_two_changes(log: LogDirTransport) -> None:
    pub = publisher(log)
    pub.publish({"s": BitMap64([1])})
    with started_replica(log, poll_interval=0.01) as tailing:
        assert tailing.wait_ready(WAIT)
        try:
            pub.publish({"s": BitMap64([1, 2])}, drop=["s"])
        except ValueError:
            return  # refusing the contradiction is fine
        ends = log_ends(log)
        deadline = time.monotonic() + WAIT
        while any(tailing.positions.get(p, 0) < ends[("deltas", p)] for p in range(PARTITIONS)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        records = read_log(log)
        assert_version_chain(records)
        segments, dropped = cold_answers(log)
        tail_view = {
            s: (st.version, to_bitmap(st.bitmap)) for s, st in tailing.engine.segments.items()
        }
        assert tail_view == segments
        assert dict(tailing.engine.dropped) == dropped


def test_identical_republish_after_a_restate_writes_nothing(log: LogDirTransport) -> None:
    from sidecar.partitioner import partition_for
    from sidecar.record import delta_key, encode

    pub = Publisher(log, partitions=1, policy=SnapshotPolicy(every_versions=50))
    desired = {"a": BitMap64([1, 2]), "b": BitMap64([3])}
    pub.publish(desired)
    junk = Delta("a", 1000, 1001, BitMap64([1]), BitMap64(), 1, 0)  # a gap: damage
    with log.writer("fault-injector") as w, w.transaction():
        w.append("deltas", partition_for("a", 1), delta_key("a"), encode(junk))
    # the publisher sees a damaged, restates it whole, with a snapshot after the damage
    assert pub.publish(desired).versions == {"a": 2}
    before = log_ends(log)
    assert pub.publish(desired).versions == {}
    assert log_ends(log) == before


# -- snapshot cadence -----------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 3, 5])
def test_snapshot_every_n_versions(log: LogDirTransport, every: int) -> None:
    members = BitMap64(range(1000))
    for i in range(12):
        members.add(10_000 + i)  # a small change: churn never triggers a snapshot
        result = publisher(log, every_versions=every).publish({"s": members})
        assert result.versions == {"s": i + 1}
    records = read_log(log)
    versions = [s.version for s in snapshots_of(records, "s")]
    assert versions == list(range(1, 13, every))
    # a cold start replays only the deltas since the last snapshot
    with started_replica(log, poll_interval=0.01) as replica:
        assert replica.wait_ready(WAIT)
        state = replica.engine.segments["s"]
        assert (state.version, to_bitmap(state.bitmap)) == (12, members)
        c = replica.engine.counters
        assert c.applied == 12 - versions[-1]
        assert c.applied + c.duplicates <= every


def test_snapshot_when_churn_outweighs_the_segment(log: LogDirTransport) -> None:
    pub = publisher(log, every_versions=1000, churn_ratio=1.0)
    pub.publish({"s": BitMap64(range(100))})  # v1: first publish, snapshot
    pub.publish({"s": BitMap64(range(1, 101))})  # v2: churn 2
    pub.publish({"s": BitMap64(range(1000, 1100))})  # v3: churn 200 + 2 > 100: snapshot
    pub.publish({"s": BitMap64(range(1001, 1101))})  # v4: churn 2 since v3
    assert [s.version for s in snapshots_of(read_log(log), "s")] == [1, 3]
    segments, _ = cold_answers(log)
    assert segments == {"s": (4, BitMap64(range(1001, 1101)))}


# -- chunked snapshots and split deltas -----------------------------------------------------------


@pytest.mark.timeout(600)
def test_large_segment_chunks_and_split_deltas(transport: Transport) -> None:
    pub = publisher(transport)
    first = rnd_bitmap(7, 50_000)  # ~1.3 MB serialized: over MAX_RECORD_BITMAP_BYTES
    assert len(first.serialize()) > MAX_RECORD_BITMAP_BYTES
    small = BitMap64([1, 2, 3])
    assert pub.publish({"small": small}).versions == {"small": 1}
    with ready_replica(transport, WAIT) as tailing:
        assert pub.publish({"big": first, "small": small}).versions == {"big": 1}
        records = read_log(transport)
        parts = [d for d in deltas_of(records, "big") if isinstance(d, Delta)]
        assert len(parts) > 1
        assert [d.part for d in parts] == list(range(len(parts)))
        assert {(d.parts, d.base, d.version, d.cardinality) for d in parts} == {
            (len(parts), 0, 1, len(first))
        }
        assert BitMap64.union(*(d.add for d in parts)) == first
        chunks = [s for s in snapshots_of(records, "big") if isinstance(s, SnapshotChunk)]
        assert len(chunks) > 1
        assert [c.chunk for c in chunks] == list(range(len(chunks)))
        assert BitMap64.union(*(c.bitmap for c in chunks)) == first
        for c in chunks:
            assert len(c.bitmap.serialize()) <= MAX_RECORD_BITMAP_BYTES
        for d in parts:
            assert len(d.add.serialize()) + len(d.remove.serialize()) <= MAX_RECORD_BITMAP_BYTES

        # a big change both ways: half replaced
        second = (first - rnd_bitmap(7, 25_000)) | rnd_bitmap(8, 25_000)
        assert pub.publish({"big": second}).versions == {"big": 2}
        v2 = [d for d in deltas_of(read_log(transport), "big") if d.version == 2]
        assert len(v2) > 1
        assert BitMap64.union(*(d.remove for d in v2)) == first - second
        assert BitMap64.union(*(d.add for d in v2)) == second - first
        _wait_replica(tailing, transport, {"big": (2, second), "small": (1, small)})
        assert cold_answers(transport)[0] == {"big": (2, second), "small": (1, small)}

        # shrink: one chunk now; the keys it no longer uses are tombstoned
        third = BitMap64([5, 6])
        assert pub.publish({"big": third}).versions == {"big": 3}
        snaps = [
            (r[3], r[4])
            for r in read_log(transport)
            if r[0] == "snapshots" and r[3].startswith(b"big#")  # type: ignore[union-attr]
        ]
        previous = [v for _k, v in snaps if isinstance(v, SnapshotChunk) and v.version < 3]
        old_n = previous[-1].chunks
        assert old_n > 1
        tail = snaps[-old_n:]
        assert tail[0] == (b"big#0", SnapshotChunk("big", 3, 0, 1, third, 2, *_offset_ts(tail)))
        assert tail[1:] == [(f"big#{i}".encode(), None) for i in range(1, old_n)]
        _wait_replica(tailing, transport, {"big": (3, third), "small": (1, small)})
        assert cold_answers(transport)[0] == {"big": (3, third), "small": (1, small)}
        assert tailing.engine.counters.diverged == tailing.engine.counters.gaps == 0


def _offset_ts(tail: list) -> tuple[int, int]:
    chunk = tail[0][1]
    return chunk.delta_offset, chunk.ts


def _wait_replica(replica: Replica, transport: Transport, want: dict) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        got = {
            s: (st.version, to_bitmap(st.bitmap))
            for s, st in list(replica.engine.segments.items())
            if st.health is Health.FRESH
        }
        if got == want:
            return
        assert time.monotonic() < deadline, (
            {s: v for s, (v, _b) in got.items()},
            replica.status(),
        )
        time.sleep(0.01)


# -- segment-set validation ----------------------------------------------------------------------


def write_set(path: Path, segments: dict[str, BitMap64]) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": 1, "computed_at": "2025-01-01T00:00:00.000Z", "segments": {}}
    for i, (name, bm) in enumerate(segments.items()):
        (path / f"{i}.roaring").write_bytes(bm.serialize())
        manifest["segments"][name] = {"file": f"{i}.roaring", "cardinality": len(bm)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _set_entry(name: str, **fields: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["segments"][name].update(fields)

    return edit


def _a_file_instead(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.write_text("{}")


def _outside_file(d: Path) -> None:
    (d.parent / "outside.roaring").write_bytes(BitMap64([1]).serialize())
    _edit_manifest(d, _set_entry("good", file="../outside.roaring", cardinality=1))


def _symlink_out(d: Path) -> None:
    (d.parent / "secret.roaring").write_bytes(BitMap64([1]).serialize())
    (d / "link.roaring").symlink_to(d.parent / "secret.roaring")
    _edit_manifest(d, _set_entry("good", file="link.roaring", cardinality=1))


def _absolute_file(d: Path) -> None:
    (d.parent / "abs.roaring").write_bytes(BitMap64([1]).serialize())
    _edit_manifest(d, _set_entry("good", file=str(d.parent / "abs.roaring"), cardinality=1))


def _rename_segment(new: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["segments"][new] = m["segments"].pop("good")

    return edit


BAD_INPUTS: dict[str, Callable[[Path], None]] = {
    "missing manifest": lambda d: (d / "manifest.json").unlink(),
    "bad json": lambda d: (d / "manifest.json").write_text('{"format": 1, "segments": {'),
    "manifest not an object": lambda d: (d / "manifest.json").write_text("[1, 2]"),
    "unknown format": lambda d: _edit_manifest(d, lambda m: m.update(format=2)),
    "no computed_at": lambda d: _edit_manifest(d, lambda m: m.pop("computed_at")),
    "segments not an object": lambda d: _edit_manifest(d, lambda m: m.update(segments=[1])),
    "bad segment id (space)": lambda d: _edit_manifest(d, _rename_segment("bad id")),
    "bad segment id (leading dash)": lambda d: _edit_manifest(d, _rename_segment("-x")),
    "bad segment id (empty)": lambda d: _edit_manifest(d, _rename_segment("")),
    "bad segment id (too long)": lambda d: _edit_manifest(d, _rename_segment("a" * 129)),
    "bad segment id (slash)": lambda d: _edit_manifest(d, _rename_segment("a/b")),
    "entry not an object": lambda d: _edit_manifest(
        d, lambda m: m["segments"].update(good="0.roaring")
    ),
    "file not a string": lambda d: _edit_manifest(d, _set_entry("good", file=3)),
    "cardinality missing": lambda d: _edit_manifest(
        d, lambda m: m["segments"]["good"].pop("cardinality")
    ),
    "cardinality negative": lambda d: _edit_manifest(d, _set_entry("good", cardinality=-1)),
    "cardinality a bool": lambda d: _edit_manifest(d, _set_entry("good", cardinality=True)),
    "cardinality a string": lambda d: _edit_manifest(d, _set_entry("good", cardinality="3")),
    "missing file": lambda d: (d / "0.roaring").unlink(),
    "the input is a file": _a_file_instead,
    "file outside the dir": _outside_file,
    "absolute file outside the dir": _absolute_file,
    "symlink out of the dir": _symlink_out,
    "file is the dir itself": lambda d: _edit_manifest(d, _set_entry("good", file=".")),
    "not a bitmap": lambda d: (d / "0.roaring").write_bytes(b"this is not a roaring bitmap"),
    "empty file": lambda d: (d / "0.roaring").write_bytes(b""),
    "truncated bitmap": lambda d: (d / "0.roaring").write_bytes(
        BitMap64(range(0, 10**6, 7)).serialize()[:-5]
    ),
    "cardinality mismatch": lambda d: _edit_manifest(d, _set_entry("good", cardinality=4)),
    "second segment bad": lambda d: _edit_manifest(
        d, lambda m: m["segments"].update(zzz={"file": "nope.roaring", "cardinality": 0})
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_invalid_input_raises_input_error_and_writes_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = LogDirTransport(tmp_path / "log")
    publisher(log).publish({"existing": BitMap64([1])})
    before = (tmp_path / "log" / "log").read_bytes()
    d = tmp_path / "set"
    write_set(d, {"good": BitMap64([1, 2, 3]), "other": BitMap64([7])})
    read_segment_set(d)  # valid before the damage
    BAD_INPUTS[case](d)
    with pytest.raises(InputError) as info:
        read_segment_set(d)
    assert str(info.value)
    assert "\n" not in str(info.value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        publish_main(["--input", str(d), "--log-dir", str(tmp_path / "log"), "--quiet"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err, err
    assert (tmp_path / "log" / "log").read_bytes() == before
    # nor does a fresh log get created for an invalid input
    with pytest.raises(SystemExit):
        publish_main(["--input", str(d), "--log-dir", str(tmp_path / "fresh"), "--quiet"])
    assert not (tmp_path / "fresh" / "log").exists()


def test_valid_input_round_trip_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "set"
    members = {"vip": BitMap64([1, 2**64 - 1]), "empty": BitMap64(), "c:30m": BitMap64([5])}
    write_set(d, members)
    assert read_segment_set(d).segments == members
    assert read_segment_set(d).computed_at == "2025-01-01T00:00:00.000Z"
    args = ["--input", str(d), "--log-dir", str(tmp_path / "log"), "--quiet"]
    assert publish_main([*args, "--partitions", "2"]) == 0
    assert "segments changed 3" in capsys.readouterr().out
    assert publish_main(args) == 0  # identical: nothing
    assert "segments changed 0" in capsys.readouterr().out
    log = LogDirTransport(tmp_path / "log")
    segments, _ = cold_answers(log)
    assert segments == {s: (1, bm) for s, bm in members.items()}
    # --drop and --prune from the command line
    assert publish_main(["--log-dir", str(tmp_path / "log"), "--drop", "vip", "--quiet"]) == 0
    write_set(tmp_path / "set2", {"c:30m": BitMap64([5, 6])})
    assert (
        publish_main(
            [
                "--input",
                str(tmp_path / "set2"),
                "--log-dir",
                str(tmp_path / "log"),
                "--prune",
                "--quiet",
            ]
        )
        == 0
    )
    segments, dropped = cold_answers(log)
    assert segments == {"c:30m": (2, BitMap64([5, 6]))}
    assert dropped == {"vip": 2, "empty": 2}


# -- crash failpoints -----------------------------------------------------------------------------

_CRASH_SCRIPT = """
import json, sys
import msgpack
from pyroaring import BitMap64
from publisher import Publisher, SnapshotPolicy
kind, where, prefix, desired_path, writer_id = sys.argv[1:6]
if kind == "logdir":
    from sidecar.transport import LogDirTransport
    transport = LogDirTransport(where)
else:
    from sidecar.transport import KafkaTransport
    transport = KafkaTransport(where, prefix=prefix)
with open(desired_path, "rb") as f:
    desired = {k: BitMap64.deserialize(v) for k, v in msgpack.unpackb(f.read()).items()}
pub = Publisher(transport, writer_id=writer_id, partitions=@PARTITIONS@,
                policy=SnapshotPolicy(every_versions=2))
print(json.dumps(pub.publish(desired, prune=True).versions))
""".replace("@PARTITIONS@", str(PARTITIONS))


def _run_publish(
    transport: Transport, tmp_path: Path, desired: dict[str, BitMap64], fault: str | None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "desired.msgpack"
    path.write_bytes(msgpack.packb({k: v.serialize() for k, v in desired.items()}))
    if isinstance(transport, LogDirTransport):
        argv = ["logdir", str(transport.path), "-"]
    else:
        argv = ["kafka", transport.bootstrap, transport.prefix]  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, *argv, str(path), _writer_id(transport)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture
def crash_history(transport: Transport) -> Iterator[tuple[Transport, dict, dict]]:
    """A log with some history; returns (transport, versions before, desired next)."""
    pub = publisher(transport, every_versions=2)
    pub.publish({"a": BitMap64([1, 2]), "b": BitMap64([3]), "c": BitMap64([4, 5]), "d": BitMap64()})
    pub.publish({"a": BitMap64([1, 2, 3]), "c": BitMap64([5])})
    before = {"a": 2, "b": 1, "c": 2, "d": 1}
    desired = {
        "a": BitMap64([2, 3, 2**64 - 1]),  # changed
        "b": BitMap64([3]),  # unchanged
        # "c" absent: pruned (dropped)
        "d": BitMap64(range(50)),  # changed
        "e": BitMap64([10, 11]),  # new
        "f": rnd_bitmap(3, 200),  # new
    }
    yield transport, before, desired


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_at_each_failpoint_then_rerun_converges(
    crash_history: tuple[Transport, dict, dict], tmp_path: Path, point: str
) -> None:
    transport, before, desired = crash_history
    ends_before = log_ends(transport)
    crashed = _run_publish(transport, tmp_path, desired, point)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr[-2000:])
    assert crashed.stdout == ""
    if point != "after-commit" and isinstance(transport, LogDirTransport):
        assert log_ends(transport) == ends_before  # nothing of it is visible

    rerun = _run_publish(transport, tmp_path, desired, None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    versions = json.loads(rerun.stdout.strip().splitlines()[-1])
    expected = {"a": 3, "c": 3, "d": 2, "e": 1, "f": 1}
    if point == "after-commit":
        assert versions == {}  # the crashed run had committed it all
    else:
        assert versions == expected

    # the log now equals the input, versions neither skipped nor repeated
    records = read_log(transport)
    assert_version_chain(records)
    segments, dropped = cold_answers(transport)
    assert segments == {
        "a": (3, desired["a"]),
        "b": (1, desired["b"]),
        "d": (2, desired["d"]),
        "e": (1, desired["e"]),
        "f": (1, desired["f"]),
    }
    assert dropped == {"c": 3}
    for seg, v in expected.items():
        assert v == before.get(seg, 0) + 1
    # and once more: nothing left to do
    again = _run_publish(transport, tmp_path, desired, None)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {}


def test_fault_points_are_the_documented_ones() -> None:
    # Every declared point is a failpoint of the publish code, each once, and the README
    # documents it: the crash test above then covers every point the code has.
    source = (ROOT / "publisher" / "publish.py").read_text()
    in_code = re.findall(r'_fault\("([^"]+)"\)', source)
    assert sorted(in_code) == sorted(FAULT_POINTS)
    assert len(set(in_code)) == len(in_code)
    readme = (ROOT / "README.md").read_text()
    assert f"{FAULT_ENV}=<point>" in readme
    for point in FAULT_POINTS:
        assert f"`{point}`" in readme, point


# -- Kafka: deltas lost to retention --------------------------------------------------------------


def delete_all_deltas(bootstrap: str, prefix: str) -> None:
    """What time-based retention does to old deltas: the log start moves to the end."""
    from confluent_kafka import OFFSET_END, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_records(
        [TopicPartition(f"{prefix}.deltas", p, OFFSET_END) for p in range(PARTITIONS)],
        request_timeout=30,
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=60)


@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_kafka_republish_after_drop_when_old_deltas_are_gone(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    from sidecar.transport import KafkaTransport

    transport = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    pub = publisher(transport)
    pub.publish({"s": BitMap64([1, 2]), "t": BitMap64([7])})
    pub.publish({"s": BitMap64([2, 3])})
    assert pub.publish({}, drop=["s"]).versions == {"s": 3}
    delete_all_deltas(kafka_bootstrap, topic_prefix)
    with transport.reader() as reader:
        for p in range(PARTITIONS):
            low, high = reader.watermarks("deltas", p)
            assert low == high
    # only the snapshots topic remembers: s was dropped at v3, t is at v1
    assert publisher(transport).publish({"s": BitMap64([9])}).versions == {"s": 4}
    segments, dropped = cold_answers(transport)
    assert segments == {"s": (4, BitMap64([9])), "t": (1, BitMap64([7]))}
    assert dropped == {}


def test_a_session_publisher_matches_one_shot_publishes(tmp_path: Path) -> None:
    """A long-lived publisher (session=True, as the stream job runs it) reads only the log's
    new records between publishes; what it writes equals what one-shot publishes would."""
    rng = random.Random(7)
    session_log = LogDirTransport(tmp_path / "session")
    oneshot_log = LogDirTransport(tmp_path / "oneshot")
    truth: dict[str, BitMap64] = {}
    policy = SnapshotPolicy(every_versions=3)
    with Publisher(session_log, partitions=2, session=True, policy=policy) as pub:
        for step in range(12):
            for name in ("a", "b", "c"):
                if rng.random() < 0.7:
                    truth[name] = BitMap64(rng.sample(range(5000), rng.randrange(0, 300)))
            drop = ["c"] if step % 5 == 4 and "c" in truth else []
            desired = {k: v for k, v in truth.items() if k not in drop}
            got = pub.publish(desired, drop=drop).versions
            want = (
                Publisher(oneshot_log, partitions=2, policy=policy)
                .publish(desired, drop=drop)
                .versions
            )
            assert got == want
            for name in drop:
                del truth[name]
    states, dropped = cold_answers(session_log)
    assert {k: v for k, (_, v) in states.items()} == truth
    assert (states, dropped) == cold_answers(oneshot_log)
    # After close, a one-shot publisher recovers the same state: identical input writes nothing.
    assert Publisher(session_log).publish(truth).versions == {}


def test_a_session_publisher_holds_the_log_directory(tmp_path: Path) -> None:
    transport = LogDirTransport(tmp_path / "log")
    with Publisher(transport, session=True) as pub:
        pub.publish({"a": BitMap64([1])})
        with pytest.raises(TransportError):
            Publisher(transport).publish({"a": BitMap64([2])})
        assert pub.publish({"a": BitMap64([1, 2])}).versions == {"a": 2}
    assert Publisher(transport).publish({"a": BitMap64([3])}).versions == {"a": 3}


def test_a_session_never_changes_the_callers_bitmaps(tmp_path: Path) -> None:
    """The engine changes its bitmaps in place; what the caller passed stays as it was."""
    mine = BitMap64([1, 2])
    with Publisher(LogDirTransport(tmp_path / "log"), session=True) as pub:
        pub.publish({"a": mine})  # the first publish writes a snapshot of `mine`
        bigger = mine | BitMap64([3])
        assert pub.publish({"a": bigger}).versions == {"a": 2}  # a delta on the session's copy
        assert list(mine) == [1, 2] and list(bigger) == [1, 2, 3]
        assert pub.publish({"a": mine}).versions == {"a": 3}  # and it still sees the change

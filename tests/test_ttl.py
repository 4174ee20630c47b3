"""Membership TTL end to end (DESIGN.md "Freshness"): `ttl_seconds` in the manifest, additive
publishes (listed members added or re-affirmed, unlisted ones lapsing at their expiry), the
switches between TTL and plain, guards and rollback; and on both transports with a short TTL:
members expire on the replica's clock on time, re-affirmed ones do not, a restart from a
checkpoint keeps the expiries, a cold bootstrap from snapshots and deltas agrees with a replica
that ran all along, and the shared replica stops answering True for an expired member."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap64

from compute.segment_set import write_segment_set
from publisher.guard import Guard, GuardError
from publisher.plan import SnapshotPolicy
from publisher.publish import Publisher
from publisher.segment_set import InputError, read_segment_set
from sidecar.client import SidecarClient
from sidecar.record import Delta, SnapshotChunk, decode
from sidecar.replica import Replica, checkpoint
from sidecar.server.metrics import ReplicaCollector
from sidecar.transport import LogDirTransport
from sidecar.transport.base import Transport
from tests.logtools import free_port, sidecar_process, started_replica
from tests.test_publish_guards import run_cli
from tests.test_shared_replica import SharedReplica, ShmWriter

WAIT = 30.0
WHEN = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
TTL = 2  # seconds: members expire 2-3 s after their publish (deadlines are whole seconds)
#: how late an expiry may land on a loaded machine: the contract says within 1 s
LATE_MS = 1_000 + 2_000


def _until(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in time: {what}")
        time.sleep(0.01)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _records(log: Transport) -> list[Delta | SnapshotChunk]:
    out = []
    with log.reader() as reader:
        for topic in ("deltas", "snapshots"):
            marks = reader.watermarks_all(topic)
            reader.assign({(topic, p): low for p, (low, _) in marks.items()})
            for rec in reader.read_until({(topic, p): end for p, (_, end) in marks.items()}):
                if rec.value is not None:
                    out.append(decode(rec.value, snapshots=topic == "snapshots"))
    return out  # type: ignore[return-value]


def _deltas(log: Transport, segment: str) -> list[Delta]:
    return [r for r in _records(log) if type(r) is Delta and r.segment == segment]


# -- the manifest ------------------------------------------------------------------------------


def test_the_manifest_carries_ttl_seconds_and_refuses_bad_ones(tmp_path: Path) -> None:
    write_segment_set(tmp_path / "ok", {"t": BitMap64([1])}, WHEN, {"t": {"ttl_seconds": 30}})
    assert read_segment_set(tmp_path / "ok").ttl == {"t": 30}
    for bad in (0, -1, 1.5, "30", True, 2**31, None):
        d = tmp_path / f"bad{bad}"
        write_segment_set(d, {"t": BitMap64([1])}, WHEN)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["segments"]["t"]["ttl_seconds"] = bad
        (d / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match="segment t: ttl_seconds must be an integer in 1.."):
            read_segment_set(d)


def test_seg_publish_refuses_a_bad_ttl_in_one_line_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "in"
    write_segment_set(d, {"t": BitMap64([1])}, WHEN, {"t": {"ttl_seconds": 2**31}})
    code, _, err = run_cli(capsys, "--input", str(d), "--log-dir", str(tmp_path / "log"))
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ttl_seconds" in err, err
    assert not (tmp_path / "log").exists()
    with pytest.raises(ValueError, match="ttl_seconds"):
        Publisher(LogDirTransport(tmp_path / "log")).publish({"t": BitMap64([1])}, ttl={"t": -1})


# -- the publisher -----------------------------------------------------------------------------


def test_a_ttl_publish_adds_and_reaffirms_and_removes_nothing(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    with Publisher(log, writer_id="t", partitions=2, session=True) as p:
        before = _now_ms()
        first = p.publish({"t": BitMap64([1, 2, 3]), "plain": BitMap64([7])}, ttl={"t": 60})
        assert first.versions == {"t": 1, "plain": 1}
        assert (first.adds, first.renewed) == (4, 0)
        second = p.publish({"t": BitMap64([3, 4])}, ttl={"t": 600})  # 4 added, 3 re-affirmed
        assert second.versions == {"t": 2} and second.removes == 0
        assert (second.adds, second.renewed) == (1, 1)
        assert "adds 1, renewed 1, removes 0" in second.summary()
        again = p.publish({"t": BitMap64([3, 4])}, ttl={"t": 600})  # re-affirmed: a delta
        assert again.versions == {"t": 3} and again.heartbeats == 0
        assert (again.adds, again.renewed) == (0, 2)
        assert p.publish({"t": BitMap64()}, ttl={"t": 600}).versions == {}  # nothing listed
    d1, d2, d3 = _deltas(log, "t")
    assert d1.add == BitMap64([1, 2, 3]) and d1.cardinality == 3
    assert before + 60_000 <= d1.expires_at <= _now_ms() + 61_000 and d1.expires_at % 1000 == 0
    assert d2.add == BitMap64([3, 4]) and not d2.remove and d2.cardinality == 4
    assert d2.expires_at == -(-(d2.ts + 600_000) // 1000) * 1000
    assert d3.add == BitMap64([3, 4]) and d3.cardinality == 4
    (plain,) = _deltas(log, "plain")
    assert plain.expires_at == 0
    snaps = [r for r in _records(log) if type(r) is SnapshotChunk and r.segment == "t"]
    assert [(s.version, [at for at, _ in s.expiries]) for s in snaps] == [(1, [d1.expires_at])]
    with started_replica(log, poll_interval=0.01) as r:
        assert r.wait_ready(WAIT)
        assert r.state("t").bitmap == BitMap64([1, 2, 3, 4])  # type: ignore[union-attr]
        assert [r.engine.expires_at("t", u) for u in (1, 3, 7)] == [
            d1.expires_at,
            d3.expires_at,
            None,
        ]
        assert r.engine.expires_at("plain", 7) is None


def test_a_later_snapshot_carries_the_expiries_a_cold_start_needs(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    policy = SnapshotPolicy(every_versions=2, churn_ratio=100.0)
    with Publisher(log, writer_id="t", partitions=2, session=True, policy=policy) as p:
        for i, ttl in enumerate((60, 600, 120, 900)):
            p.publish({"t": BitMap64([i, 10 + i])}, ttl={"t": ttl})
    snaps = {r.version: r for r in _records(log) if type(r) is SnapshotChunk}
    assert sorted(snaps) == [1, 3]  # the first publish, then every 2 versions
    d = {d.version: d for d in _deltas(log, "t")}
    assert [at for at, _ in snaps[3].expiries] == sorted([d[1].expires_at, d[2].expires_at,
                                                          d[3].expires_at])  # fmt: skip
    with started_replica(log, poll_interval=0.01) as cold:
        assert cold.wait_ready(WAIT)
        assert cold.state("t").bitmap == BitMap64([0, 1, 2, 3, 10, 11, 12, 13])  # type: ignore[union-attr]
        for i in range(4):
            assert cold.engine.expires_at("t", 10 + i) == d[i + 1].expires_at


def test_switching_between_ttl_and_plain(tmp_path: Path) -> None:
    """TTL -> plain is a full state whose members are all permanent (even on a replica whose
    clock already expired some); plain -> TTL keeps the unlisted members permanent."""
    log = LogDirTransport(tmp_path / "log")
    with Publisher(log, writer_id="t", partitions=2, session=True) as p:
        p.publish({"s": BitMap64([1, 2])})
        to_ttl = p.publish({"s": BitMap64([2, 3])}, ttl={"s": 60})
        assert (to_ttl.adds, to_ttl.renewed, to_ttl.removes) == (1, 1, 0)
        with started_replica(log, poll_interval=0.01) as r:
            assert r.wait_ready(WAIT)
            assert r.state("s").bitmap == BitMap64([1, 2, 3])  # type: ignore[union-attr]
            assert r.engine.expires_at("s", 1) is None and r.engine.expires_at("s", 3)
            to_plain = p.publish({"s": BitMap64([3, 4])})  # plain again: 1 and 2 go, 3, 4 stay
            assert (to_plain.adds, to_plain.renewed, to_plain.removes) == (1, 1, 2)
            _until(lambda: r.state("s").version == 3)  # type: ignore[union-attr]
            assert r.state("s").bitmap == BitMap64([3, 4]) and "s" not in r.engine.expiries  # type: ignore[union-attr]
    (_, _, transition) = _deltas(log, "s")
    assert transition.add == BitMap64([3, 4]) and transition.remove == BitMap64([1, 2])


def test_guards_on_a_ttl_segment(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    with Publisher(log, writer_id="t", partitions=2, session=True, guard=Guard()) as p:
        p.publish({"t": BitMap64(range(100))}, ttl={"t": 60})
        # listing 1 of 100 removes nothing: the remove fraction does not apply
        assert p.publish({"t": BitMap64([1])}, ttl={"t": 60}).versions == {"t": 2}
        # min_cardinality is judged on the count after the publish (still 100)
        assert p.publish({"t": BitMap64([1])}, ttl={"t": 60}, min_cardinality={"t": 100})
        p.publish({"short": BitMap64(range(10))}, ttl={"short": 1})
        time.sleep(2.1)  # all 10 lapse
        for listed in (BitMap64([1, 2]), BitMap64()):  # an input that stopped listing them
            with pytest.raises(GuardError, match="short: would shrink from 10 to 2|from 10 to 0"):
                p.publish({"short": listed}, ttl={"short": 1}, min_cardinality={"short": 5})
        assert p.publish(
            {"short": BitMap64(range(5))}, ttl={"short": 1}, min_cardinality={"short": 5}
        )


def test_rollback_of_a_ttl_segment_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = LogDirTransport(tmp_path / "log")
    with Publisher(log, writer_id="t", partitions=2, session=True) as p:
        p.publish({"t": BitMap64([1])}, ttl={"t": 60})
        p.publish({"t": BitMap64([2])}, ttl={"t": 60})
    code, _, err = run_cli(
        capsys, "--rollback", "t", "--to-version", "1", "--log-dir", str(log.path)
    )
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "membership TTL" in err, err
    assert len(_deltas(log, "t")) == 2


def test_the_publisher_state_file_keeps_the_expiries(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    state = tmp_path / "state"
    Publisher(log, writer_id="t", partitions=2, state_dir=state).publish(
        {"t": BitMap64([1, 2])}, ttl={"t": 60}
    )
    again = Publisher(log, writer_id="t", partitions=2, state_dir=state)
    result = again.publish({"t": BitMap64([2, 3])}, ttl={"t": 120})
    assert result.versions == {"t": 2}
    (_, d2) = _deltas(log, "t")
    assert d2.cardinality == 3  # 1 is still counted: the state file held its expiry
    from sidecar.replica.checkpoint import read

    ckpt = read(state)
    assert ckpt is not None and ckpt.expiries["t"].members() == BitMap64([1, 2, 3])


# -- end to end, on both transports ------------------------------------------------------------


def _deadline(replica: Replica, segment: str, user: int) -> int:
    at = replica.engine.expires_at(segment, user)
    assert at is not None, (segment, user)
    return at


def _expires_on_time(check: Callable[[], bool | None], deadline_ms: int) -> None:
    """`check()` stays True until `deadline_ms` and turns False within LATE_MS after it."""
    while True:
        now, answer = _now_ms(), check()
        if answer is False:
            assert now >= deadline_ms - 5, f"expired {deadline_ms - now} ms early"
            return
        assert answer is True
        assert now <= deadline_ms + LATE_MS, f"not expired {now - deadline_ms} ms after"
        time.sleep(0.005)


def _view(replica: Replica) -> dict[str, tuple[int, BitMap64, list]]:
    with replica.engine.lock:
        return {
            name: (
                st.version,
                BitMap64(st.bitmap),
                replica.engine.expiries[name].pairs() if name in replica.engine.expiries else [],
            )
            for name, st in replica.engine.segments.items()
        }


@pytest.mark.timeout(180)
def test_members_expire_on_time_and_survive_restarts_and_cold_starts(
    transport: Transport, tmp_path: Path
) -> None:
    writer = f"{getattr(transport, 'prefix', 'dir')}-ttl"
    state_dir = tmp_path / "state"
    with Publisher(transport, writer_id=writer, partitions=2, session=True) as p:
        p.publish({"keep": BitMap64([9])})
        with started_replica(transport, poll_interval=0.01) as along:  # runs all along
            assert along.wait_ready(WAIT), along.status()
            shm = ShmWriter(along, tmp_path / "shm").start()
            try:
                shared = SharedReplica(shm_dir=tmp_path / "shm", retry_s=0.01)
                _until(lambda: shared.contains(9, "keep") is True, what="the shared replica")
                with started_replica(transport, True, poll_interval=0.01, state_dir=state_dir) as r:
                    assert r.wait_ready(WAIT), r.status()
                    # replicas ready before the TTL publish: a slow start cannot eat its TTL
                    p.publish({"t": BitMap64([1, 2, 3])}, ttl={"t": TTL})
                    _until(lambda: r.state("t") is not None, what="the TTL publish")
                    first = _deltas(transport, "t")[0].expires_at
                    # re-affirm 2 (a later deadline) while 1 and 3 run out
                    p.publish({"t": BitMap64([2, 4])}, ttl={"t": TTL + 4})
                    _until(lambda: r.engine.expires_at("t", 4) is not None, what="re-affirm")
                    later = _deadline(r, "t", 2)
                    assert later == _deltas(transport, "t")[1].expires_at
                    assert later >= first + 4_000
                    _expires_on_time(lambda: r.contains(1, "t"), first)
                    assert r.contains(3, "t") is False and r.contains(2, "t") is True
                    assert r.state("t").cardinality == 2  # type: ignore[union-attr]
                    _until(lambda: shared.contains(1, "t") is False, 5, "shared expiry")
                    assert shared.contains(2, "t") is True and shared.contains(9, "keep")
                    version = r.state("t").version  # type: ignore[union-attr]
                # a restart from the checkpoint keeps the expiries (and does not bootstrap)
                assert _now_ms() < later - 300, "too slow to test the restart before expiry"
                with started_replica(transport, poll_interval=0.01, state_dir=state_dir) as r2:
                    assert r2.wait_ready(WAIT) and r2.started_from == "checkpoint"
                    assert r2.engine.expires_at("t", 2) == later
                    assert r2.state("t").version == version  # type: ignore[union-attr]
                    _expires_on_time(lambda: r2.contains(2, "t"), later)
                    _until(lambda: along.contains(4, "t") is False, 5, "along")
                    _until(lambda: shared.contains(2, "t") is False, 5, "shared expiry")
                    assert r2.contains(9, "keep") is True
            finally:
                shm.stop()
            # more publishes (some members re-affirmed, one new), then a cold start from the
            # log (the first publish's snapshot and the deltas) agrees with `along`
            p.publish({"t": BitMap64([5, 6])}, ttl={"t": 60})
            p.publish({"t": BitMap64([6, 7])}, ttl={"t": 120})
            with started_replica(transport, poll_interval=0.01) as cold:
                assert cold.wait_ready(WAIT), cold.status()
                _until(lambda: cold.state("t").version == 4 and along.state("t").version == 4)  # type: ignore[union-attr]
                assert _view(cold) == _view(along)
                assert cold.state("t").bitmap == BitMap64([5, 6, 7])  # type: ignore[union-attr]
                assert cold.engine.counters.diverged == along.engine.counters.diverged == 0
            metrics = {
                (m.name, tuple(s.labels.values())): s.value
                for m in ReplicaCollector(along).collect()
                for s in m.samples
            }
            # 1, 3, then 2, 4 (5 when the re-affirmation of 2 reached `along` after 2 expired)
            assert metrics[("seg_replica_expired_memberships", ())] >= 4
            assert ("seg_replica_records", ("ttl_unchecked",)) in metrics


class _GatedFile:
    """A real file whose first write waits for `gate` (a slow disk: a checkpoint of 1B
    memberships takes ~2.5 s to write)."""

    def __init__(self, f: Any, gate: threading.Event) -> None:
        self._f, self._gate = f, gate

    def write(self, data: bytes) -> int:
        self._gate.wait(WAIT)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _GatedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def gate_checkpoint_writes(
    monkeypatch: pytest.MonkeyPatch, gates: list[threading.Event | None]
) -> list[str]:
    """The checkpoint files opened for writing from now on (returned, as they open), the
    n-th one's first write waiting for `gates[n]` (the last gate for any later; None: not
    held)."""
    opened: list[str] = []

    def gated_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by the wrapper
        if "w" not in mode:
            return f
        opened.append(str(path))
        gate = gates[min(len(opened), len(gates)) - 1]
        return f if gate is None else _GatedFile(f, gate)

    monkeypatch.setattr(checkpoint, "open", gated_open, raising=False)
    return opened


@pytest.mark.timeout(180)
def test_a_checkpoint_being_written_holds_back_neither_expiry_nor_the_tail(
    transport: Transport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's periodic checkpoint writes its file on another thread from a state taken
    between two polls: while the write hangs, a TTL member still leaves on time and publishes
    still land; the file holds the state as it was taken (bitmaps changed meanwhile were
    changed copy-on-write), and a restart from the next one answers as the running replica."""
    first, later = threading.Event(), threading.Event()
    opened = gate_checkpoint_writes(monkeypatch, [first, later])
    writer = f"{getattr(transport, 'prefix', 'dir')}-ckpt"
    state_dir = tmp_path / "state"
    with Publisher(transport, writer_id=writer, partitions=2, session=True) as p:
        p.publish({"keep": BitMap64([9])})
        options = {"poll_interval": 0.01, "state_dir": state_dir, "checkpoint_interval": 0.2}
        with started_replica(transport, **options) as r:  # type: ignore[arg-type]
            try:
                assert r.wait_ready(WAIT), r.status()
                _until(lambda: opened, what="the first checkpoint to start writing")
                p.publish({"t": BitMap64([1, 2]), "keep": BitMap64([9, 10])}, ttl={"t": TTL})
                _until(lambda: r.state("t") is not None, 10, "a publish while the write hangs")
                assert r.contains(10, "keep") is True
                _expires_on_time(lambda: r.contains(1, "t"), _deadline(r, "t", 1))
                assert r.checkpoints_written == 0 and not first.is_set(), "the write hung"
                first.set()
                _until(lambda: r.checkpoints_written == 1, what="the first checkpoint")
                taken = checkpoint.read(state_dir)
                assert taken is not None
                assert {n: (s.version, list(s.bitmap)) for n, s in taken.segments.items()} == {
                    "keep": (1, [9])
                }
            finally:
                first.set()
                later.set()
            _until(lambda: r.checkpoints_written >= 2, what="a checkpoint of the later state")
            r.stop(save=False)
            assert r.contains(1, "t") is False
            with started_replica(transport, poll_interval=0.01, state_dir=state_dir) as again:
                assert again.wait_ready(WAIT) and again.started_from == "checkpoint"
                assert _view(again) == _view(r)


def test_the_sidecar_process_expires_members_for_its_clients_and_shared_readers(
    tmp_path: Path, workdir: Path
) -> None:
    """`seg-sidecar` itself (its replica thread's timer): a socket client and a SharedReplica
    found through the socket both stop answering True for a member once it expired."""
    log = LogDirTransport(tmp_path / "log")
    uds = workdir / "s.sock"
    with Publisher(log, writer_id="t", partitions=2, session=True) as p:
        p.publish({"keep": BitMap64([9])})
        with (
            sidecar_process("--log-dir", str(log.path), "--uds", str(uds), port=free_port()),
            SidecarClient(str(uds), timeout=5) as client,
        ):
            shared = SharedReplica(str(uds), retry_s=0.01)
            _until(lambda: shared.contains(9, "keep") is True, what="the shared replica")
            p.publish({"t": BitMap64([1, 2])}, ttl={"t": TTL})
            p.publish({"t": BitMap64([2])}, ttl={"t": TTL + 4})
            first, later = (d.expires_at for d in _deltas(log, "t"))
            _until(lambda: client.check(2, "t") is True, what="the TTL publishes")
            _expires_on_time(lambda: client.check(1, "t"), first)
            _until(lambda: shared.contains(1, "t") is False, 5, "shared expiry")
            assert client.check(2, "t") is True and shared.contains(2, "t") is True
            assert client.explain(2, "t").member is True
            _expires_on_time(lambda: client.check(2, "t"), later)
            _until(lambda: shared.contains(2, "t") is False, 5, "shared expiry")
            assert client.check(9, "keep") is True

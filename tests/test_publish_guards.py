"""Publish guards, history and rollback (publisher/guard.py, publisher/history.py,
`seg-publish --max-remove-fraction/--force/--history/--rollback`), on the log directory and
on the real Kafka broker; the run metrics a scheduled seg-publish exports."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pyroaring import BitMap64

from publisher import Publisher
from publisher.cli import main as publish_main
from publisher.guard import STREAM_MAX_REMOVE_FRACTION, Guard, GuardError
from publisher.history import History, HistoryError, read_history
from publisher.metrics import METRICS
from sidecar.record import Delta, Drop
from sidecar.transport import LogDirTransport, Transport
from tests import test_publisher
from tests.logtools import ready_replica

# the publisher tests' log directory fixture and reader (`transport`, the log directory and
# the log on the real Kafka broker, is a shared fixture: tests/sidecar_fixtures.py)
log = test_publisher.log
log_ends = test_publisher.log_ends

WAIT = 30.0


def log_args(transport: Transport) -> list[str]:
    if isinstance(transport, LogDirTransport):
        return ["--log-dir", str(transport.path), "--writer-id", "guards"]
    return [
        "--kafka",
        transport.bootstrap,  # type: ignore[attr-defined]
        "--topic-prefix",
        transport.prefix,  # type: ignore[attr-defined]
        "--writer-id",
        f"{transport.prefix}-pub",  # type: ignore[attr-defined]
    ]


def pub(transport: Transport, **kwargs: object) -> Publisher:
    writer = log_args(transport)[-1]
    return Publisher(transport, writer_id=writer, partitions=2, **kwargs)  # type: ignore[arg-type]


def write_set(path: Path, segments: dict[str, BitMap64], floors: dict[str, int] | None = None):
    path.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": 1, "computed_at": "2026-12-01T00:00:00Z", "segments": {}}
    for i, (name, bm) in enumerate(sorted(segments.items())):
        (path / f"{i}.roaring").write_bytes(bm.serialize())
        entry = {"file": f"{i}.roaring", "cardinality": len(bm)}
        if floors and name in floors:
            entry["min_cardinality"] = floors[name]
        manifest["segments"][name] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def held(transport: Transport) -> dict[str, tuple[int, BitMap64]]:
    """What a fresh replica of the log holds: segment -> (version, members)."""
    with ready_replica(transport, WAIT) as replica:
        return {s: (st.version, BitMap64(st.bitmap)) for s, st in replica.engine.segments.items()}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = publish_main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# -- guards --------------------------------------------------------------------------------------


def test_cli_refuses_a_large_removal_before_writing_then_force_publishes(
    transport: Transport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = log_args(transport)
    full = BitMap64(range(1000))
    code, out, err = run_cli(capsys, "--input", str(write_set(tmp_path / "a", {"s": full,
                             "t": BitMap64([1, 2])})), *args)  # fmt: skip
    assert code == 0, err
    before = log_ends(transport)
    # 600 of 1,000 removed: over the default 0.5
    shrunk = write_set(tmp_path / "b", {"s": BitMap64(range(600, 1000)), "t": BitMap64([1, 2])})
    code, out, err = run_cli(capsys, "--input", str(shrunk), *args)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "segment s" in last and "600 of 1,000" in last and "0.5" in last
    assert log_ends(transport) == before  # nothing written
    assert held(transport)["s"] == (1, full)
    # a looser fraction lets it through; so does --force
    code, _, err = run_cli(capsys, "--input", str(shrunk), *args, "--max-remove-fraction", "0.7")
    assert code == 0, err
    assert held(transport)["s"] == (2, BitMap64(range(600, 1000)))
    empty = write_set(tmp_path / "c", {"s": BitMap64(), "t": BitMap64([1, 2])})
    code, _, err = run_cli(capsys, "--input", str(empty), *args)
    assert code == 2 and "400 of 400" in err
    code, _, err = run_cli(capsys, "--input", str(empty), *args, "--force")
    assert code == 0, err
    assert held(transport)["s"] == (3, BitMap64())


def test_min_cardinality_and_the_fraction_boundary(log: LogDirTransport, tmp_path: Path) -> None:
    p = pub(log, guard=Guard())
    p.publish({"s": BitMap64(range(100))})
    # exactly half removed is allowed
    p.publish({"s": BitMap64(range(50))})
    # 10% removed but below the floor: refused, naming the numbers
    with pytest.raises(GuardError, match=r"segment s: would shrink from 50 to 45 members, below "
                       r"its min_cardinality 48"):  # fmt: skip
        p.publish({"s": BitMap64(range(45))}, min_cardinality={"s": 48})
    # growing while still under the floor is not a shrink; a new segment is not either
    result = p.publish(
        {"s": BitMap64(range(55)), "new": BitMap64([1])}, min_cardinality={"s": 60, "new": 10}
    )
    assert result.versions == {"s": 3, "new": 1}
    assert held(log)["s"] == (3, BitMap64(range(55)))


def test_manifest_min_cardinality_is_read_and_validated(
    log: LogDirTransport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--log-dir", str(log.path)]
    assert run_cli(capsys, "--input", str(write_set(tmp_path / "a", {"s": BitMap64(range(10))})),
                   *args)[0] == 0  # fmt: skip
    floored = write_set(tmp_path / "b", {"s": BitMap64(range(8))}, {"s": 9})
    code, _, err = run_cli(capsys, "--input", str(floored), *args)
    assert code == 2 and "below its min_cardinality 9" in err
    manifest = json.loads((floored / "manifest.json").read_text())
    manifest["segments"]["s"]["min_cardinality"] = -1
    (floored / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "--input", str(floored), *args)
    assert code == 2 and "min_cardinality must be a non-negative integer" in err
    code, _, err = run_cli(capsys, "--input", str(floored), *args, "--max-remove-fraction", "0")
    assert code == 2 and "(0, 1]" in err


def test_prune_is_guarded_an_explicit_drop_is_not(log: LogDirTransport) -> None:
    p = pub(log, guard=Guard())
    p.publish({"a": BitMap64([1, 2]), "b": BitMap64([3]), "c": BitMap64([4])})
    with pytest.raises(GuardError, match=r"segment c: dropping it \(--prune\) removes 1 of 1"):
        p.publish({"a": BitMap64([1, 2]), "b": BitMap64([3])}, prune=True)
    assert set(held(log)) == {"a", "b", "c"}
    assert p.publish({}, drop=["c"]).versions == {"c": 2}
    assert set(held(log)) == {"a", "b"}


def test_stream_default_lets_a_window_empty_a_segment(log: LogDirTransport) -> None:
    with pub(log, session=True, guard=Guard(STREAM_MAX_REMOVE_FRACTION)) as p:
        p.publish({"cart_30m": BitMap64(range(500))})
        assert p.publish({"cart_30m": BitMap64()}).versions == {"cart_30m": 2}
    # a session refused by its guard recovers on the next publish
    with pub(log, session=True, guard=Guard(0.5)) as p:
        p.publish({"w": BitMap64(range(10))})
        with pytest.raises(GuardError):
            p.publish({"w": BitMap64([1])})
        assert p.publish({"w": BitMap64(range(8))}).versions == {"w": 2}


@settings(max_examples=100, deadline=None)
@given(
    before=st.sets(st.integers(0, 60), max_size=40),
    after=st.sets(st.integers(0, 60), max_size=40),
    fraction=st.sampled_from([0.1, 0.5, 0.75, 1.0]),
    floor=st.none() | st.integers(0, 50),
    force=st.booleans(),
)
def test_guard_refuses_exactly_what_its_rules_say(
    before: set[int], after: set[int], fraction: float, floor: int | None, force: bool
) -> None:
    import tempfile

    from publisher.plan import SnapshotPacing, diff
    from sidecar.replica import RecoveredLog

    removed = len(before - after)
    refused = (
        not force
        and before != after
        and (
            (bool(before) and removed / len(before) > fraction)
            or (floor is not None and len(after) < min(floor, len(before)))
        )
    )
    floors = {} if floor is None else {"s": floor}
    guard = Guard(fraction, force=force)
    with tempfile.TemporaryDirectory() as d:
        log = LogDirTransport(Path(d) / "log")
        Publisher(log).publish({"s": BitMap64(before)})
        state = RecoveredLog(log)
        try:
            plan = diff(state, {"s": BitMap64(after)}, pacing=SnapshotPacing())
            if refused:
                with pytest.raises(GuardError, match="segment s"):
                    guard.check(state, plan, min_cardinality=floors)
            else:
                guard.check(state, plan, min_cardinality=floors)
        finally:
            state.close()


# -- history and rollback ------------------------------------------------------------------------

STATES = [
    BitMap64(range(0, 100)),
    BitMap64(range(50, 150)),
    BitMap64(range(50, 60)),
    BitMap64(range(40, 160)) | BitMap64([2**64 - 1]),
]


def test_history_and_rollback_through_the_cli(
    transport: Transport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = log_args(transport)
    for i, state in enumerate(STATES):
        d = write_set(tmp_path / f"in{i}", {"s": state, "other": BitMap64([i])})
        code, _, err = run_cli(capsys, "--input", str(d), *args, "--force")
        assert code == 0, err
    code, _, err = run_cli(capsys, "--drop", "other", *args)
    assert code == 0, err
    code, out, err = run_cli(capsys, "--history", "s", *args)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    # version, time, cardinality, adds, removes
    assert [r[2:5] for r in rows] == [
        ["100", "100", "0"],
        ["100", "50", "50"],
        ["10", "0", "90"],
        ["121", "111", "0"],
    ]
    assert all(r[1].endswith("+00:00") for r in rows)
    code, out, _ = run_cli(capsys, "--history", "other", *args)
    assert out.splitlines()[-1].split()[-1] == "drop"

    code, out, err = run_cli(capsys, "--rollback", "s", "--to-version", "2", *args)
    assert code == 0, err
    assert "rolled back s to the state of version 2 (100 members) as version 5" in out
    assert held(transport)["s"] == (5, STATES[1])
    # rolling back to the state it already has publishes nothing
    code, out, err = run_cli(capsys, "--rollback", "s", "--to-version", "5", *args)
    assert code == 0 and "no change" in out
    # the guards apply to a rollback too: version 3 removes 90 of 100
    before = log_ends(transport)
    code, _, err = run_cli(capsys, "--rollback", "s", "--to-version", "3", *args)
    assert code == 2 and "90 of 100" in err
    assert log_ends(transport) == before
    for bad, message in (
        (["--rollback", "s", "--to-version", "9"], "has no version 9"),
        (["--rollback", "s"], "needs --to-version"),
        (["--rollback", "bad seg!", "--to-version", "1"], "--rollback"),
        (["--rollback", "s", "--to-version", "1", "--input", "x"], "no --input"),
        (["--rollback", "other", "--to-version", "5"], "is its drop"),
    ):
        code, _, err = run_cli(capsys, *bad, *args)
        assert code == 2, bad
        assert message in err.strip().splitlines()[-1], (bad, err)
    assert log_ends(transport) == before


def test_rollback_of_a_dropped_segment_continues_its_versions(log: LogDirTransport) -> None:
    p = pub(log)
    p.publish({"s": BitMap64([1, 2, 3])})
    p.publish({}, drop=["s"])
    state = read_history(log, "s").state_at(1)
    assert p.publish({"s": state}).versions == {"s": 3}
    assert held(log)["s"] == (3, BitMap64([1, 2, 3]))


def test_history_of_split_deltas_and_chunked_snapshots(log: LogDirTransport) -> None:
    rnd = random.Random(3)
    big = BitMap64(rnd.randrange(2**64) for _ in range(150_000))  # several chunks and parts
    p = pub(log)
    p.publish({"big": big})
    smaller = BitMap64(list(big)[::2])
    p.publish({"big": smaller})
    h = read_history(log, "big")
    assert sorted(h.deltas) == [1, 2] and sorted(h.snapshots) == [1]
    assert h.state_at(1) == big and h.state_at(2) == smaller


# -- state_at: every way of rebuilding a version, and never a wrong answer ----------------------


def _history(states: list[BitMap64], deltas: set[int], snapshots: set[int]) -> History:
    """The history of a segment published as `states` (version i + 1 = states[i]), keeping only
    the deltas and snapshots of the given versions (retention and compaction took the rest)."""
    h = History("s")
    prev = BitMap64()
    for v, state in enumerate(states, start=1):
        if v in deltas:
            h.deltas[v] = Delta("s", v - 1, v, state - prev, prev - state, len(state), v)
        if v in snapshots:
            h.snapshots[v] = (BitMap64(state), v)
        prev = state
    return h


def test_state_at_goes_backward_from_a_later_snapshot() -> None:
    states = [BitMap64(range(i, i * 3 + 5)) for i in range(1, 9)]
    # Kafka after a week: the snapshot of version 6 (older ones compacted) and deltas 4..8
    h = _history(states, deltas={4, 5, 6, 7, 8}, snapshots={6})
    assert h.state_at(3) == states[2]  # backward: undo 6, 5, 4
    assert h.state_at(8) == states[7]  # forward from 6
    with pytest.raises(HistoryError, match="no longer holds enough"):
        h.state_at(2)


def test_state_at_refuses_a_history_that_disagrees_with_itself() -> None:
    states = [BitMap64([1, 2, 3]), BitMap64([1, 2, 3, 4])]
    h = _history(states, deltas={1, 2}, snapshots=set())
    h.deltas[2] = Delta("s", 1, 2, BitMap64([4]), BitMap64(), 9, 2)  # says 9 members
    with pytest.raises(HistoryError, match="disagrees with itself at version 2"):
        h.state_at(2)


def test_a_drop_is_a_known_empty_state() -> None:
    h = History("s")
    h.deltas[1] = Delta("s", 0, 1, BitMap64([1]), BitMap64(), 1, 1)
    h.drops[2] = Drop("s", 1, 2, 2)
    h.deltas[3] = Delta("s", 2, 3, BitMap64([5, 6]), BitMap64(), 2, 3)
    assert h.state_at(3) == BitMap64([5, 6])
    assert [v.kind for v in h.versions()] == ["delta", "drop", "delta"]


@settings(max_examples=150, deadline=None)
@given(
    states=st.lists(st.sets(st.integers(0, 40), max_size=20), min_size=1, max_size=10),
    deltas=st.sets(st.integers(1, 10)),
    snapshots=st.sets(st.integers(1, 10)),
    version=st.integers(1, 10),
)
def test_state_at_is_right_or_says_it_cannot(
    states: list[set[int]], deltas: set[int], snapshots: set[int], version: int
) -> None:
    bitmaps = [BitMap64(s) for s in states]
    h = _history(bitmaps, deltas, snapshots)
    try:
        got = h.state_at(version)
    except HistoryError:
        # only when the version is not there, or no chain of held records reaches it
        # (records of versions past the last published one were never written)
        deltas = {v for v in deltas if v <= len(states)}
        snapshots = {v for v in snapshots if v <= len(states)}
        reachable = version <= h.latest and (
            version in snapshots
            or all(v in deltas for v in range(1, version + 1))
            or any(
                s <= version and all(v in deltas for v in range(s + 1, version + 1))
                for s in snapshots
            )
            or any(
                s > version and all(v in deltas for v in range(version + 1, s + 1))
                for s in snapshots
            )
        )
        assert not reachable
        return
    assert got == bitmaps[version - 1]


# -- run metrics ---------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("writer") == "guards"
    }


def test_metrics_file_keeps_the_last_success_across_a_refused_run(
    log: LogDirTransport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prom = tmp_path / "textfile" / "seg_publish.prom"
    prom.parent.mkdir()
    args = ["--log-dir", str(log.path), "--writer-id", "guards", "--metrics-file", str(prom)]
    t0 = time.time()
    code, _, err = run_cli(capsys, "--input", str(write_set(tmp_path / "a",
                           {"s": BitMap64(range(10))})), *args)  # fmt: skip
    assert code == 0, err
    first = _samples(prom.read_text())
    assert set(first) == set(METRICS)
    assert first["seg_publish_last_exit_code"] == 0
    assert first["seg_publish_last_adds"] == 10 and first["seg_publish_last_segments_changed"] == 1
    assert t0 <= first["seg_publish_last_success_timestamp_seconds"] <= time.time()
    code, _, _ = run_cli(capsys, "--input", str(write_set(tmp_path / "b", {"s": BitMap64()})),
                         *args)  # fmt: skip
    assert code == 2
    second = _samples(prom.read_text())
    assert second["seg_publish_last_exit_code"] == 2
    assert (
        second["seg_publish_last_success_timestamp_seconds"]
        == first["seg_publish_last_success_timestamp_seconds"]
    )
    assert (
        second["seg_publish_last_run_timestamp_seconds"]
        >= first["seg_publish_last_run_timestamp_seconds"]
    )


class _Gateway(http.server.BaseHTTPRequestHandler):
    """Records what a Pushgateway would be sent."""

    received: list[tuple[str, str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    _Gateway.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _Gateway.received
    finally:
        server.shutdown()
        server.server_close()


def test_pushgateway_gets_post_per_writer_and_no_success_on_failure(
    log: LogDirTransport,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gateway: tuple[str, list[tuple[str, str, str]]],
) -> None:
    url, received = gateway
    args = ["--log-dir", str(log.path), "--writer-id", "guards", "--pushgateway", url]
    assert run_cli(capsys, "--input", str(write_set(tmp_path / "a", {"s": BitMap64([1])})),
                   *args)[0] == 0  # fmt: skip
    assert run_cli(capsys, "--input", str(tmp_path / "missing"), *args)[0] == 2
    (m1, path1, body1), (m2, path2, body2) = received
    assert (m1, m2) == ("POST", "POST")  # POST replaces only the metrics pushed
    assert path1 == path2 == "/metrics/job/seg-publish/writer/guards"
    assert set(_samples(body1)) == set(METRICS)
    assert "seg_publish_last_success_timestamp_seconds" not in _samples(body2)
    assert _samples(body2)["seg_publish_last_exit_code"] == 2


def test_definitions_min_cardinality_reaches_the_guard(
    log: LogDirTransport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[[segment]] min_cardinality -> the manifest compute writes -> seg-publish refuses."""
    import datetime as dt

    from compute.definitions import DefinitionError, parse
    from compute.segment_set import write_segment_set

    text = """
    [[segment]]
    name = "vip"
    sql = "SELECT user_id FROM users"
    min_cardinality = 90

    [[segment]]
    name = "free"
    sql = "SELECT user_id FROM users"
    """
    segments = parse(text, base_params={"as_of": "2026-12-01"})
    floors = {s.name: s.options() for s in segments}  # what compute.batch writes
    assert floors == {"vip": {"min_cardinality": 90}, "free": {}}
    now = dt.datetime.now(dt.UTC)
    args = ["--log-dir", str(log.path)]
    full = {"vip": BitMap64(range(100)), "free": BitMap64(range(100))}
    write_segment_set(tmp_path / "a", full, now, floors)
    assert run_cli(capsys, "--input", str(tmp_path / "a"), *args)[0] == 0
    shrunk = {"vip": BitMap64(range(80)), "free": BitMap64(range(80))}
    write_segment_set(tmp_path / "b", shrunk, now, floors)
    code, _, err = run_cli(capsys, "--input", str(tmp_path / "b"), *args)
    assert code == 2
    assert "segment vip: would shrink from 100 to 80 members, below its min_cardinality 90" in err
    assert "segment free" not in err
    with pytest.raises(DefinitionError, match="min_cardinality must be a non-negative integer"):
        parse(text.replace("min_cardinality = 90", "min_cardinality = -1"),
              base_params={"as_of": "2026-12-01"})  # fmt: skip

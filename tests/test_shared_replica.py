"""The shared replica (DESIGN.md "The shared replica", docs/SHARED_REPLICA.md): the segment
file format against the truth (hypothesis), `SharedReplica.contains` against the replica's own
local answer, reader processes running while publishes land (one version per read, never a
mixture), a writer that stops or dies and a sidecar that restarts."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.client import SidecarClient
from sidecar.ids import BadRequest
from sidecar.replica import Replica
from sidecar.shm.build import build_if_stale
from sidecar.transport import LogDirTransport
from tests.logtools import LogState, SidecarThread, publish_gap, publish_raw

REPO = Path(__file__).resolve().parent.parent


def _native():  # type: ignore[no-untyped-def]
    """The C extension; built in place when this checkout's build is missing or older than
    its source (`pip install -e .` builds it; a worktree sharing another checkout's venv may
    not have)."""
    build_if_stale()
    from sidecar.shm import _native as mod

    return mod


native = _native()

from sidecar.client.shared import SharedReplica  # noqa: E402
from sidecar.replica.forms import is_compact  # noqa: E402
from sidecar.shm import ShmUnavailable  # noqa: E402
from sidecar.shm.writer import ShmWriter, default_dir  # noqa: E402

HIGH = 2**64 - 1


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- the segment file format -----------------------------------------------------------------


def _shapes() -> st.SearchStrategy[list[int]]:
    dense = st.tuples(st.integers(0, HIGH - 70_000), st.integers(1, 70_000), st.integers(1, 20))
    return st.one_of(
        st.lists(st.integers(0, HIGH), max_size=300),  # random over 2**64: sorted ids
        st.lists(st.integers(0, 2**32 - 1), max_size=3000),  # random over 2**32
        st.lists(dense, min_size=1, max_size=3).map(
            lambda runs: [x for a, n, step in runs for x in range(a, min(a + n * step, HIGH), step)]
        ),  # runs and steps: bitset and array containers, across container borders
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=_shapes(), probes=st.lists(st.integers(0, HIGH), max_size=50), version=st.integers(1, 2**40)
)
def test_segment_file_answers_as_the_bitmap(tmp_path_factory, ids, probes, version) -> None:  # type: ignore[no-untyped-def]
    bm = BitMap64(ids)
    data = native.encode(bm.to_array(), version)
    path = tmp_path_factory.mktemp("seg") / "s.seg"
    path.write_bytes(data)
    seg = native.Segment(str(path))
    assert (seg.cardinality, seg.version, seg.size) == (len(bm), version, len(data))
    members = list(bm)
    neighbours = [x + d for x in members[:200] for d in (-1, 1) if 0 <= x + d <= HIGH]
    for x in members[:500] + neighbours + probes + [0, HIGH]:
        assert seg.contains(x) == (x in bm), x
    # the smaller of the two forms is the one written (docs/SHARED_REPLICA.md has the sizes)
    cards: dict[int, int] = {}
    for x in members:
        cards[x >> 16] = cards.get(x >> 16, 0) + 1
    pad = lambda n: (n + 7) // 8 * 8  # noqa: E731
    containers = native.SEGMENT_HEADER + 16 * len(cards) + pad(4 * len(cards))
    containers += sum(8192 if c > native.ARRAY_MAX else pad(2 * c) for c in cards.values())
    sorted_size = native.SEGMENT_HEADER + 8 * len(bm)
    sizes = {native.KIND_CONTAINERS: containers, native.KIND_SORTED: sorted_size}
    if members:  # Elias-Fano: low bits, unary high parts, a select sample every EF_SAMPLE zeros
        span, n = members[-1] - members[0], len(members)
        low = (span // n).bit_length() - 1 if span // n else 0
        zeros = (span >> low) + 1
        words = -(-n * low // 64) + -(-(n + zeros) // 64) + -(-zeros // native.EF_SAMPLE)
        sizes[native.KIND_ELIAS_FANO] = native.SEGMENT_HEADER + 8 * words
    smallest = min(sizes.values())
    assert len(data) == smallest
    # ties: containers, then Elias-Fano, then sorted ids
    order = (native.KIND_CONTAINERS, native.KIND_ELIAS_FANO, native.KIND_SORTED)
    assert seg.kind == next(k for k in order if sizes.get(k) == smallest)


def test_encode_and_map_refuse_what_is_not_a_segment(tmp_path: Path) -> None:
    from array import array

    with pytest.raises(ValueError, match="ascending"):
        native.encode(array("Q", [5, 3]), 1)
    bad = tmp_path / "bad.seg"
    bad.write_bytes(b"not a segment file at all" * 4)
    with pytest.raises(ValueError, match="magic"):
        native.Segment(str(bad))
    good = native.encode(array("Q", range(0, 100_000, 7)), 1)
    (tmp_path / "cut.seg").write_bytes(good[: len(good) // 2])  # a truncated file
    with pytest.raises(ValueError, match="sizes"):
        native.Segment(str(tmp_path / "cut.seg"))
    with pytest.raises(FileNotFoundError):
        native.Segment(str(tmp_path / "missing.seg"))


# -- a replica, its writer and a reader ---------------------------------------------------------

SEGMENTS = {
    "dense": BitMap64(range(3 * 2**31, 3 * 2**31 + 200_000)),
    "sparse": BitMap64(range(5, 10_000_000, 997)),
    "wide": BitMap64([1, 2**33 + 7, 2**63, HIGH]),
    "stale": BitMap64([1, 2, 3]),
    "gone": BitMap64([4]),
}


@pytest.fixture
def published(workdir: Path) -> Iterator[tuple[Replica, ShmWriter, SidecarThread, LogState]]:
    log = LogDirTransport(workdir / "log")
    state = publish_raw(log, SEGMENTS)
    publish_raw(log, {}, state, drop=("gone",))
    publish_gap(log, "stale", state)
    replica = Replica(LogDirTransport(workdir / "log"), poll_interval=0.01).start()
    assert replica.wait_ready(10)
    writer = ShmWriter(replica, default_dir(workdir / "s.sock")).start()
    wait_until(lambda: writer.published.keys() == {"dense", "sparse", "wide"}, what="a sync")
    with SidecarThread(
        replica, uds_path=workdir / "s.sock", http_host=None, shm_info=writer.info()
    ) as server:
        yield replica, writer, server, state
    writer.stop()
    replica.stop(save=False)


def test_contains_answers_as_the_local_check(published) -> None:  # type: ignore[no-untyped-def]
    replica, writer, server, _ = published
    wait_until(lambda: replica.local("stale") == "stale", what="the gap")
    reader = SharedReplica(server.uds_path)
    users = [0, 1, 4, 5, 6, 2**33 + 7, 2**63, HIGH, 3 * 2**31, 3 * 2**31 + 199_999]
    users += list(range(3 * 2**31 - 5, 3 * 2**31 + 5)) + list(range(0, 20_000, 7))
    for segment in [*SEGMENTS, "never-published"]:
        for user in users:
            assert reader.contains(user, segment) == replica.contains(user, segment)
    assert reader.contains(1, "stale") is None and reader.contains(4, "gone") is None
    assert reader.segments() == {"dense": 1, "sparse": 1, "wide": 1}
    # bad input is the sidecar's bad request, whether or not the segment is published
    for user, segment in [(-1, "dense"), (2**64, "dense"), (True, "dense"), ("7", "x"),
                          (1.0, "nope"), (1, "bad segment"), (1, 7)]:  # fmt: skip
        with pytest.raises(BadRequest):
            reader.contains(user, segment)
    # `check` asks the socket where the shared replica cannot answer
    assert reader.check(1, "never-published") is None
    assert reader.check(5, "sparse") is True
    assert SidecarClient(server.uds_path, timeout=10).shm_info() == writer.info()


def test_a_publish_lands_whole(published, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    replica, _writer, server, state = published
    reader = SharedReplica(server.uds_path)
    view = reader.segment("dense")
    assert view.version == 1 and view.contains(3 * 2**31)
    publish_raw(LogDirTransport(workdir / "log"), {"dense": BitMap64(range(10, 20))}, state)
    wait_until(lambda: reader.contains(15, "dense"), what="the new version")
    assert reader.contains(3 * 2**31, "dense") is False
    assert reader.segment("dense").version == 2
    # the old view still answers from the old version (its file unlinked, still mapped)
    assert view.contains(3 * 2**31) and not view.contains(15)
    # one file per published segment: the old version's is unlinked after the swap
    shm = default_dir(workdir / "s.sock")
    wait_until(lambda: len(list(shm.glob("*.seg"))) == 3, what="the old version's file unlinked")


def test_not_ready_publishes_nothing(workdir: Path) -> None:
    publish_raw(LogDirTransport(workdir / "log"), {"a": BitMap64([1])})
    replica = Replica(LogDirTransport(workdir / "log"))  # never started: not ready
    writer = ShmWriter(replica, workdir / "shm").start()
    try:
        reader = SharedReplica(shm_dir=workdir / "shm")
        assert reader.contains(1, "a") is None
        assert reader.connected and reader.segments() == {}
    finally:
        writer.stop()


def test_writer_stop_and_restart_remap(published, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    replica, writer, server, _ = published
    reader = SharedReplica(server.uds_path, retry_s=0.01)
    assert reader.contains(5, "sparse") is True and reader.remaps == 1
    writer.stop()  # closed: readers let go at their next check
    assert reader.contains(5, "sparse") is None
    assert not list(default_dir(workdir / "s.sock").glob("*.seg"))
    again = ShmWriter(replica, default_dir(workdir / "s.sock")).start()
    server.sidecar.uds.shm_info = again.info()
    try:
        wait_until(lambda: reader.contains(5, "sparse") is True, what="the remap")
        assert reader.remaps == 2 and reader.instance == again.instance
    finally:
        again.stop()


def test_a_silent_writer_is_not_answered_from(published) -> None:  # type: ignore[no-untyped-def]
    _replica, writer, server, _ = published
    reader = SharedReplica(server.uds_path, max_age_ms=300, retry_s=0.01)
    # beats every 250 ms against a 300 ms age: a loaded machine can age one past it
    wait_until(lambda: reader.contains(5, "sparse") is True, what="an answer while it beats")
    writer._stop.set()  # the thread stops beating, as a killed sidecar's would
    writer._thread.join(10)
    wait_until(lambda: reader.contains(5, "sparse") is None, what="the heartbeat to age")


def test_one_writer_per_directory(workdir: Path) -> None:
    replica = Replica(LogDirTransport(workdir / "log"))
    first = ShmWriter(replica, workdir / "shm").start()
    try:
        with pytest.raises(ShmUnavailable, match="another sidecar"):
            ShmWriter(replica, workdir / "shm").start()
    finally:
        first.stop()


def test_the_index_grows(workdir: Path) -> None:
    log = LogDirTransport(workdir / "log")
    publish_raw(log, {f"s{i}": BitMap64([i]) for i in range(1500)})  # over the first 1024
    replica = Replica(LogDirTransport(workdir / "log"), poll_interval=0.01).start()
    try:
        assert replica.wait_ready(20)
        writer = ShmWriter(replica, workdir / "shm").start()
        reader = SharedReplica(shm_dir=workdir / "shm", retry_s=0.01)
        wait_until(lambda: len(reader.segments()) == 1500, what="1500 segments", timeout=60)
        assert all(reader.contains(i, f"s{i}") for i in range(0, 1500, 37))
        writer.stop()
    finally:
        replica.stop(save=False)


# -- a reader process while publishes land -----------------------------------------------------


SPREAD = 0x9E3779B97F4A7C15  # odd: i -> i * SPREAD mod 2**64 spreads consecutive i over 2**64


def _id(shape: str, i: int) -> int:
    return i if shape == "dense" else (i * SPREAD) % 2**64


def members(version: int, shape: str = "dense") -> BitMap64:
    """Version v of segment "moving": every version adds and removes members. "dense": a run
    (the engine holds it as roaring); "sparse": 5,000 ids spread over 2**64 (the compact form,
    sidecar/replica/forms.py). Both carry the marker 2**40 + v."""
    base = version * 1000
    return BitMap64(_id(shape, i) for i in range(base, base + 5000)) | BitMap64([2**40 + version])


def _reader_process(shm_dir: str, until: float, out: mp.Queue, shape: str) -> None:  # type: ignore[type-arg]
    reader = SharedReplica(shm_dir=shm_dir)
    seen: set[int] = set()
    problems: list[str] = []
    checks = 0
    while time.monotonic() < until and len(problems) < 5:
        view = reader.segment("moving")
        if view is None:
            continue
        v = view.version
        seen.add(v)
        # a whole view at one version: never a mixture of two
        for user in (_id(shape, v * 1000), _id(shape, v * 1000 + 4999), 2**40 + v):
            if not view.contains(user):
                problems.append(f"version {v}: {user} missing")
        absent = (_id(shape, v * 1000 - 1), _id(shape, v * 1000 + 5000), 2**40 + v - 1)
        for user in (*absent, 2**40 + v + 1):
            if view.contains(user):
                problems.append(f"version {v}: {user} present")
        if view.cardinality != 5001:
            problems.append(f"version {v}: cardinality {view.cardinality}")
        # single checks: each answers from a version at least as new as the one before
        marker = next((u for u in range(v, v + 50) if reader.contains(2**40 + u, "moving")), None)
        if marker is None or marker < v:
            problems.append(f"after version {v}: marker {marker}")
        checks += 10
    out.put({"seen": sorted(seen), "problems": problems, "checks": checks})


@pytest.mark.parametrize("shape", ["dense", "sparse"])
def test_readers_see_whole_versions_while_publishes_land(workdir: Path, shape: str) -> None:
    log = LogDirTransport(workdir / "log")
    state = publish_raw(log, {"moving": members(1, shape)})
    replica = Replica(LogDirTransport(workdir / "log"), poll_interval=0.001).start()
    assert replica.wait_ready(10)
    writer = ShmWriter(replica, workdir / "shm").start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    until = time.monotonic() + 8
    procs = [ctx.Process(target=_reader_process, args=(str(workdir / "shm"), until, out, shape))
             for _ in range(2)]  # fmt: skip
    forms_seen = set()
    try:
        for p in procs:
            p.start()
        version = 1
        while time.monotonic() < until - 1:
            version += 1
            publish_raw(log, {"moving": members(version, shape)}, state)
            forms_seen.add(is_compact(replica.engine.segments["moving"].bitmap))
            time.sleep(0.01)
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
        writer.stop()
        replica.stop(save=False)
    for res in results:
        assert res["problems"] == []
        assert len(res["seen"]) > 5, res["seen"]  # the readers did see publishes land
    assert version > 20
    assert forms_seen == {shape == "sparse"}  # the form the engine chose for the shape


# -- seg-sidecar --shm ---------------------------------------------------------------------------


def _sidecar(uds: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--log-dir", str(uds.parent / "log"),
         "--uds", str(uds), "--http", "", *extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip


def test_sidecar_restart_is_remapped(workdir: Path) -> None:
    publish_raw(LogDirTransport(workdir / "log"), {"a": BitMap64([7])})
    uds = workdir / "s.sock"
    proc = _sidecar(uds)
    try:
        wait_until(uds.exists, what="the socket")
        reader = SharedReplica(uds, max_age_ms=500, retry_s=0.05)
        wait_until(lambda: reader.contains(7, "a") is True, what="the first answer")
        assert SidecarClient(uds, timeout=10).shm_info()["dir"] == str(workdir / "s.shm")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: reader.contains(7, "a") is None, what="the dead writer noticed")
        uds.unlink()
        proc = _sidecar(uds)
        wait_until(lambda: reader.contains(7, "a") is True, what="the remap", timeout=60)
        assert reader.remaps == 2
        wait_until(uds.exists, what="the socket")  # signal handlers are set by then
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_shm_off_and_a_taken_directory(workdir: Path) -> None:
    publish_raw(LogDirTransport(workdir / "log"), {"a": BitMap64([7])})
    uds = workdir / "s.sock"
    proc = _sidecar(uds, "--shm", "")
    try:
        wait_until(uds.exists, what="the socket")
        assert SidecarClient(uds, timeout=10).shm_info() is None
        assert SharedReplica(uds).contains(7, "a") is None
        assert not (workdir / "s.shm").exists()
        other = workdir / "t.sock"
        taken = ShmWriter(Replica(LogDirTransport(workdir / "log")), workdir / "taken").start()
        try:
            second = _sidecar(other, "--shm", str(workdir / "taken"))
            assert second.wait(60) == 1
            err = second.stderr.read().decode().strip().splitlines()
            assert err[-1].startswith("seg-sidecar: error: another sidecar publishes"), err
        finally:
            taken.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_option_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.cli import build_parser

    assert build_parser().parse_args(["--log-dir", "d"]).shm is None  # beside the socket
    monkeypatch.setenv("SEG_SHM", "")
    assert build_parser().parse_args(["--log-dir", "d"]).shm == ""  # off
    monkeypatch.setenv("SEG_SHM", "/dev/shm/x")
    assert build_parser().parse_args(["--log-dir", "d"]).shm == "/dev/shm/x"


def test_a_segment_stale_by_age_is_not_answered(workdir: Path) -> None:
    """Past its max_age_seconds (on the replica's clock) a segment leaves the shared replica
    as `Replica.local` stops answering it, and comes back with the next heartbeat."""
    from publisher.publish import Publisher

    publisher = Publisher(LogDirTransport(workdir / "log"), writer_id="t", partitions=1)
    publisher.publish({"aged": BitMap64([1]), "plain": BitMap64([2])}, max_age={"aged": 60})
    replica = Replica(LogDirTransport(workdir / "log"), poll_interval=0.01)
    clock = [int(time.time() * 1000)]
    replica.clock_ms = lambda: clock[0]
    replica.start()
    assert replica.wait_ready(10)
    writer = ShmWriter(replica, workdir / "shm", rescan=60).start()  # woken, not rescanned
    try:
        reader = SharedReplica(shm_dir=workdir / "shm")
        wait_until(lambda: reader.contains(1, "aged") is True, what="the first sync")
        clock[0] += 61_000
        wait_until(lambda: reader.contains(1, "aged") is None, what="stale by age")
        assert reader.contains(2, "plain") is True
        clock[0] -= 61_000
        wait_until(lambda: reader.contains(1, "aged") is True, what="fresh again")
    finally:
        writer.stop()
        replica.stop(save=False)


# -- no system call per check --------------------------------------------------------------------

_TRACED = """
import os, sys
from sidecar.client import SharedReplica
r = SharedReplica(shm_dir=sys.argv[1])
c = r.contains
for u in range(1000):  # warm: mapped, table taken
    c(u, "dense"), c(u, "nope")
os.write(2, b"<<checks")
for u in range(100_000):
    c(u, "dense"), c(u + 5, "sparse"), c(u, "nope")
os.write(2, b"checks>>")
"""


def test_no_system_call_per_check(published, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    """200,000 answered checks and 100,000 None ones under strace: no system call between the
    markers (the heartbeat check reads CLOCK_MONOTONIC_COARSE from the vDSO)."""
    trace = workdir / "trace"
    subprocess.run(
        ["strace", "-f", "-o", str(trace), sys.executable, "-c", _TRACED,
         str(default_dir(workdir / "s.sock"))],
        check=True,
        capture_output=True,
        cwd=REPO,
    )  # fmt: skip
    text = trace.read_text()
    start = text.index("<<checks")
    inside = text[text.index("\n", start) + 1 : text.index("checks>>")].strip().splitlines()
    assert inside[:-1] == [], inside[:20]  # the last line is the closing marker's own write

"""A damaged log directory (issue 12, defect 1): bytes flipped inside an earlier batch are not
a torn tail. The writer refuses with one line and changes nothing; readers (a fresh and a
tailing replica) serve the intact prefix and report the damage in `status`, `/readyz` and
`seg_replica_log_damaged`; `seg-publish --repair-log` keeps the prefix only when told and
says what it drops. Torn and garbage tails stay what they were: invisible, then truncated."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from compute.segment_set import write_segment_set
from publisher import Publisher
from sidecar.replica import Replica
from sidecar.server.metrics import ReplicaCollector
from sidecar.transport import LogDirTransport
from sidecar.transport.base import TransportError
from sidecar.transport.logdir import MAGIC, survey
from tests.logtools import (
    HeldRebootstrap,
    SidecarThread,
    get_json,
    ready_replica,
    started_replica,
)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30
HISTORY = [
    {"a": BitMap64([1]), "b": BitMap64([10])},
    {"a": BitMap64([1, 2]), "b": BitMap64([10, 11])},
    {"a": BitMap64([1, 2, 3]), "b": BitMap64([11])},
    {"a": BitMap64([3]), "b": BitMap64([11, 12])},
]


def batch_starts(data: bytes) -> list[int]:
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += 12 + length
    return starts


def published(path: Path) -> bytes:
    """A log of four publishes (one batch each); returns the file's bytes."""
    t = LogDirTransport(path)
    for desired in HISTORY:
        Publisher(t, partitions=2).publish(desired)
    return (path / "log").read_bytes()


def flip_middle(path: Path) -> tuple[bytes, int]:
    """Flip bytes inside the payload of the second of four batches; returns (the damaged
    bytes, where the intact prefix ends)."""
    data = bytearray((path / "log").read_bytes())
    starts = batch_starts(bytes(data))
    assert len(starts) == 4
    mid = starts[1] + 12 + 5
    for i in range(3):
        data[mid + i] ^= 0x5A
    (path / "log").write_bytes(bytes(data))
    return bytes(data), starts[1]


def seg_publish(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "publisher.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def segment_set(tmp: Path, desired: dict[str, BitMap64]) -> Path:
    write_segment_set(tmp / "set", desired, dt.datetime.now(dt.UTC))
    return tmp / "set"


def test_the_writer_refuses_a_damaged_log_and_changes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    published(log)
    damaged, _ = flip_middle(log)
    with pytest.raises(TransportError) as caught:
        LogDirTransport(log).writer("w")
    message = str(caught.value)
    assert "damaged at byte" in message and "--repair-log" in message and "\n" not in message
    assert "2 valid batches" in message
    # seg-publish: exit 1, one line, the file untouched
    run = seg_publish(
        "--input",
        str(segment_set(tmp_path, {"a": BitMap64([7])})),
        "--log-dir",
        str(log),
        "--quiet",
    )
    assert run.returncode == 1, run
    last = run.stderr.strip().splitlines()[-1]
    assert "damaged at byte" in last and "--repair-log" in last
    assert (log / "log").read_bytes() == damaged


def test_a_damaged_tail_batch_with_nothing_valid_after_it_is_a_torn_tail(tmp_path: Path) -> None:
    log = tmp_path / "log"
    data = published(log)
    starts = batch_starts(data)
    cut = starts[-1] + 20
    (log / "log").write_bytes(data[:cut])  # the last batch torn mid-append
    prefix, damage = survey((log / "log").read_bytes())
    assert (prefix, damage) == (starts[-1], None)
    (log / "log").write_bytes(data + b"\x00garbage\xff" * 3)  # a garbage tail
    assert survey((log / "log").read_bytes()) == (len(data), None)
    with LogDirTransport(log).writer("w"):  # truncated, as before
        pass
    assert (log / "log").read_bytes() == data


def wait_for(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def assert_reports_damage(replica: Replica) -> None:
    status = replica.status()
    assert "damaged at byte" in str(status["log_damage"])
    with SidecarThread(replica, uds_path=None, http_host="127.0.0.1") as s:
        code, body = get_json(s.http_url + "/readyz")
        assert code == 200 and "damaged at byte" in body["reason"]
        with urllib.request.urlopen(s.http_url + "/metrics", timeout=10) as resp:
            assert "seg_replica_log_damaged 1.0" in resp.read().decode()


def test_a_fresh_replica_serves_the_intact_prefix_and_reports_the_damage(tmp_path: Path) -> None:
    log = tmp_path / "log"
    published(log)
    flip_middle(log)
    with started_replica(LogDirTransport(log), poll_interval=0.01) as replica:
        assert replica.wait_ready(WAIT), replica.status()
        # the first publish only: the second batch is damaged, the rest lies beyond it
        wait_for(lambda: replica.state("a") is not None, "segment a")
        assert list(replica.state("a").bitmap) == [1]  # type: ignore[union-attr]
        assert replica.state("a").version == 1  # type: ignore[union-attr]
        assert_reports_damage(replica)


def test_a_tailing_replica_stops_at_damage_and_reports_it(tmp_path: Path) -> None:
    log = tmp_path / "log"
    good = published(tmp_path / "model")  # the same four batches, built elsewhere
    starts = batch_starts(good)
    (log).mkdir()
    (log / "meta.json").write_bytes((tmp_path / "model" / "meta.json").read_bytes())
    (log / "log").write_bytes(good[: starts[1]])
    with started_replica(LogDirTransport(log), poll_interval=0.01) as replica:
        assert replica.wait_ready(WAIT), replica.status()
        assert replica.log_damage() is None
        rest = bytearray(good[starts[1] :])
        rest[20] ^= 0xFF  # inside the second batch's payload
        with open(log / "log", "ab") as f:  # one append: the reader never sees it whole
            f.write(bytes(rest))
        wait_for(lambda: replica.log_damage() is not None, "the damage to be reported")
        assert replica.state("a").version == 1  # type: ignore[union-attr]
        assert_reports_damage(replica)


def test_repair_log_keeps_the_prefix_says_what_it_drops_and_publishing_resumes(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    published(log)
    damaged, prefix = flip_middle(log)
    old_id = json.loads((log / "meta.json").read_text())["log_id"]
    run = seg_publish("--log-dir", str(log), "--repair-log")
    assert run.returncode == 0, run
    out = run.stdout.strip()
    assert "kept the intact prefix (1 batches" in out and "dropped 2 valid batches" in out
    assert (log / "log").read_bytes() == damaged[:prefix]
    saved = [p for p in log.iterdir() if p.name.startswith("log.damaged-")]
    assert len(saved) == 1 and saved[0].read_bytes() == damaged[prefix:]
    assert json.loads((log / "meta.json").read_text())["log_id"] != old_id
    assert MAGIC in saved[0].read_bytes()
    # nothing left to repair; publishing works again and restores the state
    again = seg_publish("--log-dir", str(log), "--repair-log")
    assert again.returncode == 0 and "nothing to repair" in again.stdout
    versions = Publisher(LogDirTransport(log), partitions=2).publish(HISTORY[-1]).versions
    assert versions == {"a": 2, "b": 2}
    with started_replica(LogDirTransport(log), poll_interval=0.01) as replica:
        assert replica.wait_ready(WAIT)
        assert {s: list(st.bitmap) for s, st in replica.engine.segments.items()} == {
            "a": [3],
            "b": [11, 12],
        }
        assert replica.log_damage() is None


def answers(replica: Replica) -> dict[str, tuple[int, list[int]]]:
    return {s: (st.version, list(st.bitmap)) for s, st in replica.segment_items()}


def repair_and_republish(log: Path, later: dict[str, BitMap64]) -> None:
    assert seg_publish("--log-dir", str(log), "--repair-log").returncode == 0
    publisher = Publisher(LogDirTransport(log), partitions=2)
    for desired in (HISTORY[-1], later, later | {"b": BitMap64([14])}):
        publisher.publish(desired)


@pytest.mark.parametrize("grown", [False, True], ids=["shrunk", "grown"])
def test_a_replica_tailing_through_repair_log_answers_as_a_fresh_one(
    tmp_path: Path, grown: bool
) -> None:
    """A replica that read all four batches before the damage: after the repair its offsets
    and versions 2..4 mean other changes (the republish writes versions 2 and 3 again). It
    notices the new identity by itself and answers as a replica started after the repair,
    whether it sees the log shrink under it or only grown past where it stood (the repair
    and the republishes landed between two of its reads: it would read from inside a batch)."""
    log = tmp_path / "log"
    published(log)
    later = {"a": BitMap64([5, 6]), "b": BitMap64([12, 13])}
    with started_replica(LogDirTransport(log), poll_interval=0.01) as tailing:
        assert tailing.wait_ready(WAIT), tailing.status()
        wait_for(lambda: tailing.engine.version_of("a") == 4, "all four publishes")
        damaged, _ = flip_middle(log)
        if grown:  # repaired and republished aside, then written over the log in one go
            aside = tmp_path / "aside"
            shutil.copytree(log, aside)
            repair_and_republish(aside, later)
            data = (aside / "log").read_bytes()
            assert len(data) > len(damaged)
            fd = os.open(log / "log", os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, 0) == len(data)
            finally:
                os.close(fd)
            os.replace(aside / "meta.json", log / "meta.json")
        else:
            repair_and_republish(log, later)
        with ready_replica(LogDirTransport(log), WAIT) as fresh:
            want = answers(fresh)
            assert want == {"a": (3, [5, 6]), "b": (4, [14])}
            wait_for(lambda: answers(tailing) == want, "the tailing replica to answer the same")
            assert tailing.ready and tailing.log_damage() is None
            assert tailing.status()["rebootstraps"] >= 1
            for user in range(16):
                for segment in want:
                    assert tailing.contains(user, segment) == fresh.contains(user, segment)


class RepairHeld(HeldRebootstrap):
    """A replica serving a published log (all four publishes in) whose bootstrap after a
    `--repair-log` `repaired` holds (`HeldRebootstrap`)."""

    def __init__(self, tailing: Replica, log: Path) -> None:
        super().__init__(tailing, WAIT)
        self.log = log
        assert tailing.wait_ready(WAIT), tailing.status()
        wait_for(lambda: tailing.engine.version_of("a") == 4, "all four publishes")

    def repair(self) -> None:
        """Damage, repair and republish the log: a = [5, 6] at version 3."""
        flip_middle(self.log)
        repair_and_republish(self.log, {"a": BitMap64([5, 6]), "b": BitMap64([12, 13])})

    def repaired(self) -> contextlib.AbstractContextManager[None]:
        """`repair`, held inside (`HeldRebootstrap.changed`)."""
        return self.changed(self.repair)


@contextlib.contextmanager
def held_rebootstrap(tmp_path: Path) -> Iterator[RepairHeld]:
    log = tmp_path / "log"
    published(log)
    with started_replica(LogDirTransport(log), poll_interval=0.01) as tailing:
        yield RepairHeld(tailing, log)


def test_read_your_publish_waits_for_the_bootstrap_after_repair_log(tmp_path: Path) -> None:
    """While a serving replica bootstraps again after --repair-log (the old state answering
    meanwhile), its versions are of the old log: version 4 there is not the republish's
    version 3. A `check_at` waits for the new state (or answers unknown), never answers
    from the old one; once the new state is in, it answers from it."""
    with held_rebootstrap(tmp_path) as held:
        # the republish wrote a = [5, 6] at version 3: the old state's 4 is not it
        held.assert_check_at_waits(held.repair, "a", old_member=3, new_member=5, version=3)


def _gauges(replica: Replica) -> dict[str, float]:
    return {
        m.name: m.samples[0].value
        for m in ReplicaCollector(replica).collect()
        if m.type == "gauge" and len(m.samples) == 1
    }


def test_status_and_metrics_show_a_rebootstrap_under_way(tmp_path: Path) -> None:
    """While a serving replica bootstraps again after --repair-log, its status says so and
    since when (`rebootstrapping_since_ms`, and the `reason` `/readyz` carries), and so do
    the metrics; once the new state is in, neither does, and `rebootstraps` counts it."""
    with held_rebootstrap(tmp_path) as held:
        tailing = held.tailing
        st = tailing.status()
        assert st["rebootstrapping_since_ms"] is None and st["reason"] is None
        assert _gauges(tailing)["seg_replica_rebootstrapping"] == 0
        before = time.time() * 1000
        with held.repaired():
            st = tailing.status()
            since = st["rebootstrapping_since_ms"]
            assert isinstance(since, int) and before - 1 <= since <= time.time() * 1000
            assert st["ready"] is True and st["rebootstraps"] == 0
            assert "bootstrapping again" in str(st["reason"]), st
            gauges = _gauges(tailing)
            assert gauges["seg_replica_rebootstrapping"] == 1
            assert gauges["seg_replica_rebootstrap_started_timestamp_seconds"] == since / 1000
        wait_for(lambda: tailing.status()["rebootstraps"] == 1, "the swap")
        st = tailing.status()
        assert st["rebootstrapping_since_ms"] is None and st["reason"] is None, st
        gauges = _gauges(tailing)
        assert gauges["seg_replica_rebootstrapping"] == 0
        assert gauges["seg_replica_rebootstrap_started_timestamp_seconds"] == 0


def test_a_checkpoint_being_written_across_a_rebootstrap_stays_of_the_old_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic checkpoint taken before the log's new identity and written after the
    replica bootstrapped again holds the old state under the old identity (never the old
    state under the new one): a restart ignores it; the next checkpoint is of the new log,
    and a restart from it answers as a fresh replica."""

    from sidecar.replica import checkpoint
    from tests.test_ttl import gate_checkpoint_writes

    log, state = tmp_path / "log", tmp_path / "state"
    published(log)
    gate = threading.Event()
    opened = gate_checkpoint_writes(monkeypatch, [gate, None])
    old_id = json.loads((log / "meta.json").read_text())["log_id"]
    options = {"poll_interval": 0.01, "state_dir": state, "checkpoint_interval": 0.05}
    with started_replica(LogDirTransport(log), **options) as tailing:  # type: ignore[arg-type]
        try:
            assert tailing.wait_ready(WAIT), tailing.status()
            wait_for(lambda: tailing.engine.version_of("a") == 4, "all four publishes")
            wait_for(lambda: opened, "a checkpoint to start writing")
            flip_middle(log)
            repair_and_republish(log, {"a": BitMap64([5, 6]), "b": BitMap64([12, 13])})
            with ready_replica(LogDirTransport(log), WAIT) as fresh:
                want = answers(fresh)
            wait_for(lambda: answers(tailing) == want, "the rebootstrap")
            assert tailing.checkpoints_written == 0, "the first write still hangs"
        finally:
            gate.set()
        wait_for(lambda: tailing.checkpoints_written >= 1, "the old checkpoint written")
        first = checkpoint.read(state)
        assert first is not None and old_id in first.log_id
        assert {n: s.version for n, s in first.segments.items()} == {"a": 4, "b": 4}
        wait_for(lambda: tailing.checkpoints_written >= 2, "a checkpoint of the new log")
        tailing.stop(save=False)
    second = checkpoint.read(state)
    assert second is not None and old_id not in second.log_id
    assert {n: (s.version, list(s.bitmap)) for n, s in second.segments.items()} == want
    with started_replica(LogDirTransport(log), poll_interval=0.01, state_dir=state) as again:
        assert again.wait_ready(WAIT) and again.started_from == "checkpoint"
        assert answers(again) == want


def test_repair_log_needs_a_log_directory(tmp_path: Path) -> None:
    run = seg_publish("--kafka", "127.0.0.1:9", "--repair-log")
    assert run.returncode == 2 and "--repair-log takes --log-dir" in run.stderr


@pytest.mark.parametrize(
    "bad",
    [
        MAGIC + b"\0" * 8,  # an empty payload: its checksum is 0 too (found by atheris)
        MAGIC + (3).to_bytes(4, "big") + zlib.crc32(b"\x91\x05").to_bytes(4, "big") + b"\x91\x05",
    ],
    ids=["empty", "not-entries"],
)
def test_a_checksummed_batch_that_is_not_entries_is_no_batch(tmp_path: Path, bad: bytes) -> None:
    log = tmp_path / "log"
    data = published(log)
    (log / "log").write_bytes(data + bad)
    assert survey((log / "log").read_bytes()) == (len(data), None)
    with started_replica(LogDirTransport(log), poll_interval=0.01) as replica:
        assert replica.wait_ready(WAIT) and replica.error is None
        assert replica.state("a").version == 4  # type: ignore[union-attr]

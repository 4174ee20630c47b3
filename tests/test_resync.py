"""A resync (sidecar/replica/recovery.py `resync`: a stale segment rebuilt from its snapshot and
the deltas before where the main reader stands) reads with a reader of its own: it installs
nothing from a log of another identity than the main reader's (its offsets would be another
log's), and a resync that fails is asked for again rather than leaving its segments stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.replica import Replica, recovery
from sidecar.replica.engine import Engine
from sidecar.transport.base import NewLogIdentity, TransportError
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import PARTITIONS, publish_raw


def test_a_resync_installs_nothing_from_a_log_of_another_identity(tmp_path: Path) -> None:
    t = LogDirTransport(tmp_path / "log")
    publish_raw(t, {"a": BitMap64([1, 2]), "b": BitMap64([3])})
    with t.reader() as reader:
        opened = reader.identity()
        ends = {p: end for p, (_, end) in reader.watermarks_all("deltas").items()}
    engine = Engine()
    with pytest.raises(NewLogIdentity, match="new identity") as raised:
        recovery.resync(t, engine, {"a", "b"}, ends.__getitem__, PARTITIONS, identity="old log")
    assert "\n" not in str(raised.value) and opened in str(raised.value)
    assert dict(engine.segments) == {} and engine.counters.resyncs == 0
    recovery.resync(t, engine, {"a", "b"}, ends.__getitem__, PARTITIONS, identity=opened)
    held = {name: list(state.bitmap) for name, state in engine.segments.items()}
    assert held == {"a": [1, 2], "b": [3]}


def test_a_resync_that_fails_is_asked_for_again(tmp_path: Path) -> None:
    t = LogDirTransport(tmp_path / "log")
    publish_raw(t, {"a": BitMap64([1])})
    replica = Replica(t)  # not started: its resync is driven here, as its thread would
    replica.partitions = PARTITIONS
    replica.positions = dict.fromkeys(range(PARTITIONS), 0)
    replica.engine.needs_resync.add("a")
    shutil.rmtree(tmp_path / "log")  # the resync's reader cannot open the log
    with pytest.raises(TransportError):
        replica._resync()
    assert replica.engine.needs_resync == {"a"}

"""The publisher's state file (`Publisher(state_dir=...)`, `seg-publish --publisher-state-dir`,
`RecoveredLog(state_dir=...)`): on both transports, a file verified against the log spares the
replay and gives exactly what a full replay gives (segments, versions, drops, snapshot pacing),
also after another writer published meanwhile; a file of another log, of a log truncated or
recreated since, or damaged is ignored (full replay), never trusted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pyroaring import BitMap64

from publisher import Publisher, SnapshotPolicy
from publisher.cli import main as publish_main
from publisher.plan import SnapshotPacing
from sidecar.replica import RecoveredLog
from sidecar.replica.checkpoint import FILENAME
from sidecar.transport import LogDirTransport, Transport
from tests.test_publisher import assert_version_chain, delete_all_deltas, read_log, rnd_bitmap

PARTITIONS = 3


def _publisher(transport: Transport, state_dir: Path | None, writer: str = "pub") -> Publisher:
    prefix = getattr(transport, "prefix", "logdir")
    return Publisher(
        transport,
        writer_id=f"{prefix}-{writer}",
        partitions=PARTITIONS,
        policy=SnapshotPolicy(every_versions=2),
        state_dir=state_dir,
    )


def _recovered(transport: Transport, state_dir: Path | None) -> tuple[str, dict, dict, dict]:
    """(where from, segment -> (version, members), drops, pacing) as a publisher recovers."""
    pacing = SnapshotPacing()
    with RecoveredLog(transport, observer=pacing, state_dir=state_dir) as log:
        segments = {s: (st.version, BitMap64(st.bitmap)) for s, st in log.segments.items()}
        dropped = {s: log.version_of(s) for s in ("gone",) if s not in segments}
        return log.recovered_from, segments, dropped, pacing.export()


def _history(pub: Publisher) -> None:
    pub.publish({"a": BitMap64([1, 2]), "b": BitMap64([3]), "gone": BitMap64([9])})
    pub.publish({"a": BitMap64([1, 2, 3]), "b": BitMap64([3, 4])}, drop=["gone"])
    pub.publish({"a": rnd_bitmap(1, 300), "c": BitMap64(range(100))})


def test_state_file_gives_what_the_log_gives(transport: Transport, tmp_path: Path) -> None:
    state = tmp_path / "state"
    pub = _publisher(transport, state)
    _history(pub)
    assert (state / FILENAME).is_file()
    full = _recovered(transport, None)
    warm = _recovered(transport, state)
    assert full[0] == "log" and warm[0] == "state file"
    assert warm[1:] == full[1:], "segments, drops and snapshot pacing as a full replay"
    assert full[1]["a"][0] == 3 and full[2] == {"gone": 2}

    # another writer publishes after the file was written: the tail brings its changes
    other = _publisher(transport, None, "other")
    other.publish({"b": BitMap64(range(5000)), "d": BitMap64([7])})
    other.publish({"b": BitMap64(range(10, 5000))})
    full = _recovered(transport, state)[1:3], _recovered(transport, None)[1:3]
    assert full[0] == full[1]
    # and our next publish continues the version chain from there
    result = pub.publish({"b": BitMap64([1]), "d": BitMap64([7, 8])})
    assert result.versions == {"b": 5, "d": 2}
    assert_version_chain(read_log(transport))
    assert _recovered(transport, state)[1:] == _recovered(transport, None)[1:]


def _damage(state: Path) -> None:
    path = state / FILENAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["damaged", "truncated", "another log"])
def test_untrusted_state_file_is_ignored(transport: Transport, tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    pub = _publisher(transport, state)
    _history(pub)
    target = transport
    if how == "damaged":
        _damage(state)
    elif how == "another log":
        target = LogDirTransport(tmp_path / "other-log")
        _publisher(target, None).publish({"a": BitMap64([5]), "z": BitMap64([6])})
    elif isinstance(transport, LogDirTransport):  # truncated: recreated with less history
        shutil.rmtree(transport.path)
        target = LogDirTransport(transport.path)
        _publisher(target, None).publish({"a": BitMap64([5])})
    else:  # truncated: retention took every delta the file resumes from
        delete_all_deltas(transport.bootstrap, transport.prefix)  # type: ignore[attr-defined]
    got = _recovered(target, state)
    assert got[0] == "log"
    assert got[1:] == _recovered(target, None)[1:]
    # a publish through the ignored file is right, and writes a file that is trusted again
    desired = {"a": BitMap64([5, 6])}
    before = got[1]["a"][0]
    assert _publisher(target, state).publish(desired).versions == {"a": before + 1}
    assert _recovered(target, state)[0] == "state file"
    assert _recovered(target, state)[1:] == _recovered(target, None)[1:]


def test_state_file_of_a_damaged_history_is_not_written(tmp_path: Path) -> None:
    """A segment the recovery found damaged is not in a checkpoint: no file then."""
    from sidecar.partitioner import partition_for
    from sidecar.record import Delta, delta_key, encode
    from tests.test_replica_state_machine import raw_append

    transport = LogDirTransport(tmp_path / "log")
    state = tmp_path / "state"
    _publisher(transport, state).publish({"a": BitMap64([1]), "b": BitMap64([2])})
    assert (state / FILENAME).is_file()
    junk = Delta("b", 1000, 1001, BitMap64([1]), BitMap64(), 1, 0)
    raw_append(transport, partition_for("b", PARTITIONS), delta_key("b"), encode(junk))
    with RecoveredLog(transport, observer=SnapshotPacing(), state_dir=state) as log:
        assert not log.segments["b"].fresh
        log.save_state()
    assert not (state / FILENAME).exists()


def test_cli_publisher_state_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from compute.segment_set import write_segment_set

    log, state, sets = tmp_path / "log", tmp_path / "state", tmp_path / "set"
    monkeypatch.setenv("SEG_PUBLISHER_STATE_DIR", str(state))
    import datetime as dt

    for members in ([1, 2], [1, 2, 3]):
        write_segment_set(sets, {"a": BitMap64(members)}, dt.datetime.now(dt.UTC), {})
        assert publish_main(["--log-dir", str(log), "--input", str(sets), "--quiet"]) == 0
    assert (state / FILENAME).is_file()
    transport = LogDirTransport(log)
    got = _recovered(transport, state)
    assert got[0] == "state file" and got[1] == {"a": (2, BitMap64([1, 2, 3]))}
    assert "segments changed 1" in capsys.readouterr().out

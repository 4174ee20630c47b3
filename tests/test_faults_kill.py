"""kill -9 in a loop, both transports: a sidecar with `--state-dir` killed at random moments
(bootstrap, tailing, mid-checkpoint, with a damaged checkpoint file) while publishes land, and
the publisher killed at random moments of a publish.

The promise: after any kill, a sidecar restarted on the same state directory comes back with
exactly what the log holds (from its checkpoint when it is sound, else from the log), and
re-running a killed publish converges: the log then holds exactly the input, no version
skipped or repeated.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from pyroaring import BitMap64

from publisher import Publisher
from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from sidecar.transport.base import Transport
from tests.logtools import ready_replica

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60
SEGMENTS = ("a", "b", "c", "d")


def _truth(rng: random.Random) -> dict[str, BitMap64]:
    return {s: BitMap64(rng.sample(range(50_000), rng.randrange(100, 3000))) for s in SEGMENTS}


def _log_args(transport: Transport) -> list[str]:
    if isinstance(transport, LogDirTransport):
        return ["--log-dir", str(transport.path)]
    return ["--kafka", transport.bootstrap, "--topic-prefix", transport.prefix]  # type: ignore[attr-defined]


def _publisher(transport: Transport) -> Publisher:
    return Publisher(transport, writer_id=f"{getattr(transport, 'prefix', 'l')}-p", partitions=2)


def _exact(transport: Transport, state_dir: Path, truth: dict[str, BitMap64]) -> str:
    """Start a replica on `state_dir`; wait until it holds exactly `truth`; returns where it
    started from (checkpoint or log)."""
    replica = Replica(transport, state_dir=state_dir, poll_interval=0.01).start()
    try:
        assert replica.wait_ready(WAIT), replica.status()
        deadline = time.monotonic() + WAIT
        while {
            s: st.bitmap for s, st in list(replica.engine.segments.items()) if st.fresh
        } != truth:
            assert time.monotonic() < deadline, replica.status()
            time.sleep(0.02)
        return str(replica.started_from)
    finally:
        replica.stop(save=False)


def _wait_for_checkpoint(path: Path, since: float) -> None:
    deadline = time.monotonic() + WAIT
    while not (path.exists() and path.stat().st_mtime >= since):
        assert time.monotonic() < deadline, "the sidecar wrote no checkpoint"
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_sidecar_killed_at_random_moments_comes_back_exact(transport: Transport) -> None:
    rng = random.Random(11)
    kafka = not isinstance(transport, LogDirTransport)
    rounds = 2 if kafka else 5
    work = Path(tempfile.mkdtemp(prefix="kk", dir="/tmp"))
    state = work / "state"
    truth = _truth(rng)
    _publisher(transport).publish(truth)
    started_from = []
    try:
        for i in range(rounds):
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sidecar.cli", *_log_args(transport),
                    "--state-dir", str(state), "--checkpoint-interval", "0.1",
                    "--uds", str(work / "s.sock"), "--http", "", "--log-level", "WARNING",
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            round_started = time.time()
            if i % 2:  # early: during start-up or bootstrap
                time.sleep(rng.uniform(0.3, 2.0))
            else:  # once it checkpoints: while tailing, possibly mid-checkpoint
                _wait_for_checkpoint(state / "checkpoint.seg", round_started)
            truth = _truth(rng)
            _publisher(transport).publish(truth)  # lands while it runs (or after it died)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            if i == rounds // 2 and (state / "checkpoint.seg").exists():
                data = bytearray((state / "checkpoint.seg").read_bytes())
                data[len(data) // 2] ^= 0xFF  # a damaged checkpoint: ignored, log replayed
                (state / "checkpoint.seg").write_bytes(bytes(data))
            started_from.append(_exact(transport, state, truth))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "checkpoint" in started_from, started_from  # the checkpoints were used


_PUBLISH = """
import sys, msgpack
from pyroaring import BitMap64
from publisher import Publisher
from sidecar.transport import KafkaTransport, LogDirTransport
kind, where, prefix, path = sys.argv[1:5]
t = LogDirTransport(where) if kind == "logdir" else KafkaTransport(where, prefix=prefix)
with open(path, "rb") as f:
    desired = {k: BitMap64.deserialize(v) for k, v in msgpack.unpackb(f.read()).items()}
Publisher(t, writer_id=f"{prefix}-p", partitions=2).publish(desired, prune=True)
print("done")
"""


@pytest.mark.timeout(600)
def test_publisher_killed_at_random_moments_then_rerun_converges(
    transport: Transport, tmp_path: Path
) -> None:
    rng = random.Random(5)
    kafka = not isinstance(transport, LogDirTransport)
    if kafka:
        argv = ["kafka", transport.bootstrap, transport.prefix]  # type: ignore[attr-defined]
    else:
        argv = ["logdir", str(transport.path), "l"]  # type: ignore[attr-defined]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    path = tmp_path / "desired.msgpack"

    def publish_cmd(desired: dict[str, BitMap64]) -> list[str]:
        path.write_bytes(msgpack.packb({k: v.serialize() for k, v in desired.items()}))
        return [sys.executable, "-c", _PUBLISH, *argv, str(path)]

    def run_whole(cmd: list[str]) -> float:
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return time.monotonic() - started

    # kill moments are drawn within how long a whole publish takes on this machine now
    whole = run_whole(publish_cmd(_truth(rng)))
    killed = 0
    for _ in range(2 if kafka else 4):
        desired = _truth(rng)
        cmd = publish_cmd(desired)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.1, 0.9) * whole)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        killed += "done" not in out
        whole = max(whole, run_whole(cmd))
        with ready_replica(transport, WAIT) as replica:
            deadline = time.monotonic() + WAIT
            while {s: st.bitmap for s, st in replica.engine.segments.items()} != desired:
                assert time.monotonic() < deadline, replica.status()
                time.sleep(0.02)
            versions = {s: st.version for s, st in replica.engine.segments.items()}
        # identical input after the rerun publishes nothing: versions were neither skipped
        # nor repeated in a way the state could notice
        assert _publisher(transport).publish(desired).versions == {}
        assert json.dumps(versions)  # recorded for the report
    assert killed >= 1

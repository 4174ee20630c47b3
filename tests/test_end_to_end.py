"""End to end, as an operator runs it: gen-data -> Spark batch -> seg-publish -> seg-sidecar,
on the real Kafka broker and on the log directory. Every (user, segment) answer over the Unix
socket must equal the truth computed independently (pyarrow over the same Parquet files)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyroaring import BitMap64

from compute.segment_set import write_segment_set
from sidecar.client import SidecarClient
from tests.logtools import free_port, wait_http_ok
from tests.truth import truth_from_lake

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFINITIONS = ROOT / "compute" / "definitions" / "example.toml"
USERS = 4000


def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("e2e")
    lake, out = work / "lake", work / "segments"
    _run("seg-compute", "gen-data", "--out", str(lake), "--users", str(USERS))
    _run(
        "seg-compute",
        "batch",
        "--lake",
        str(lake),
        "--definitions",
        str(DEFINITIONS),
        "--out",
        str(out),
    )
    return {"lake": lake, "segments": out, "work": work}


@pytest.fixture(scope="module")
def truth(computed: dict[str, Path]) -> dict[str, set[int]]:
    return truth_from_lake(computed["lake"], DEFINITIONS)


@pytest.fixture(scope="module")
def lake_users(computed: dict[str, Path]) -> list[int]:
    table = pq.read_table(computed["lake"] / "users", columns=["user_id"])
    return sorted(int(u) for u in table.column("user_id").to_pylist())


class Sidecar:
    """A `seg-sidecar` process with its own socket, HTTP port and state directory."""

    def __init__(self, log_args: list[str], work: Path) -> None:
        self.log_args = log_args
        self.uds = work / "run" / "s.sock"
        self.state = work / "state"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sidecar:
        self.proc = subprocess.Popen(
            [
                str(BIN / "seg-sidecar"),
                *self.log_args,
                "--uds",
                str(self.uds),
                "--http",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                str(self.state),
                "--checkpoint-interval",
                "1",
            ],
            stderr=subprocess.PIPE,
        )
        try:
            wait_http_ok(f"http://127.0.0.1:{self.port}/readyz", self.proc, 90)
        except AssertionError:
            self.proc.kill()
            raise
        return self

    def client(self) -> SidecarClient:
        return SidecarClient(str(self.uds), timeout=10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def answers(client: SidecarClient, users: list[int], segments: list[str]) -> dict[str, set[int]]:
    """Ask every (user, segment) with `batch` requests, and again with `batch_packed` (one
    segment per request); both must agree. The set of members per segment."""
    pairs = [[u, s] for s in segments for u in users]
    got: dict[str, set[int]] = {s: set() for s in segments}
    for i in range(0, len(pairs), 1000):
        chunk = pairs[i : i + 1000]
        for (user, segment), member in zip(chunk, client.batch(chunk), strict=True):
            assert member is not None, f"no local answer for {user} in {segment}"
            if member:
                got[segment].add(user)
    for segment in segments:
        packed = client.batch_packed(users, segment)
        assert {u for u, m in zip(users, packed, strict=True) if m} == got[segment]
        assert None not in packed
    return got


def wait_version(client: SidecarClient, segment: str, version: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.explain(1, segment).version == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"{segment} did not reach version {version}")


@pytest.fixture(params=["logdir", pytest.param("kafka", marks=pytest.mark.kafka)])
def log_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "logdir":
        yield ["--log-dir", str(tmp_path / "log")]
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        prefix = request.getfixturevalue("topic_prefix")
        yield ["--kafka", bootstrap, "--topic-prefix", prefix]


def test_publish_serve_change_and_restart(
    computed: dict[str, Path],
    truth: dict[str, set[int]],
    lake_users: list[int],
    log_args: list[str],
    tmp_path: Path,
) -> None:
    segments = sorted(truth)
    probe = lake_users + [0, 2**64 - 1, 123456789]  # and some ids not in the lake

    out = _run("seg-publish", "--input", str(computed["segments"]), *log_args, "--quiet")
    assert f"segments changed {len(segments)}" in out
    sidecar = Sidecar(log_args, tmp_path).start()
    try:
        with sidecar.client() as client:
            assert answers(client, probe, segments) == truth
            versions = {s: client.explain(1, s).version for s in segments}
            assert set(versions.values()) == {1}

            # Publishing the same set again changes nothing.
            out = _run("seg-publish", "--input", str(computed["segments"]), *log_args)
            assert "segments changed 0" in out

            # A change propagates: move some users in and out of one segment.
            changed = segments[0]
            new = dict(truth)
            dropped_users = set(sorted(truth[changed])[:50])
            added_users = set(lake_users[:40]) - truth[changed]
            new[changed] = (truth[changed] - dropped_users) | added_users
            second = tmp_path / "second"
            write_segment_set(
                second, {s: BitMap64(m) for s, m in new.items()}, dt.datetime.now(dt.UTC)
            )
            # it removes over half of a small segment: the guard refuses that without --force
            # (exit 2, writing nothing)
            assert len(dropped_users) > len(truth[changed]) / 2
            refused = subprocess.run(
                [str(BIN / "seg-publish"), "--input", str(second), *log_args],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert refused.returncode == 2, refused.stderr
            assert f"segment {changed}" in refused.stderr
            assert client.explain(1, changed).version == 1
            out = _run("seg-publish", "--input", str(second), *log_args, "--force")
            assert "segments changed 1" in out
            wait_version(client, changed, 2)
            assert answers(client, probe, segments) == new
            for s in segments[1:]:
                assert client.explain(1, s).version == 1

        # kill -9 and a restart from the state directory answer the same.
        time.sleep(1.5)  # let a periodic checkpoint (every 1 s) cover the last change
        sidecar.kill9()
        sidecar.start()
        with sidecar.client() as client:
            status = client.status()
            assert status["started_from"] == "checkpoint"
            assert answers(client, probe, segments) == new
        assert sidecar.stop() == 0
        assert (sidecar.state / "checkpoint.seg").exists()
    finally:
        if sidecar.proc and sidecar.proc.poll() is None:
            sidecar.proc.kill()

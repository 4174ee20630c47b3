"""Fixtures shared by the tests: `transport` (each transport in turn), a short work
directory (AF_UNIX paths are limited), a log holding the test module's `SEGMENTS`, a ready
replica of it, its servers (Unix socket and HTTP), and a Unix-socket-only server of that replica
with a blocking client."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.client import SidecarClient
from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from sidecar.transport.base import Transport
from tests.logtools import LogState, SidecarThread, publish_raw


@pytest.fixture(
    params=["logdir", pytest.param("kafka", marks=[pytest.mark.kafka, pytest.mark.timeout(600)])]
)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Transport:
    """Each transport in turn: a log directory, and topics of their own on the test broker."""
    if request.param == "logdir":
        return LogDirTransport(tmp_path / "log")
    from sidecar.transport import KafkaTransport

    bootstrap = request.getfixturevalue("kafka_bootstrap")
    prefix = request.getfixturevalue("topic_prefix")
    return KafkaTransport(bootstrap, prefix=prefix)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def logstate(request: pytest.FixtureRequest, workdir: Path) -> LogState:
    return publish_raw(LogDirTransport(workdir / "log"), request.module.SEGMENTS)


@pytest.fixture
def replica(workdir: Path, logstate: LogState) -> Iterator[Replica]:
    r = Replica(LogDirTransport(workdir / "log"), poll_interval=0.01).start()
    assert r.wait_ready(10)
    yield r
    r.stop(save=False)


@pytest.fixture
def sidecar_server(replica: Replica, workdir: Path) -> Iterator[SidecarThread]:
    """The replica's servers, no fallback: its Unix socket and HTTP on 127.0.0.1."""
    with SidecarThread(replica, uds_path=workdir / "s.sock") as s:
        yield s


@pytest.fixture
def uds_server(replica: Replica, workdir: Path) -> Iterator[SidecarThread]:
    with SidecarThread(replica, uds_path=workdir / "s.sock", http_host=None) as s:
        yield s


@pytest.fixture
def client(uds_server: SidecarThread) -> Iterator[SidecarClient]:
    with SidecarClient(uds_server.uds_path, timeout=5) as c:
        yield c

"""Pytest plugin: a private Kafka broker the fault tests may freeze (SIGSTOP), kill -9 and
restart on the same data directory, without disturbing the session broker other tests use.

* ``fault_broker`` (module): a `FaultBroker` started with ``deploy/local/kafka up`` into its own
  data dir; stopped (``down``) at the end of the module whatever state the test left it in.

It also keeps the ``reliability`` marker's long variants out of a normal run: they are
collected only when ``-m`` names ``reliability`` or ``SEG_RELIABILITY=1`` is set
(``seg-perf reliability`` does both).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_fixture import _down, start_broker

RESTART_TIMEOUT_S = 120


class FaultBroker:
    def __init__(self, data: Path, address: str) -> None:
        self.data = data
        self.address = address
        self.port = int(address.rsplit(":", 1)[1])
        self.pid = int((data / "broker.pid").read_text())
        self.argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        self.frozen = False
        self._proc: subprocess.Popen[bytes] | None = None  # once restarted by us

    def freeze(self) -> None:
        """SIGSTOP: the process and its sockets stay, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """kill -9, and wait until the process is gone and its port closed."""
        if self.frozen:
            self.thaw()
        os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(30)
            return
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.pid}").exists() and _zombie(self.pid) is False:
            assert time.monotonic() < deadline, "broker did not die"
            time.sleep(0.05)

    def restart(self) -> None:
        """Start the same broker again on the same data directory and ports."""
        log = self.data / "broker.log"
        started_before = log.read_text(errors="replace").count("Kafka Server started")
        with open(log, "ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own java command line
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid, self._proc = proc.pid, proc
        (self.data / "broker.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            text = log.read_text(errors="replace")
            if text.count("Kafka Server started") > started_before and _port_open(self.port):
                return
            assert proc.poll() is None, f"broker exited on restart: {text[-3000:]}"
            assert time.monotonic() < deadline, f"broker not back after restart: {text[-3000:]}"
            time.sleep(0.25)


def _zombie(pid: int) -> bool | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultBroker]:
    data = tmp_path_factory.mktemp("fault-kafka")
    broker = FaultBroker(data, start_broker(data))
    try:
        yield broker
    finally:
        broker.kill()  # a throwaway: no graceful shutdown to wait for
        _down(data)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "reliability" in (config.getoption("-m") or "") or os.environ.get("SEG_RELIABILITY"):
        return
    keep = [i for i in items if i.get_closest_marker("reliability") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

"""The blocking and asyncio clients against a real sidecar, and `seg-sidecar` run as an
operator runs it (a subprocess, signals, exit codes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap64

from sidecar.client import (
    AsyncSidecarClient,
    BadRequestError,
    Explain,
    ServerError,
    SidecarClient,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    UnknownOpError,
)
from sidecar.replica.runner import Replica
from tests.logtools import LogState, SidecarThread, free_port, get_json, reaped, wait_http_ok

MAX = 2**64 - 1
SEGMENTS = {"vip": BitMap64([1, 2, 3, MAX]), "cart:30m": BitMap64(range(100, 200))}
BIN = Path(sys.executable).parent


class SilentServer:
    """Accepts connections and never answers."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.path = str(path)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


# -- blocking client ------------------------------------------------------------------------------


def test_sync_ops(client: SidecarClient) -> None:
    assert client.ping() == "pong"
    assert client.check(1, "vip") is True
    assert client.check(4, "vip") is False
    assert client.check(MAX, "vip") is True
    assert client.check(1, "nope") is None
    assert client.check_many(150, ["vip", "cart:30m", "nope"]) == [False, True, None]
    assert client.check_many(150, ("vip",)) == [False]
    assert client.batch([(1, "vip"), (150, "cart:30m"), (5, "vip")]) == [True, True, False]
    assert client.batch(iter([[1, "vip"]])) == [True]
    assert client.segments(150) == ["cart:30m"]
    explained = client.explain(1, "vip")
    assert isinstance(explained, Explain)
    assert explained.member is True and explained.source == "local" and explained.version == 1
    status = client.status()
    assert status["ready"] is True and status["segments"] == 2


def test_sync_errors(uds_server: SidecarThread, client: SidecarClient) -> None:
    with pytest.raises(BadRequestError, match="user"):
        client.check(True, "vip")  # type: ignore[arg-type]
    with pytest.raises(BadRequestError, match="user"):
        client.check(-1, "vip")
    with pytest.raises(BadRequestError, match="encode"):
        client.check(2**64, "vip")  # cannot even be encoded in msgpack
    with pytest.raises(BadRequestError, match="segment"):
        client.check(1, "bad seg")
    with pytest.raises(BadRequestError, match="batch item 1"):
        client.batch([(1, "vip"), (1.5, "vip")])  # type: ignore[list-item]
    with pytest.raises(UnknownOpError):
        client.call("frobnicate")
    assert isinstance(BadRequestError("x"), SidecarError)

    def broken() -> dict[str, Any]:
        raise RuntimeError("hidden")

    uds_server.queries.status = broken  # type: ignore[method-assign]
    with pytest.raises(ServerError) as err:
        client.status()
    assert "hidden" not in str(err.value)
    assert client.ping() == "pong"


def test_sync_unavailable(workdir: Path) -> None:
    with pytest.raises(SidecarUnavailable):
        SidecarClient(workdir / "nothing.sock").ping()


def test_sync_timeout(workdir: Path) -> None:
    silent = SilentServer(workdir / "silent.sock")
    try:
        c = SidecarClient(silent.path, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(SidecarTimeout):
            c.ping()
        assert time.monotonic() - started < 2
        with pytest.raises(TimeoutError):  # SidecarTimeout is a TimeoutError too
            c.check(1, "vip")
        c.close()
    finally:
        silent.close()


def test_sync_reconnects_after_server_restart(replica: Replica, workdir: Path) -> None:
    path = workdir / "r.sock"
    c = SidecarClient(path, timeout=5)
    with SidecarThread(replica, uds_path=path, http_host=None):
        assert c.check(1, "vip") is True
    with SidecarThread(replica, uds_path=path, http_host=None):
        assert c.check(1, "vip") is True  # the old connection broke: one transparent retry
        assert c.ping() == "pong"
    with pytest.raises(SidecarUnavailable):
        c.ping()
    c.close()


def test_sync_oversize_request(uds_server: SidecarThread, client: SidecarClient) -> None:
    pairs = [(1, "vip")] * 200_000  # ~1.2 MB: over the frame limit
    with pytest.raises(BadRequestError, match="limit"):
        client.batch(pairs)  # refused before sending
    assert client.check(1, "vip") is True
    # a client configured with a larger limit sends it; the server answers and closes
    with SidecarClient(uds_server.uds_path, max_frame=4 << 20) as big:
        with pytest.raises(SidecarError):
            big.batch(pairs)
        assert big.check(1, "vip") is True  # reconnected


def test_sync_pipeline(client: SidecarClient) -> None:
    requests: list[tuple[Any, ...]] = []
    for i in range(100):
        requests.append(("check", 100 + i, "cart:30m"))
    requests[10] = ("check", 1, "bad seg")
    requests[20] = ("explain", 1, "vip")
    requests[30] = ("nope",)
    results = client.pipeline(requests)
    assert len(results) == 100
    assert isinstance(results[10], BadRequestError)
    assert isinstance(results[20], Explain) and results[20].member is True
    assert isinstance(results[30], UnknownOpError)
    others = [r for i, r in enumerate(results) if i not in (10, 20, 30)]
    assert others == [True] * 97
    assert client.pipeline([]) == []


def test_sync_large_pipeline_does_not_deadlock(client: SidecarClient) -> None:
    requests = [("batch", [(u, "cart:30m") for u in range(100)]) for _ in range(2000)]
    results = client.pipeline(requests)  # ~1.4 MB of requests and ~0.2 MB of responses
    assert len(results) == 2000
    assert all(r == [False] * 100 for r in results)


def test_sync_client_per_thread(uds_server: SidecarThread) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with SidecarClient(uds_server.uds_path, timeout=10) as c:
                for i in range(200):
                    assert c.check(100 + i % 100, "cart:30m") is True
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- asyncio client -----------------------------------------------------------------------------


def test_async_ops_and_concurrency(uds_server: SidecarThread) -> None:
    async def main() -> None:
        async with AsyncSidecarClient(uds_server.uds_path, timeout=5) as c:
            assert await c.ping() == "pong"
            assert await c.check(1, "vip") is True
            assert await c.check(1, "nope") is None
            assert await c.check_many(150, ["vip", "cart:30m"]) == [False, True]
            assert await c.batch([(1, "vip"), (150, "cart:30m")]) == [True, True]
            assert await c.segments(1) == ["vip"]
            assert (await c.explain(1, "vip")).source == "local"
            assert (await c.status())["ready"] is True
            # many concurrent awaits on one connection, matched to their requests
            users = list(range(0, 300))
            got = await asyncio.gather(*(c.check(u, "cart:30m") for u in users))
            assert got == [100 <= u < 200 for u in users]
            results = await c.pipeline([("ping",), ("check", 1, "x y"), ("check", 2, "vip")])
            assert results[0] == "pong" and isinstance(results[1], BadRequestError)
            assert results[2] is True
            with pytest.raises(BadRequestError):
                await c.check(-5, "vip")
            with pytest.raises(UnknownOpError):
                await c.call("nope")
            assert await c.ping() == "pong"

    asyncio.run(main())


def test_async_reconnect_unavailable_timeout(replica: Replica, workdir: Path) -> None:
    path = workdir / "a.sock"
    silent_path = workdir / "silent.sock"

    async def main() -> None:
        c = AsyncSidecarClient(path, timeout=5)
        with pytest.raises(SidecarUnavailable):
            await c.ping()
        with SidecarThread(replica, uds_path=path, http_host=None):
            assert await c.check(1, "vip") is True
        with SidecarThread(replica, uds_path=path, http_host=None):
            assert await c.check(1, "vip") is True  # reconnected transparently
        await c.close()
        silent = SilentServer(silent_path)
        try:
            s = AsyncSidecarClient(silent_path, timeout=0.2)
            with pytest.raises(SidecarTimeout):
                await s.ping()
            await s.close()
        finally:
            silent.close()

    asyncio.run(main())


# -- seg-sidecar as a subprocess ------------------------------------------------------------------


def test_cli_serves_and_shuts_down_cleanly(workdir: Path, logstate: LogState) -> None:
    port = free_port()
    sock = workdir / "cli" / "sidecar.sock"
    state = workdir / "state"
    args = [str(BIN / "seg-sidecar"), "--log-dir", str(workdir / "log"), "--uds", str(sock),
            "--http", f"127.0.0.1:{port}", "--state-dir", str(state)]  # fmt: skip
    popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(popen) as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc, 60)
        with SidecarClient(sock, timeout=10) as c:
            assert c.check(1, "vip") is True
            assert c.check(150, "cart:30m") is True
            assert c.check(4, "vip") is False
        assert get_json(f"http://127.0.0.1:{port}/v1/check?user=1&segment=vip")[1]["member"] is True
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (state / "checkpoint.seg").exists()
    assert not sock.exists()
    for line in err.splitlines():  # structured logs: JSON lines
        doc = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(doc)


def test_cli_from_environment_and_warm_restart(workdir: Path, logstate: LogState) -> None:
    port = free_port()
    sock = workdir / "env.sock"
    env = {
        **os.environ,
        "SEG_LOG_DIR": str(workdir / "log"),
        "SEG_UDS": str(sock),
        "SEG_HTTP": "",  # HTTP off
        "SEG_STATE_DIR": str(workdir / "state"),
        "SEG_LOG_LEVEL": "warning",
    }
    for _ in range(2):  # the second start resumes from the checkpoint of the first
        popen = subprocess.Popen(
            [str(BIN / "seg-sidecar")], env=env, stderr=subprocess.PIPE, text=True
        )
        with reaped(popen) as proc:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    with SidecarClient(sock, timeout=2) as c:
                        if c.status()["ready"]:
                            assert c.check(1, "vip") is True
                            break
                except SidecarError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert (workdir / "state" / "checkpoint.seg").exists()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--log-dir", "/tmp/x", "--kafka", "localhost:9092"], {}, "exactly one"),
        ([], {}, "exactly one"),
        ([], {"SEG_LOG_DIR": "/tmp/x", "SEG_KAFKA": "localhost:9092"}, "exactly one"),
        (["--log-dir", "/tmp/x", "--http", "nonsense"], {}, "--http"),
        (["--log-dir", "/tmp/x", "--http", "", "--uds", ""], {}, "nothing to serve"),
        (["--log-dir", "/tmp/x", "--socket-mode", "999"], {}, "mode"),
        (["--log-dir", "/tmp/x", "--bogus"], {}, "unrecognized"),
        (["--log-dir", "/tmp/x", "--aerospike", "nohostport"], {}, "--aerospike"),
    ],
)
def test_cli_bad_config_is_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    proc = subprocess.run(
        [str(BIN / "seg-sidecar"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


def test_cli_refuses_unsafe_socket_directory(workdir: Path, logstate: LogState) -> None:
    open_dir = workdir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    proc = subprocess.run(
        [
            str(BIN / "seg-sidecar"),
            "--log-dir",
            str(workdir / "log"),
            "--uds",
            str(open_dir / "s.sock"),
            "--http",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "world-writable" in proc.stderr.strip().splitlines()[-1]

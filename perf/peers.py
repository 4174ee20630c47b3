"""The peers the sidecar is measured against, in the same run on the same machine.

- `EchoServer`: a bare Python uvloop Unix-socket server with the sidecar's framing (4-byte
  big-endian length + msgpack), run in a subprocess (`python -m perf.peers echo PATH`). It
  parses frames exactly like the sidecar, decodes the msgpack request and answers
  `[id, 0, true]`, all responses of one read in one write: the least any Python server with
  this protocol must do, so sidecar/echo isolates what the sidecar adds (validation, the
  bitmap lookup, metrics).
- `RedisServer`: a real redis-server started with `--port 0 --unixsocket <tmp> --save ''
  --appendonly no`, reached with redis-py over its Unix socket. When redis-server is missing
  the harness installs Debian's package with apt-get; if that fails, `RedisServer.start`
  raises `PeerUnavailable` with the reason, and the scenario records the peer as unavailable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0


class PeerUnavailable(RuntimeError):
    """A peer cannot run on this machine; the message says why."""


# -- the echo server ---------------------------------------------------------------------------
def run_echo(path: str) -> None:
    """The echo server's main loop (in the subprocess)."""
    import asyncio

    import msgpack
    import uvloop

    from sidecar.protocol import HEADER, HEADER_SIZE, OK  # the protocol's framing, as served

    unpack_header = HEADER.unpack_from
    hpack = HEADER.pack
    pack = msgpack.Packer(use_bin_type=True).pack
    unpackb = msgpack.unpackb

    class Echo(asyncio.Protocol):
        __slots__ = ("buf", "transport")

        def __init__(self) -> None:
            self.buf = bytearray()
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            if buf:
                buf += data
                view: bytes | bytearray = buf
            else:
                view = data
            end = len(view)
            pos = 0
            out = []
            while end - pos >= HEADER_SIZE:
                length = unpack_header(view, pos)[0]
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                req = unpackb(view[pos + HEADER_SIZE : stop])
                pos = stop
                body = pack([req[0], OK, True])
                out.append(hpack(len(body)) + body)
            if buf:
                del buf[:pos]
            elif pos < end:
                buf += view[pos:]
            if out:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def main() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Echo, path=path, backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    uvloop.run(main())


class EchoServer:
    """`EchoServer(path).start()` ... `.stop()`; also a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> EchoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.peers", "echo", self.path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"echo server did not start: {line!r} {err[-500:]}")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Redis -------------------------------------------------------------------------------------
_install_attempt: tuple[str | None, str] | None = None


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for cand in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def ensure_redis_server(log: Any = print) -> tuple[str | None, str]:
    """(path of redis-server, how it was found) or (None, why it is unavailable). Installs
    Debian's redis-server with apt-get when it is missing (once per process)."""
    global _install_attempt
    found = find_redis_server()
    if found:
        return found, "found on PATH"
    if _install_attempt is not None:
        return _install_attempt
    if shutil.which("apt-get") is None:
        _install_attempt = (None, "redis-server is not installed and apt-get is not available")
        return _install_attempt
    if os.geteuid() != 0:
        _install_attempt = (None, "redis-server is not installed and installing it needs root")
        return _install_attempt
    log("redis-server missing: apt-get install -y redis-server")
    install = ["install", "-y", "--no-install-recommends", "redis-server"]
    try:
        res = _apt(install, 600)
        if res.returncode != 0:
            log("apt-get install failed; apt-get update, then again")
            upd = _apt(["update"], 600)
            res = _apt(install, 600) if upd.returncode == 0 else upd
    except (OSError, subprocess.TimeoutExpired) as exc:
        _install_attempt = (None, f"apt-get install redis-server failed: {exc}")
        return _install_attempt
    found = find_redis_server()
    if res.returncode != 0 or not found:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        _install_attempt = (
            None,
            f"apt-get install redis-server failed (exit {res.returncode}): {' | '.join(tail)}",
        )
        return _install_attempt
    _install_attempt = (found, "installed with apt-get by the harness")
    return _install_attempt


class RedisServer:
    """A private redis-server on a Unix socket, no persistence, no TCP port."""

    def __init__(self, workdir: str | Path, log: Any = print) -> None:
        self.workdir = Path(workdir)
        self.socket = str(self.workdir / "redis.sock")
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.version: str | None = None
        self.how: str = ""

    def start(self) -> RedisServer:
        binary, how = ensure_redis_server(self.log)
        if binary is None:
            raise PeerUnavailable(how)
        self.how = how
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            binary,
            "--port", "0",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise PeerUnavailable(f"redis-server exited at start: {err[-300:]}")
            if os.path.exists(self.socket):
                try:
                    c = self.client()
                    c.ping()
                    self.version = c.info("server").get("redis_version")
                    c.close()
                    break
                except Exception:  # not accepting yet
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise PeerUnavailable("redis-server did not start in time")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=self.socket)

    def used_memory(self) -> dict[str, int]:
        c = self.client()
        try:
            info = c.info("memory")
        finally:
            c.close()
        return {"used_memory": info["used_memory"], "used_memory_rss": info["used_memory_rss"]}

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: redis exits; --save '' so nothing is written
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "echo":
        run_echo(args[1])
        return 0
    print("usage: python -m perf.peers echo SOCKET_PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

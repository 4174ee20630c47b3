"""A tiny stand-in publisher for tests: writes raw log records straight to a transport.

The real publisher (publisher/) replaces it; this only knows enough to put segments into a log.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroaring import BitMap64

from sidecar.partitioner import partition_for
from sidecar.record import Delta, Drop, delta_key, encode
from sidecar.replica import Replica
from sidecar.transport.base import Transport

PARTITIONS = 2


class LogState:
    """What has been published so far: segment -> (version, members)."""

    def __init__(self) -> None:
        self.segments: dict[str, tuple[int, BitMap64]] = {}
        self.dropped: dict[str, int] = {}


def publish_raw(
    transport: Transport,
    segments: dict[str, BitMap64],
    state: LogState | None = None,
    *,
    partitions: int = PARTITIONS,
    drop: tuple[str, ...] = (),
) -> LogState:
    """One transaction: for each segment, a delta from its current version to `members`;
    then a drop for each name in `drop`. Returns the state to pass to the next call."""
    state = state if state is not None else LogState()
    now = int(time.time() * 1000)
    with transport.writer("test-publisher", partitions=partitions) as w, w.transaction():
        for name, members in segments.items():
            base, old = state.segments.get(name, (state.dropped.get(name, 0), BitMap64()))
            value = encode(
                Delta(name, base, base + 1, members - old, old - members, len(members), now)
            )
            w.append("deltas", partition_for(name, w.partitions), delta_key(name), value)
            state.segments[name] = (base + 1, BitMap64(members))
        for name in drop:
            base, _ = state.segments.pop(name)
            w.append(
                "deltas",
                partition_for(name, w.partitions),
                delta_key(name),
                encode(Drop(name, base, base + 1, now)),
            )
            state.dropped[name] = base + 1
    return state


def publish_gap(transport: Transport, segment: str, state: LogState) -> None:
    """A delta that skips a version: the replica marks the segment stale (and its resync
    cannot heal it, the log really has the gap)."""
    version, members = state.segments[segment]
    with transport.writer("test-publisher") as w, w.transaction():
        value = encode(
            Delta(segment, version + 5, version + 6, BitMap64(), BitMap64(), len(members), 0)
        )
        w.append("deltas", partition_for(segment, w.partitions), delta_key(segment), value)


class HeldRebootstrap:
    """A ready replica whose bootstrap aside after its log took a new identity
    (`_bootstrap_again`) `changed` holds: its clock, which that bootstrap's expiry tick reads,
    waits on the replica thread there until released."""

    def __init__(self, tailing: Replica, wait: float) -> None:
        self.tailing, self.wait = tailing, wait
        self.held, self.entered, self.release = (threading.Event() for _ in range(3))
        tailing.clock_ms = self.clock

    def clock(self) -> int:
        if self.held.is_set() and threading.current_thread().name == "replica":
            frame = sys._getframe()
            while frame is not None and frame.f_code.co_name != "_bootstrap_again":
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None:
                self.entered.set()
                self.release.wait(self.wait)
        return int(time.time() * 1000)

    @contextmanager
    def changed(self, new_identity: Callable[[], None]) -> Iterator[None]:
        """`new_identity()` gives the log a new identity; inside, the replica is held in its
        bootstrap aside (the old state answering); on leaving, it goes on."""
        self.held.set()
        try:
            new_identity()
            assert self.entered.wait(self.wait), self.tailing.status()
            yield
        finally:
            self.held.clear()
            self.release.set()

    def assert_check_at_waits(
        self,
        new_identity: Callable[[], None],
        segment: str,
        old_member: int,
        new_member: int,
        version: int,
        during: Callable[[], None] = lambda: None,
    ) -> None:
        """Held in the bootstrap after `new_identity()` (under which `segment` holds
        `new_member` at `version`), the old state answers `contains(old_member)` but no
        `check_at` (its versions are the old log's); a `check_at` waiting meanwhile answers
        from the new state once it is in. `during()` runs while held."""
        tailing = self.tailing
        old = tailing.engine.version_of(segment)
        with self.changed(new_identity):
            assert tailing.engine.version_of(segment) == old  # the old state, still answering
            assert tailing.contains(old_member, segment) is True
            assert tailing.check_at(new_member, segment, version, wait_ms=0) is None
            assert tailing.check_at(old_member, segment, 1, wait_ms=0) is None
            during()
            waited: list[bool | None] = []
            waiting = threading.Thread(
                target=lambda: waited.append(tailing.check_at(new_member, segment, version))
            )
            waiting.start()
            time.sleep(0.05)
        waiting.join(self.wait)
        assert waited == [True], tailing.status()
        assert tailing.check_at(new_member, segment, version, wait_ms=0) is True
        assert tailing.status()["rebootstraps"] >= 1


# -- running a sidecar in-process for server tests ---------------------------------------------


class SidecarThread:
    """`Sidecar` servers on a uvloop loop in a background thread, so blocking clients can run
    in the test thread. `with SidecarThread(replica, fallback, uds_path=...) as s:`."""

    def __init__(self, replica: object, fallback: object = None, **kwargs: object) -> None:
        import asyncio
        import threading

        import uvloop

        from sidecar.server.app import ServerOptions, Sidecar

        kwargs.setdefault("http_port", 0)
        kwargs.setdefault("process_metrics", False)
        self.loop = uvloop.new_event_loop()
        self.sidecar = Sidecar(replica, fallback, ServerOptions(**kwargs))  # type: ignore[arg-type]
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.sidecar.start())
            except BaseException as exc:
                self.error = exc
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="sidecar-loop", daemon=True)
        self.thread.start()
        if not started.wait(60):  # a loaded CI machine: say so rather than fail later
            raise TimeoutError("the sidecar's servers did not start within 60 s")
        if self.error is not None:
            self.thread.join(5)
            self.loop.close()
            raise self.error

    @property
    def uds_path(self) -> str:
        assert self.sidecar.uds is not None
        return str(self.sidecar.uds.path)

    @property
    def http_url(self) -> str:
        assert self.sidecar.http is not None
        return f"http://127.0.0.1:{self.sidecar.http_port}"

    @property
    def queries(self):  # type: ignore[no-untyped-def]
        return self.sidecar.queries

    def call(self, coro: object, timeout: float = 10) -> object:
        """Run a coroutine on the server's loop and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        self.call(self.sidecar.close(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> SidecarThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def get_json(url: str) -> tuple[int, dict]:
    """(status, JSON body) of a GET, error statuses included."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float, interval: float = 0.1) -> None:
    """Poll GET `url` (a sidecar's /readyz) until it answers 200. AssertionError (with the
    tail of its stderr when piped) once `proc` has exited, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            raise AssertionError(f"exited with status {proc.returncode}: {err[-3000:]}")
        try:
            if get_json(url)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not 200 within {timeout:g} s"
        time.sleep(interval)


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc`, killed and waited for on leaving when still running: a failed test leaves no
    process behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextmanager
def started_replica(transport: Transport, save: bool = False, **options: Any) -> Iterator[Replica]:
    """`Replica(transport, **options)`, started; stopped after (saving a checkpoint when
    `save`)."""
    replica = Replica(transport, **options).start()
    try:
        yield replica
    finally:
        replica.stop(save=save)


@contextmanager
def ready_replica(transport: Transport, wait: float) -> Iterator[Replica]:
    """A Replica of `transport` (polling every 10 ms), started and ready within `wait`
    seconds (else an AssertionError with its status); stopped without a checkpoint after."""
    with started_replica(transport, poll_interval=0.01) as replica:
        assert replica.wait_ready(wait), replica.status()
        yield replica


@contextmanager
def sidecar_process(
    *args: str, port: int, interval: float = 0.05, ready: bool = True
) -> Iterator[subprocess.Popen]:
    """`seg-sidecar ARGS --http 127.0.0.1:PORT` (stderr discarded), once its /readyz (with
    `ready=False`: its /healthz, for a sidecar that is not ready) answers 200 within 30 s; on
    leaving, SIGTERM and a clean exit within 30 s is asserted."""
    import signal
    import sys
    from pathlib import Path

    seg_sidecar = str(Path(sys.executable).parent / "seg-sidecar")
    http = ["--http", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([seg_sidecar, *args, *http], stderr=subprocess.DEVNULL)
    try:
        probe = "readyz" if ready else "healthz"
        wait_http_ok(f"http://127.0.0.1:{port}/{probe}", proc, 30, interval)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

"""What the scenarios run against, started by the harness and always stopped by it: the real
Kafka broker (`deploy/local/kafka`), `seg-sidecar` processes, Redis and the echo peer.

`Context` owns them for one `seg-perf` run: each is started on first use and stopped in
`Context.close()`, which the CLI calls on success, error, Ctrl-C and SIGTERM alike. The
broker is started with `--owner-pid` so even a SIGKILL-ed harness leaves no broker behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from . import data
from .peers import EchoServer, PeerUnavailable, RedisServer

REPO_DIR = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO_DIR / "deploy" / "local" / "kafka"
BIN_DIR = Path(sys.executable).parent
_ADDRESS = re.compile(r"127\.0\.0\.1:\d+")


def log(msg: str) -> None:
    print(f"[seg-perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int | None = None, field: str = "VmRSS") -> int:
    """Resident set size of `pid` (this process by default); `field` "VmHWM": its peak
    since the process started or `reset_peak_rss`."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) over from the current RSS (Linux's clear_refs 5)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tool(name: str) -> str:
    """A console script of this install (next to the running Python), else from PATH."""
    cand = BIN_DIR / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


# -- Kafka -------------------------------------------------------------------------------------
class Kafka:
    """`deploy/local/kafka up --data DIR` ... `down --data DIR`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.bootstrap: str | None = None
        self.start_seconds: float | None = None

    def start(self) -> str:
        started = time.monotonic()
        cmd = [str(KAFKA_SCRIPT), "up", "--data", str(self.data_dir), "--owner-pid",
               str(os.getpid())]  # fmt: skip
        log(f"starting Kafka: {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not _ADDRESS.fullmatch(lines[-1].strip()):
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            self.stop()
            raise RuntimeError(f"Kafka did not start (exit {proc.returncode}):\n{tail}")
        self.bootstrap = lines[-1].strip()
        self.start_seconds = time.monotonic() - started
        log(f"Kafka up at {self.bootstrap} in {self.start_seconds:.1f} s")
        return self.bootstrap

    def stop(self) -> None:
        if not self.data_dir.exists():
            return
        subprocess.run(
            [str(KAFKA_SCRIPT), "down", "--data", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.bootstrap = None


# -- the sidecar process -----------------------------------------------------------------------
def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


class SidecarProcess:
    """`seg-sidecar` as operators run it, on its own socket, HTTP port and state dir."""

    def __init__(self, source: list[str], workdir: Path, name: str = "sidecar") -> None:
        self.source = source  # ["--kafka", addr, "--topic-prefix", p] or ["--log-dir", dir]
        self.workdir = workdir
        self.name = name
        self.uds = workdir / f"{name}.sock"
        self.state_dir = workdir / f"{name}-state"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        self.exit_code: int | None = None
        self._stderr: Any = None

    @property
    def command(self) -> list[str]:
        return [
            tool("seg-sidecar"), *self.source,
            "--uds", str(self.uds),
            "--http", f"127.0.0.1:{self.port}",
            "--state-dir", str(self.state_dir),
            "--log-level", "WARNING",
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 180.0) -> SidecarProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115
        started = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"seg-sidecar exited {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{self.port}/readyz")[0] == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"seg-sidecar not ready in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.02)
        self.ready_seconds = time.monotonic() - started
        return self

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = (self.workdir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def status(self) -> dict[str, Any]:
        return http_get(f"http://127.0.0.1:{self.port}/v1/status")[1]

    def stop(self) -> int | None:
        """SIGTERM (checkpoint, exit 0); returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.exit_code = proc.returncode
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return self.exit_code


# -- the run's context ---------------------------------------------------------------------------
@dataclass
class Sizes:
    """Every size a scenario uses, for --quick and the full run."""

    quick: bool

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


@dataclass
class ServeSet:
    """The data set the latency scenarios' sidecar serves."""

    segments: dict[str, BitMap64]
    sidecar: SidecarProcess
    source: str
    publish_seconds: float
    memberships: int
    #: the log the sidecar replays (a scenario may publish more into it, and drop it after)
    transport: Any = None


@dataclass
class Context:
    quick: bool
    out: Path
    source: str = "kafka"  # what the shared sidecar replays: "kafka" or "logdir"
    kafka_addr: str | None = None  # an external broker (nothing started then)
    #: an older checkout whose code the comparing scenarios also run (propagation)
    before: Path | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="seg-perf-")))
    sizes: Sizes = field(init=False)
    _kafka: Kafka | None = None
    _redis: RedisServer | None = None
    _redis_error: str | None = None
    _serve: ServeSet | None = None
    _echo: EchoServer | None = None
    _serve_error: str | None = None
    _closers: list[Any] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)
    #: data sets shared by the scenarios of one run (perf/exprset.py)
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = Sizes(self.quick)

    # -- services -------------------------------------------------------------------------
    def kafka(self) -> str:
        if self.kafka_addr:
            return self.kafka_addr
        if self._kafka is None:
            self._kafka = Kafka(self.workdir / "kafka")
            try:
                self._kafka.start()
            except BaseException:
                self._kafka = None
                raise
            self.services["kafka"] = {
                "bootstrap": self._kafka.bootstrap,
                "start_seconds": round(self._kafka.start_seconds or 0, 1),
                "command": f"deploy/local/kafka up --data {self._kafka.data_dir}",
            }
        assert self._kafka.bootstrap
        return self._kafka.bootstrap

    def redis(self) -> RedisServer | None:
        """The run's Redis, or None (reason in `redis_error`)."""
        if self._redis is None and self._redis_error is None:
            server = RedisServer(self.workdir / "redis", log=log)
            try:
                server.start()
            except PeerUnavailable as exc:
                self._redis_error = str(exc)
                log(f"Redis peer unavailable: {exc}")
                return None
            self._redis = server
            self.services["redis"] = {"version": server.version, "how": server.how}
        return self._redis

    @property
    def redis_error(self) -> str | None:
        return self._redis_error

    def echo(self) -> EchoServer:
        """The echo peer (one per run)."""
        if self._echo is None:
            self._echo = EchoServer(self.workdir / "echo.sock").start()
            self._closers.append(self._echo.stop)
        return self._echo

    def transport(self, name: str, kind: str | None = None) -> Any:
        """A fresh log: Kafka topics with a unique prefix, or a new log directory. `kind` is
        "kafka" or "logdir" (default: the run's --source)."""
        if (kind or self.source) == "kafka":
            from sidecar.transport.kafka import KafkaTransport

            prefix = f"perf-{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
            transport = KafkaTransport(self.kafka(), prefix)
            create_kafka_topics(transport, KAFKA_PARTITIONS)
            return transport
        from sidecar.transport.logdir import LogDirTransport

        path = self.workdir / "logs" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return LogDirTransport(path)

    @staticmethod
    def source_args(transport: Any) -> list[str]:
        if hasattr(transport, "bootstrap"):
            return ["--kafka", transport.bootstrap, "--topic-prefix", transport.prefix]
        return ["--log-dir", str(transport.path)]

    def sidecar(self, transport: Any, name: str) -> SidecarProcess:
        proc = SidecarProcess(self.source_args(transport), self.workdir / "sidecars", name)
        self._closers.append(proc.stop)
        return proc.start(timeout=self.sizes.pick(120.0, 600.0))

    def serve(self) -> ServeSet:
        """One sidecar process serving the latency data set, shared by check, batch, http
        and fanout."""
        if self._serve_error is not None:  # failed once: do not wait again per scenario
            raise RuntimeError(f"the shared sidecar did not start: {self._serve_error}")
        if self._serve is None:
            try:
                self._serve = self._start_serve()
            except Exception as exc:
                self._serve_error = f"{type(exc).__name__}: {exc}"
                raise
        return self._serve

    def _start_serve(self) -> ServeSet:
        from publisher import Publisher

        n_seg, total = self.sizes.pick((20, 1_000_000), (100, 10_000_000))
        segments = data.make_segments(n_seg, total, seed=7)
        transport = self.transport("serve")
        log(f"serve data set: {n_seg} segments, {total:,} memberships -> {self.source}")
        res = Publisher(transport, writer_id="perf-serve", partitions=8).publish(segments)
        sidecar = self.sidecar(transport, "serve")
        serve = ServeSet(
            segments, sidecar, self.source, res.seconds, data.memberships(segments),
            transport=transport,
        )  # fmt: skip
        self.services["serve_sidecar"] = {
            "command": " ".join(sidecar.command),
            "segments": n_seg,
            "memberships": serve.memberships,
            "ready_seconds": round(sidecar.ready_seconds or 0, 2),
        }
        return serve

    def serve_redis(self) -> Any:
        """A redis-py client with the serve data set loaded (one set per segment), or None."""
        server = self.redis()
        if server is None:
            return None
        client = server.client()
        ensure_redis_sets(client, self.serve().segments)
        return client

    def stop_services(self) -> None:
        """Stop everything the scenarios so far started (sidecars, the echo peer, Redis, the
        Kafka broker) and delete their data and the data sets shared in `cache`, so nothing
        of theirs shares the cores with the next scenario; a later scenario starts what it
        needs again."""
        if self._closers or self._redis is not None or self._kafka is not None:
            log("stopping the services started so far")
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.stop()
            self._redis = None
        if self._kafka is not None:
            log("stopping Kafka")
            with contextlib.suppress(Exception):
                self._kafka.stop()
            self._kafka = None
        self._serve = self._echo = None
        self._serve_error = self._redis_error = None
        self.services.clear()
        self.cache.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.stop_services()
        shutil.rmtree(self.workdir, ignore_errors=True)


KAFKA_PARTITIONS = 8


def create_kafka_topics(transport: Any, partitions: int) -> None:
    """Create the two topics as `KafkaTransport.ensure_topics` does (same configs) and wait
    until every partition has a leader that answers offset queries.

    The harness does this itself so that a scenario never races topic creation: before
    commit 316e223 `ensure_topics` lost its AdminClient before the create futures completed
    (`_DESTROY`), and right after creation watermark queries can fail with
    NOT_LEADER_FOR_PARTITION."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from sidecar.transport import kafka as k

    admin = AdminClient({"bootstrap.servers": transport.bootstrap, **transport.config})
    common = {"max.message.bytes": str(k.MAX_MESSAGE_BYTES)}
    configs = {
        "deltas": {**common, "cleanup.policy": "delete", "retention.ms": str(k.DELTA_RETENTION_MS)},
        "snapshots": {**common, "cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
    }
    new = [
        NewTopic(transport.topic(kind), partitions, 1, config=configs[kind]) for kind in k.TOPICS
    ]
    for name, fut in admin.create_topics(new, request_timeout=30).items():
        try:
            fut.result(60)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not isinstance(err, KafkaError) or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {name}: {exc}") from exc
    # Until every partition has a leader that answers offset requests: right after creation
    # the reader's watermark queries fail with NOT_LEADER_FOR_PARTITION for a moment.
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": transport.bootstrap, "group.id": f"perf-probe-{os.getpid()}"}
    )
    try:
        deadline = time.monotonic() + 60
        for kind in k.TOPICS:
            for p in range(partitions):
                while True:
                    try:
                        consumer.get_watermark_offsets(
                            TopicPartition(transport.topic(kind), p), timeout=5, cached=False
                        )
                        break
                    except KafkaException:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
    finally:
        consumer.close()


def load_redis(client: Any, segments: dict[str, BitMap64], chunk: int = 10_000) -> None:
    """SADD every segment's members, pipelined."""
    pipe = client.pipeline(transaction=False)
    queued = 0
    for name, bm in segments.items():
        members = bm.to_array() if hasattr(bm, "to_array") else list(bm)
        members = list(members)
        for part in data.chunks(members, chunk):
            pipe.sadd(name, *part)
            queued += 1
            if queued >= 20:
                pipe.execute()
                queued = 0
    pipe.execute()


def ensure_redis_sets(client: Any, segments: dict[str, BitMap64]) -> bool:
    """Load every segment into Redis as a set of its members unless the set is there with as
    many members; True when something was loaded. Checked on every use, not remembered:
    another scenario of the run may have flushed the server since (memory does)."""
    pipe = client.pipeline(transaction=False)
    for name in segments:
        pipe.scard(name)
    cards = pipe.execute()
    stale = {n: bm for (n, bm), c in zip(segments.items(), cards, strict=True) if c != len(bm)}
    if not stale:
        return False
    log(f"loading {data.memberships(stale):,} memberships of {len(stale)} sets into Redis")
    client.delete(*stale)
    load_redis(client, stale)
    return True

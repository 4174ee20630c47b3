"""An asyncio Aerospike test server that the real ``aerospike`` client talks to over TCP.

``AerospikeTestServer`` runs on the caller's event loop; ``ThreadedAerospikeServer`` runs it
in a background thread with its own loop, for the synchronous aerospike client. Both expose
fault knobs (``latency_s``, ``drop_connections``, ``error_code``, ``down()``/``up()``) and an
inspection API (``records``, ``record``, ``digest_of``, ``command_counts``).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import struct
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

from . import batch, query, wire
from .info import InfoResponder
from .store import Command, Record, Store

log = logging.getLogger(__name__)

_node_ids = itertools.count(1)


def _command_kind(msg: wire.AsMsg) -> str:
    if msg.info2 & wire.INFO2_DELETE:
        return "delete"
    if msg.info2 & wire.INFO2_WRITE:
        plain = all(op.op == wire.OP_WRITE for op in msg.ops)
        return "put" if plain and not msg.info2 & wire.INFO2_RESPOND_ALL_OPS else "operate"
    if msg.info1 & wire.INFO1_GET_NOBINDATA:
        return "exists"
    if all(op.op == wire.OP_READ for op in msg.ops):
        return "get"
    return "operate"


def python_value(p: wire.Particle) -> Any:
    """A copy of a stored bin value (callers may mutate what they get)."""
    return copy.deepcopy(p.value)


class AerospikeTestServer:
    """One-node Aerospike double: info protocol, single-record commands, batch, sindex query.

    Fault knobs (plain attributes, safe to set from another thread):

    * ``latency_s``: sleep this long before answering every data command;
    * ``drop_connections``: close a connection when a data command arrives on it;
    * ``error_code``: answer every data command with this result code (0/None = off);
    * ``error_times``: with ``error_code``, answer only the next N data commands with it, then
      turn ``error_code`` off (None: every command). Counted on the server's own loop, so a
      client's retry can never slip in before the knob is cleared, however loaded the machine.

    Info (tending) traffic ignores these knobs; ``down()`` closes the listener and every
    connection, ``up()`` listens again on the same port.
    """

    def __init__(
        self,
        namespace: str = "test",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        namespaces: list[str] | None = None,
        node_id: str | None = None,
        cluster_name: str = "test-cluster",
        default_ttl: int = 0,
        batch_max_requests: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.namespaces = list(namespaces) if namespaces else [namespace]
        self.namespace = self.namespaces[0]
        self.node_id = node_id or f"BB9{next(_node_ids):012X}"
        self.cluster_name = cluster_name
        #: seconds added to the wall clock for record expiry (``advance()`` moves it)
        self.clock_offset = 0.0
        self.store = Store(self.namespaces, default_ttl=default_ttl, clock=self._clock)
        #: more rows than this in one batch: the whole batch fails with 151, as on a real
        #: server over its batch-max-requests (None: no limit)
        self.batch_max_requests = batch_max_requests
        self.info = InfoResponder(self)
        self.latency_s: float = 0.0
        self.drop_connections: bool = False
        self.error_code: int | None = None
        self.error_times: int | None = None
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("aerospike test server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        await self.down()

    async def down(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def up(self) -> None:
        """Listen again on the same port after down()."""
        if self._server is None:
            await self.start()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def _clock(self) -> float:
        return time.time() + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the expiry clock forward (records whose TTL ran out are gone)."""
        self.clock_offset += seconds

    # -- inspection --------------------------------------------------------------------

    def digest_of(self, set_name: str, key: Any) -> bytes:
        return wire.compute_digest(self.namespace, set_name, key)

    def records(self, set_name: str, namespace: str | None = None) -> dict[Any, dict[str, Any]]:
        """{user key (when the client sent it) or digest: {bin: value}} of one set."""
        ns = namespace or self.namespace
        out: dict[Any, dict[str, Any]] = {}
        for (rns, digest), rec in self.store.snapshot().items():
            if rns == ns and rec.set_name == set_name:
                key = rec.user_key if rec.user_key is not None else digest
                out[key] = {n: python_value(p) for n, p in rec.bins.items()}
        return out

    def record(
        self, set_name: str, key: Any, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The bins of the record of a user key (looked up by digest), or None."""
        ns = namespace or self.namespace
        rec = self.store.get(ns, wire.compute_digest(ns, set_name, key))
        if rec is None:
            return None
        return {n: python_value(p) for n, p in rec.bins.items()}

    def generation(self, set_name: str, key: Any, namespace: str | None = None) -> int | None:
        ns = namespace or self.namespace
        rec = self.store.get(ns, wire.compute_digest(ns, set_name, key))
        return None if rec is None else rec.generation

    def ttl(self, set_name: str, key: Any, namespace: str | None = None) -> int | None:
        """Seconds the record has left, -1 when it never expires, None when there is none."""
        ns = namespace or self.namespace
        rec = self.store.get(ns, wire.compute_digest(ns, set_name, key))
        if rec is None:
            return None
        return -1 if rec.void_time == 0 else rec.void_time - self.store.now()

    def seed(
        self, set_name: str, key: Any, bins: dict[str, Any], namespace: str | None = None
    ) -> None:
        """Write a record directly (no client involved); map bins must be dicts."""
        ns = namespace or self.namespace
        digest = wire.compute_digest(ns, set_name, key)
        particles = {n: wire.particle_of(v) for n, v in bins.items()}
        particles = {
            n: wire.decode_particle(p.ptype, wire.encode_particle(p)) for n, p in particles.items()
        }
        prev = self.store.get(ns, digest)
        gen = (prev.generation if prev else 0) + 1
        self.store.put_record(ns, digest, Record(set_name, particles, gen, key))

    def clear(self) -> None:
        self.store.clear()

    def command_counts(self) -> Counter[str]:
        """Data commands served by kind (put, get, operate, delete, exists, batch, ...),
        plus info commands as 'info:<name>' and fault-knob outcomes."""
        with self._counts_lock:
            counts = Counter(self._counts)
        for name, n in self.info.counts.items():
            counts["info:" + name] = n
        return counts

    def _count(self, kind: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[kind] += n

    # -- connections ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug here must not kill the server; the client sees a reset
            log.exception("aerospike test server: connection handler failed")
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        version, ptype, size = wire.parse_proto_header(await reader.readexactly(8))
        body = await reader.readexactly(size)
        if ptype == wire.TYPE_MSG_COMPRESSED:
            self._count("compressed")
            ptype, body = wire.decompress(body)
        if ptype == wire.TYPE_INFO:
            writer.write(wire.frame(wire.TYPE_INFO, self.info.respond(body)))
            await writer.drain()
            return True
        if ptype != wire.TYPE_MSG:
            log.warning(
                "aerospike test server: unsupported proto type %d (version %d)", ptype, version
            )
            self._count("unsupported_proto_type")
            return False
        if self.drop_connections:
            self._count("dropped")
            return False
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        try:
            if len(body) > 1 and body[1] & wire.INFO1_BATCH:
                # A big batch takes a while in Python: off the loop, so the tend thread's info
                # requests are still answered meanwhile, as a real server does (a node whose
                # info times out is dropped by the client and the batch fails).
                loop = asyncio.get_running_loop()
                frames = await loop.run_in_executor(None, self._handle_msg, body)
            else:
                frames = self._handle_msg(body)
        except (wire.ProtocolError, ValueError, IndexError, struct.error) as exc:
            log.warning("aerospike test server: malformed data command: %s", exc)
            self._count("malformed")
            frames = [batch.last_frame(wire.ERR_PARAMETER)]
        writer.write(b"".join(frames))
        await writer.drain()
        return True

    # -- data commands ----------------------------------------------------------------

    def _handle_msg(self, body: bytes) -> list[bytes]:
        msg, _ = wire.parse_msg(body)
        batch_field = msg.field(wire.FIELD_BATCH)
        if msg.info1 & wire.INFO1_BATCH or batch_field is not None:
            return self._handle_batch(msg, batch_field)
        if msg.field(wire.FIELD_DIGEST) is None:
            return self._handle_query(msg)
        kind = _command_kind(msg)
        self._count(kind)
        if kind == "get" and msg.ops and all(op.name for op in msg.ops):
            self._count("get:" + ",".join(op.name for op in msg.ops))  # named bins only
        code = self._injected_error()
        if code:
            return [wire.frame(wire.TYPE_MSG, wire.AsMsg(result_code=code).encode())]
        if msg.field(wire.FIELD_FILTER_EXP) is not None:
            log.warning("aerospike test server: filter expressions are not supported")
            response = wire.AsMsg(result_code=wire.ERR_UNSUPPORTED_FEATURE)
        else:
            response = self.store.execute(self._command(msg))
        return [wire.frame(wire.TYPE_MSG, response.encode())]

    def _command(self, msg: wire.AsMsg) -> Command:
        key = msg.field(wire.FIELD_KEY)
        return Command(
            info1=msg.info1,
            info2=msg.info2,
            info3=msg.info3,
            namespace=(msg.field(wire.FIELD_NAMESPACE) or b"").decode(),
            set_name=(msg.field(wire.FIELD_SET) or b"").decode(),
            digest=msg.field(wire.FIELD_DIGEST) or b"",
            ops=msg.ops,
            generation=msg.generation,
            user_key=wire.decode_user_key(key) if key else None,
            ttl=msg.record_ttl,
        )

    def _handle_batch(self, msg: wire.AsMsg, data: bytes | None) -> list[bytes]:
        self._count("batch")
        code = self._injected_error()
        if code:
            return [batch.last_frame(code)]
        if data is None:
            return [batch.last_frame(wire.ERR_PARAMETER)]
        if msg.field(wire.FIELD_FILTER_EXP) is not None:
            log.warning("aerospike test server: filter expressions are not supported")
            return [batch.last_frame(wire.ERR_UNSUPPORTED_FEATURE)]
        rows = batch.parse_batch(data)
        if self.batch_max_requests is not None and len(rows) > self.batch_max_requests:
            self._count("batch_rejected")
            return [batch.last_frame(wire.ERR_BATCH_MAX_REQUESTS)]
        self._count("batch_rows", len(rows))
        responses: list[wire.AsMsg] = []
        for row in rows:
            if row.command.unsupported:
                log.warning(
                    "aerospike test server: unsupported %s in batch row", row.command.unsupported
                )
                response = wire.AsMsg(result_code=wire.ERR_UNSUPPORTED_FEATURE)
            else:
                response = self.store.execute(row.command)
            response.transaction_ttl = row.index
            responses.append(response)
        return batch.response_frames(responses)

    def _handle_query(self, msg: wire.AsMsg) -> list[bytes]:
        self._count("query")
        code = self._injected_error()
        if code:
            return [batch.last_frame(code)]
        return query.run(self, msg)

    def _injected_error(self) -> int | None:
        """The result code to answer this data command with (the `error_code` knob, counted
        down by `error_times`), or None to execute it."""
        code = self.error_code
        if not code:
            return None
        self._count("error_injected")
        if self.error_times is not None:
            self.error_times -= 1
            if self.error_times <= 0:
                self.error_code = self.error_times = None
        return code


class ThreadedAerospikeServer:
    """Runs an :class:`AerospikeTestServer` on its own event loop in a daemon thread."""

    def __init__(
        self, namespace: str = "test", host: str = "127.0.0.1", port: int = 0, **kwargs: Any
    ) -> None:
        self.server = AerospikeTestServer(namespace, host, port, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> ThreadedAerospikeServer:
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:  # report bind errors to the caller
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="aerospike-test-server", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def _call(self, coro: Any) -> None:
        if self._loop is None:
            raise RuntimeError("server is not started")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def down(self) -> None:
        self._call(self.server.down())

    def up(self) -> None:
        self._call(self.server.up())

    def __enter__(self) -> ThreadedAerospikeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def namespace(self) -> str:
        return self.server.namespace

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """A config dict for aerospike.client() pointing at this server."""
        config: dict[str, Any] = {"hosts": [(self.host, self.port)]}
        config.update(extra)
        return config

    # fault knobs (proxied; plain attribute writes are atomic enough for the loop thread)

    @property
    def latency_s(self) -> float:
        return self.server.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self.server.latency_s = value

    @property
    def drop_connections(self) -> bool:
        return self.server.drop_connections

    @drop_connections.setter
    def drop_connections(self, value: bool) -> None:
        self.server.drop_connections = value

    @property
    def error_code(self) -> int | None:
        return self.server.error_code

    @error_code.setter
    def error_code(self, value: int | None) -> None:
        self.server.error_code = value

    @property
    def error_times(self) -> int | None:
        return self.server.error_times

    @error_times.setter
    def error_times(self, value: int | None) -> None:
        self.server.error_times = value

    def reset_faults(self) -> None:
        self.server.latency_s = 0.0
        self.server.drop_connections = False
        self.server.error_code = None
        self.server.error_times = None

    # inspection (thread-safe: the store is locked)

    def digest_of(self, set_name: str, key: Any) -> bytes:
        return self.server.digest_of(set_name, key)

    def records(self, set_name: str, namespace: str | None = None) -> dict[Any, dict[str, Any]]:
        return self.server.records(set_name, namespace)

    def record(
        self, set_name: str, key: Any, namespace: str | None = None
    ) -> dict[str, Any] | None:
        return self.server.record(set_name, key, namespace)

    def generation(self, set_name: str, key: Any, namespace: str | None = None) -> int | None:
        return self.server.generation(set_name, key, namespace)

    def ttl(self, set_name: str, key: Any, namespace: str | None = None) -> int | None:
        return self.server.ttl(set_name, key, namespace)

    def advance(self, seconds: float) -> None:
        self.server.advance(seconds)

    @property
    def batch_max_requests(self) -> int | None:
        return self.server.batch_max_requests

    @batch_max_requests.setter
    def batch_max_requests(self, value: int | None) -> None:
        self.server.batch_max_requests = value

    @property
    def default_ttl(self) -> int:
        return self.server.store.default_ttl

    @default_ttl.setter
    def default_ttl(self, value: int) -> None:
        self.server.store.default_ttl = value

    def seed(
        self, set_name: str, key: Any, bins: dict[str, Any], namespace: str | None = None
    ) -> None:
        self.server.seed(set_name, key, bins, namespace)

    def clear(self) -> None:
        self.server.clear()

    def command_counts(self) -> Counter[str]:
        return self.server.command_counts()

    @property
    def unknown_info_commands(self) -> Counter[str]:
        return Counter(self.server.info.unknown)

    @property
    def sindexes(self) -> dict[tuple[str, str], Any]:
        return dict(self.server.info.sindexes)

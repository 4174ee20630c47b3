"""The Unix-socket server (protocol v1, see sidecar/protocol.py), on asyncio.Protocol.

Requests answerable from memory are answered inside `data_received`; all responses produced
by one `data_received` call go out in one `transport.write`. Requests that need the fallback
become tasks; a per-connection FIFO of slots keeps responses in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..ids import MAX_USER, BadRequest
from ..packed import MAX_SEGMENTS
from ..protocol import (
    BAD_REQUEST,
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    INTERNAL_ERROR,
    OK,
    OPS,
    UNKNOWN_OP,
    FrameError,
    UnknownOp,
    batch_packed_layout,
    check_layout,
    decode_request,
    encode_response,
    op_of,
    oversize_message,
)
from ..shm import native_or_none
from .metrics import NO_SOURCE, OK_KEYS, Metrics, OpStats
from .queries import Queries
from .results import LOCAL, Deferred, Result

log = logging.getLogger(__name__)

DEFAULT_SOCKET_MODE = 0o660
#: Pause reading a connection with this many responses waiting on the fallback.
MAX_PENDING = 1024
_unpack_header = HEADER.unpack_from
_perf = time.perf_counter
_BAD = (NO_SOURCE, "bad_request")
_K_LOCAL = OK_KEYS[LOCAL]
#: 1 in (mask + 1) locally answered checks is timed for seg_request_duration_seconds.
LATENCY_SAMPLE_MASK = 15


class _Sampler:
    """The latency sampler's counter when the C extension (`FastCheck`) is not built."""

    __slots__ = ("untimed",)

    def __init__(self) -> None:
        self.untimed = 0


class _Slot:
    """A response position in a connection's FIFO; `data` is set once it is encoded."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data


Request = tuple[Any, ...]
Handler = Callable[[Request], Result | Deferred]


class _Connection(asyncio.Protocol):
    __slots__ = (
        "server",
        "transport",
        "buf",
        "pending",
        "tasks",
        "paused_write",
        "paused_pending",
        "closing",
        "max_frame",
        "handlers",
        "metrics",
        "fast",
        "fast_batch",
    )

    def __init__(self, server: UdsServer) -> None:
        self.server = server
        self.fast = server.fast_check
        self.fast_batch = server.fast_batch
        self.max_frame = server.max_frame
        self.handlers = server.handlers
        self.metrics = server.metrics
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: deque[_Slot] = deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self.paused_write = False
        self.paused_pending = False
        self.closing = False

    # -- connection events -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for task in self.tasks:
            task.cancel()
        self.pending.clear()

    def pause_writing(self) -> None:
        # The client does not read its responses: stop reading its requests.
        self.paused_write = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_write = False
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        t = self.transport
        if t is not None and not (self.paused_write or self.paused_pending or self.closing):
            t.resume_reading()

    # -- requests --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if not buf and not self.pending and not self.closing:
            # One whole frame holding a check answered from memory: all of it in C
            # (`_native.FastCheck`, the inline path below in C; None for anything else), or
            # a batch_packed answered from memory (`_native.FastBatch`, the same split).
            fast = self.fast
            if fast is not None:
                out = fast(data)
                if out is not None:
                    self.transport.write(out)  # type: ignore[union-attr]
                    return
            fast = self.fast_batch
            if fast is not None:
                out = fast(data)
                if out is not None:
                    self.transport.write(out)  # type: ignore[union-attr]
                    return
        if not buf and len(data) >= HEADER_SIZE and not self.closing:
            # The common case: exactly one whole frame (a client waiting for its answer).
            length = _unpack_header(data, 0)[0]
            if length + HEADER_SIZE == len(data) and length <= self.max_frame:
                result = self._handle(data[HEADER_SIZE:])
                if type(result) is bytes:
                    if self.pending:
                        self.pending.append(_Slot(result))
                    else:
                        self.transport.write(result)  # type: ignore[union-attr]
                return
        self._received(data)

    def _received(self, data: bytes) -> None:
        """Any number of frames, possibly partial."""
        if self.closing:
            return
        buf = self.buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        end = len(view)
        pos = 0
        out: list[bytes] = []
        pending = self.pending
        server = self.server
        limit = self.max_frame
        handle = self._handle
        while end - pos >= HEADER_SIZE:
            length = _unpack_header(view, pos)[0]
            if length > limit:
                server.metrics.error("uds", "frame_too_large")
                err = encode_response(None, BAD_REQUEST, oversize_message(length, limit))
                if pending:  # answered after the responses still owed, then closed
                    pending.append(_Slot(err))
                else:
                    out.append(err)
                if out:
                    self._write_now(out)
                self._close_after_pending()
                buf.clear()
                return
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            result = handle(view[pos + HEADER_SIZE : stop])
            pos = stop
            if type(result) is bytes:
                if pending:
                    pending.append(_Slot(result))
                else:
                    out.append(result)
            # else: a _Slot already queued for a fallback task
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += view[pos:]
        if out:
            self._write_now(out)

    def _write_now(self, out: list[bytes]) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))

    def _handle(self, body: bytes | bytearray) -> bytes | _Slot:
        """One frame: an encoded response, or a slot a fallback task will fill."""
        try:
            req = decode_request(body)
        except FrameError as exc:
            self.metrics.error("uds", "bad_frame")
            return encode_response(None, BAD_REQUEST, exc.message)
        rid = req[0]
        if len(req) == 4 and req[1] == "check":
            # The hot path: `Replica.contains` (`Replica.local`'s answer) for a valid check of
            # a name already validated, counted but not timed. One in LATENCY_SAMPLE_MASK + 1
            # takes the general path below and is timed, which keeps the latency histogram
            # honest at a fraction of the cost.
            server = self.server
            sampler = server.sampler
            sampler.untimed = untimed = (sampler.untimed + 1) & LATENCY_SAMPLE_MASK
            if untimed:
                user = req[2]
                seg = req[3]
                if (
                    type(user) is int
                    and 0 <= user <= MAX_USER
                    and type(seg) is str
                    and seg in server.valid_names
                ):
                    has = server.contains(user, seg)
                    if has is not None:
                        server.check_counts[_K_LOCAL] += 1
                        return encode_response(rid, OK, has)
        started = _perf()
        op = req[1] if len(req) > 1 else None
        entry = self.handlers.get(op) if type(op) is str else None
        try:
            if entry is None or len(req) != entry[0]:
                op = op_of(req)  # raises the precise error
                raise AssertionError("unreachable")  # pragma: no cover
            result = entry[1](req)
        except BadRequest as exc:
            self.metrics.error("uds", "bad_request")
            self.server.op_stats(op).record(_BAD, _perf() - started)
            return encode_response(rid, BAD_REQUEST, str(exc))
        except UnknownOp as exc:
            self.metrics.error("uds", "unknown_op")
            return encode_response(rid, UNKNOWN_OP, str(exc))
        except Exception:
            log.exception("internal error in %r (request id %s)", op, rid)
            self.metrics.error("uds", "internal")
            return encode_response(rid, INTERNAL_ERROR, "internal error")
        if type(result) is tuple:
            entry[2].record(OK_KEYS[result[1]], _perf() - started)
            return encode_response(rid, OK, result[0])
        # A coroutine that needs the fallback.
        slot = _Slot()
        self.pending.append(slot)
        task = asyncio.get_running_loop().create_task(
            self._complete(slot, rid, op, entry[2], result, started)
        )
        self.tasks.add(task)
        self.server.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.pending) >= MAX_PENDING and not self.paused_pending:
            self.paused_pending = True
            if self.transport is not None:
                self.transport.pause_reading()
        return slot

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.server.tasks.discard(task)

    async def _complete(
        self,
        slot: _Slot,
        rid: int,
        op: str,
        stats: OpStats,
        coro: Deferred,
        started: float,
    ) -> None:
        try:
            result, source = await coro
            slot.data = encode_response(rid, OK, result)
            stats.record(OK_KEYS[source], _perf() - started)
        except asyncio.CancelledError:
            raise
        except BadRequest as exc:
            slot.data = encode_response(rid, BAD_REQUEST, str(exc))
        except Exception:
            log.exception("internal error in %r (request id %s)", op, rid)
            self.server.metrics.error("uds", "internal")
            slot.data = encode_response(rid, INTERNAL_ERROR, "internal error")
        self._flush()

    def _flush(self) -> None:
        pending = self.pending
        out: list[bytes] = []
        while pending and pending[0].data is not None:
            out.append(pending.popleft().data)  # type: ignore[arg-type]
        if out:
            self._write_now(out)
        if self.paused_pending and len(pending) < MAX_PENDING // 2:
            self.paused_pending = False
            self._maybe_resume()
        if self.closing and not pending and self.transport is not None:
            self.transport.close()

    def _close_after_pending(self) -> None:
        """Stop reading; close once the responses still owed are written."""
        self.closing = True
        if self.transport is None:
            return
        if self.pending:
            self.transport.pause_reading()
        else:
            self.transport.close()


class UdsServer:
    def __init__(
        self,
        queries: Queries,
        path: str | os.PathLike[str],
        *,
        metrics: Metrics | None = None,
        mode: int = DEFAULT_SOCKET_MODE,
        max_frame: int = DEFAULT_MAX_FRAME,
        backlog: int = 1024,
        shm_info: dict[str, Any] | None = None,
    ) -> None:
        self.queries = queries
        #: where the shared replica is published (`shm_info`), None when it is not
        self.shm_info = shm_info
        self.path = Path(path)
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        self.mode = mode
        self.max_frame = max_frame
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        ops: dict[str, Handler] = {
            "ping": lambda req: ("pong", NO_SOURCE),
            "check": lambda req: queries.check(req[2], req[3]),
            "check_at": lambda req: queries.check_at(req[2], req[3], req[4], req[5]),
            "check_many": lambda req: queries.check_many(req[2], req[3]),
            "batch": lambda req: queries.batch(req[2]),
            "batch_packed": lambda req: queries.batch_packed(req[2], req[3], req[4]),
            "segments": lambda req: queries.segments(req[2]),
            "explain": lambda req: queries.explain(req[2], req[3]),
            "status": lambda req: (self._status(), NO_SOURCE),
            "eval": lambda req: queries.eval(req[2], req[3]),
            "eval_many": lambda req: queries.eval_many(req[2], req[3]),
            "count": lambda req: queries.count(req[2]),
            "shm_info": lambda req: (self.shm_info, NO_SOURCE),
        }
        # op -> (request length, handler, pre-bound stats)
        self.handlers: dict[str, tuple[int, Handler, OpStats]] = {
            op: (OPS[op] + 2, fn, self.metrics.op("uds", op)) for op, fn in ops.items()
        }
        # What the connections' inline check path reads (these objects are never replaced).
        self.replica = queries.replica
        self.contains = queries.replica.contains
        self.valid_names = queries.names.valid
        self.check_counts = self.handlers["check"][2].counts
        #: the inline path in C (`FastCheck.answer`): the same check over the replica's
        #: `native_local` (Replica.local's rule) and protocol's `check_layout`; None without
        #: the C extension. Its `untimed` is the latency sampler's counter for both paths.
        self.fast_check: Callable[[bytes], bytes | None] | None = None
        self.sampler: Any = _Sampler()
        nat, local = native_or_none(), queries.replica.native_local
        if nat is not None and local is not None:
            self.sampler = nat.FastCheck(
                self.valid_names, local, self.check_counts, _K_LOCAL, self.max_frame,
                LATENCY_SAMPLE_MASK, check_layout(),
            )  # fmt: skip
            self.fast_check = self.sampler.answer
        #: `batch_packed` in C (`FastBatch.answer`) when every segment of a whole frame is
        #: answered from memory (the replica's `native_local`, Replica.local's rule), recorded
        #: in the op's stats as the Python path records it; None without the C extension.
        #: Everything else (and every error) is the Python path's (`Queries.batch_packed`).
        self.fast_batch: Callable[[bytes], bytes | None] | None = None
        if nat is not None and local is not None:
            self.fast_batch = nat.FastBatch(
                self.valid_names, local, self.handlers["batch_packed"][2].record, _K_LOCAL,
                self.max_frame, MAX_SEGMENTS, batch_packed_layout(),
            ).answer  # fmt: skip
        self.metrics.gauge(
            "seg_uds_connections", "Open Unix-socket connections.", lambda: len(self.connections)
        )

    @property
    def untimed(self) -> int:
        """The latency sampler's counter: the next request is timed when it wraps to 0."""
        return int(self.sampler.untimed)

    @untimed.setter
    def untimed(self, value: int) -> None:
        self.sampler.untimed = value

    def op_stats(self, op: object) -> OpStats:
        entry = self.handlers.get(op) if type(op) is str else None
        return entry[2] if entry is not None else self.metrics.op("uds", "invalid")

    def _status(self) -> dict[str, Any]:
        st = self.queries.status()
        st["connections"] = len(self.connections)
        return st

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        sock = prepare_socket(self.path, self.mode, self.backlog)
        try:
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _Connection(self), sock=sock, backlog=self.backlog
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("unix socket listening on %s (mode %o)", self.path, self.mode)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests waiting on the fallback finish (up to `grace` s),
        close every connection and remove the socket file."""
        if self._server is not None:
            self._server.close()
        self._unlink()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=grace)
            except TimeoutError:
                log.warning("unix server did not close within %.1f s", grace)
            self._server = None

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours."""
        if self._inode is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


class SocketPathError(RuntimeError):
    """The socket path cannot be used safely; the message says why."""


def prepare_socket(path: Path, mode: int, backlog: int) -> socket.socket:
    """A listening Unix socket bound at `path` with `mode`, made safely:

    - the parent directory is created with mode 0750 when missing; an existing parent that is
      world-writable without the sticky bit is refused (anyone could replace the socket);
    - a stale socket file (nothing listening) is removed; a live one, or a path that is not a
      socket, is refused;
    - the socket is bound under a temporary name, chmod-ed, then renamed into place, so the
      path never exists with other permissions.
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o750, parents=True)
    pst = os.stat(parent)
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise SocketPathError(
            f"refusing to create a socket in {parent}: it is world-writable without the sticky "
            "bit; use a private directory"
        )
    if len(os.fsencode(path)) > 100:
        raise SocketPathError(f"socket path {path} is too long (at most 100 bytes)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        except OSError as exc:
            raise SocketPathError(f"cannot tell whether {path} is in use: {exc}") from exc
        else:
            raise SocketPathError(f"another server is listening on {path}")
        finally:
            probe.close()
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) > 107:
        tmp = parent / f".s{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        sock.listen(backlog)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock

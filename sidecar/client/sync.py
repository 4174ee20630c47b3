"""Blocking client of the sidecar's Unix socket (protocol v1), built for the lowest latency:
one `sendall` per request with a pre-built header struct and a reused msgpack Packer,
responses read with `recv_into` a reused buffer, kernel-side timeouts (SO_RCVTIMEO) instead
of a poll per read. Not thread-safe: use one client per thread.

All ops are read-only, so a request that meets a broken connection is retried once on a new
connection. A timeout is not retried (the connection is dropped: a late response must not be
mistaken for the next one).
"""

from __future__ import annotations

import errno
import http.client
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, overload

from ..expr.results import Count
from ..ids import MAX_WAIT_MS
from ..protocol import HEADER, HEADER_SIZE, ResponseError, decode_response
from . import base
from .base import (
    BaseClient,
    Call,
    Explain,
    Export,
    ServerError,
    SidecarTimeout,
    SidecarUnavailable,
    audience_target,
    error_for,
    http_address,
    http_failure,
    typed,
)

_hunpack = HEADER.unpack_from
#: A pipeline writes at most this many bytes of requests before reading their responses.
PIPELINE_CHUNK = 128 * 1024


def _set_timeouts(sock: socket.socket, timeout: float) -> None:
    secs = int(timeout)
    tv = struct.pack("ll", secs, int((timeout - secs) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _Eof(Exception):
    """The server closed the connection."""


class SidecarClient(BaseClient):
    """`SidecarClient(path, timeout=1.0)`; also a context manager. Methods raise
    SidecarError subclasses."""

    def _init_io(self) -> None:
        self._sock: socket.socket | None = None
        self._buf = bytearray(64 * 1024)
        self._view = memoryview(self._buf)
        self._start = 0  # unread data is self._buf[_start:_end]
        self._end = 0

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> SidecarClient:
        if self._sock is None:
            self._sock = self._open()
        return self

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None and self.timeout > 0:
            _set_timeouts(sock, self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise SidecarUnavailable(
                f"cannot connect to the sidecar at {self.path}: {exc}"
            ) from exc
        self._start = self._end = 0
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._start = self._end = 0

    def __enter__(self) -> SidecarClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------
    def _fill(self, sock: socket.socket, need: int) -> None:
        """Read until `need` bytes are buffered from `_start`."""
        if self._start + need > len(self._buf):
            have = self._end - self._start
            size = max(len(self._buf), need)
            buf = bytearray(size)
            buf[:have] = self._buf[self._start : self._end]
            self._buf = buf
            self._view = memoryview(buf)
            self._start, self._end = 0, have
        view = self._view
        while self._end - self._start < need:
            n = sock.recv_into(view[self._end :])
            if n == 0:
                raise _Eof()
            self._end += n

    def _read(self, sock: socket.socket) -> list[Any]:
        """One response array."""
        if self._end - self._start < HEADER_SIZE:
            if self._start == self._end:
                self._start = self._end = 0
            self._fill(sock, HEADER_SIZE)
        length = _hunpack(self._buf, self._start)[0]
        if self._end - self._start < HEADER_SIZE + length:
            self._fill(sock, HEADER_SIZE + length)
        body_start = self._start + HEADER_SIZE
        self._start = body_start + length
        try:
            resp = decode_response(self._view[body_start : self._start])
        except ResponseError as exc:
            raise ServerError(str(exc)) from None
        finally:
            if self._start == self._end:
                self._start = self._end = 0
        return resp

    # -- the round trip --------------------------------------------------------------------------
    def _exchange(self, payload: bytes, ids: list[int]) -> list[list[Any]]:
        """Send `payload` (the frames of `ids`) and read their responses; one transparent
        reconnect on a broken connection."""
        for attempt in (0, 1):
            sock = self._sock
            if sock is None:
                sock = self._sock = self._open()
            try:
                sock.sendall(payload)
                out = []
                for rid in ids:
                    resp = self._read(sock)
                    if resp[0] != rid:
                        if resp[0] is None:  # frame-level error: the server may close
                            self.close()
                            out.append(resp)
                            break
                        self.close()
                        raise ServerError(f"response id {resp[0]!r} does not match {rid}")
                    out.append(resp)
                return out
            except (_Eof, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise SidecarUnavailable(f"connection to {self.path} broke: {exc!r}") from None
            except (BlockingIOError, TimeoutError) as exc:
                self.close()
                raise SidecarTimeout(
                    f"no response from {self.path} within {self.timeout} s"
                ) from exc
            except OSError as exc:
                self.close()
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise SidecarTimeout(
                        f"no response from {self.path} within {self.timeout} s"
                    ) from exc
                if attempt:
                    raise SidecarUnavailable(f"connection to {self.path} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, op: str, *args: Any) -> Any:
        """One request; returns the raw result or raises the matching SidecarError."""
        self._id = rid = (self._id + 1) & 0xFFFFFFFF
        resp = self._exchange(self._frame(rid, op, args), [rid])[0]
        if resp[1] == 0:
            return resp[2]
        raise error_for(resp[1], resp[2])

    def run(self, call: Call) -> Any:
        """One request as `base` encodes it, its result decoded."""
        result = self._call_waiting(call) if call.wait else self.call(call.op, *call.args)
        return call.decode(result) if call.decode is not None else result

    def _call_waiting(self, call: Call) -> Any:
        """`call` with the receive timeout raised by the time the server may wait."""
        sock = self._sock = self._sock or self._open()
        if not self.timeout or self.timeout <= 0:
            return self.call(call.op, *call.args)
        _set_timeouts(sock, self.timeout + call.wait)
        try:
            return self.call(call.op, *call.args)
        finally:
            if self._sock is sock:
                _set_timeouts(sock, self.timeout)

    # -- ops -----------------------------------------------------------------------------------
    def ping(self) -> str:
        return self.call("ping")

    def check(self, user: int, segment: str) -> bool | None:
        """True / False, or None when neither the replica nor the fallback can answer."""
        return self.call("check", user, segment)

    def check_at(
        self, user: int, segment: str, min_version: int, wait_ms: int = MAX_WAIT_MS
    ) -> bool | None:
        """Read-your-publish (`base.check_at`): never an answer from state older than
        `min_version`; None when that version has not landed within `wait_ms`."""
        return self.run(base.check_at(user, segment, min_version, wait_ms))

    def check_many(self, user: int, segments: Sequence[str]) -> list[bool | None]:
        return self.run(base.check_many(user, segments))

    def batch(self, pairs: Iterable[tuple[int, str] | Sequence[Any]]) -> list[bool | None]:
        """`pairs` of (user, segment); tuples are sent as they are (no copy)."""
        return self.run(base.batch(pairs))

    @overload
    def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: Literal[False] = ...
    ) -> list[bool | None]: ...
    @overload
    def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: Literal[True]
    ) -> bytes: ...
    def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: bool = False
    ) -> list[bool | None] | bytes:
        """Many checks in the packed form (`sidecar/packed.py`): `users` (ints, or a uint64
        array such as `array('Q')` or numpy's, taken as it is) against one segment id, or
        against `segments[i]` each. The fastest way to check a list of users. With
        `raw=True` the answers stay bytes, one per user: 0 not a member, 1 member, 2 unknown
        (`numpy.frombuffer(answers, numpy.uint8)` reads them without a copy)."""
        return self.run(base.batch_packed(users, segments, raw))

    def segments(self, user: int) -> list[str]:
        return self.call("segments", user)

    def explain(self, user: int, segment: str) -> Explain:
        return self.run(base.explain(user, segment))

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def shm_info(self) -> dict[str, Any] | None:
        """Where the shared replica is published (sidecar.client.SharedReplica uses it)."""
        return self.run(base.shm_info())

    # -- segment expressions ---------------------------------------------------------------------
    def eval(self, user: int, expr: str) -> bool | None:
        """`expr` (say "vip & !churned") for `user`: True / False / None (unknown)."""
        return self.call("eval", user, expr)

    @overload
    def eval_many(
        self, users: base.Users, expr: str, *, raw: Literal[False] = ...
    ) -> list[bool | None]: ...
    @overload
    def eval_many(self, users: base.Users, expr: str, *, raw: Literal[True]) -> bytes: ...
    def eval_many(
        self, users: base.Users, expr: str, *, raw: bool = False
    ) -> list[bool | None] | bytes:
        """`expr` for each of `users` (as `batch_packed` takes them), in order."""
        return self.run(base.eval_many(users, expr, raw))

    def count(self, expr: str) -> Count:
        """(count, versions) of a bounded expression over segments the sidecar holds."""
        return self.run(base.count(expr))

    def audience(
        self, expr: str, *, after: int | None = None, limit: int | None = None
    ) -> AudienceExport:
        """The members of a bounded expression, ascending, streamed from the sidecar's HTTP
        server (`http=` of the client): `with client.audience("a & !b") as export:` then
        `export.versions` and `for user in export`. NotLocalError (HTTP 409) names segments
        the sidecar does not hold; BadRequestError a bad expression."""
        host, port = http_address(self.http)
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request("GET", audience_target(expr, after, limit))
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise SidecarUnavailable(f"cannot reach the sidecar at {host}:{port}: {exc}") from exc
        if resp.status != 200:
            body = resp.read()
            conn.close()
            raise http_failure(resp.status, body)
        return AudienceExport(conn, resp)

    def pipeline(self, requests: Iterable[Sequence[Any]]) -> list[Any]:
        """Send many requests `(op, *args)` in one write and read all responses, in order.
        Each result is typed like the op's method, or the SidecarError of that request
        (one failed request does not fail the others)."""
        results: list[Any] = []
        frames: list[bytes] = []
        ops: list[str] = []
        ids: list[int] = []
        size = 0
        for i, req in enumerate(requests):
            rid = self._next_id()
            frame = self._frame(rid, req[0], req[1:], f"request {i}: ")
            frames.append(frame)
            ops.append(req[0])
            ids.append(rid)
            size += len(frame)
            if size >= PIPELINE_CHUNK:  # keep both socket buffers from filling up
                results += self._pipeline_chunk(frames, ops, ids)
                frames, ops, ids, size = [], [], [], 0
        if ids:
            results += self._pipeline_chunk(frames, ops, ids)
        return results

    def _pipeline_chunk(self, frames: list[bytes], ops: list[str], ids: list[int]) -> list[Any]:
        responses = self._exchange(b"".join(frames), ids)
        out = [typed(op, resp) for op, resp in zip(ops, responses, strict=False)]
        if len(responses) < len(ids):  # a frame-level error closed the exchange early
            lost = SidecarUnavailable("the connection closed before this response")
            out += [lost] * (len(ids) - len(responses))
        return out


class AudienceExport(Export):
    """One streamed `GET /v1/audience`; a context manager and an iterator of user ids."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        super().__init__(resp.headers)
        self._conn = conn
        self._resp = resp

    def __iter__(self) -> Iterator[int]:
        try:
            while chunk := self._resp.read1(64 * 1024):
                yield from self._ids(chunk)
            yield from self._ids(b"", end=True)
        except OSError as exc:
            raise SidecarUnavailable(f"the audience stream broke: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AudienceExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

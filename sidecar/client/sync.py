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
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import msgpack

from ..packed import pack_batch, unpack_answers

DEFAULT_PATH = os.environ.get("SEG_UDS") or "/tmp/seg-sidecar/sidecar.sock"
_HEADER = struct.Struct(">I")
_hpack = _HEADER.pack
_hunpack = _HEADER.unpack_from
_unpackb = msgpack.unpackb
#: The server's default frame limit; a larger request is refused before it is sent.
MAX_FRAME = 1 << 20
#: A pipeline writes at most this many bytes of requests before reading their responses.
PIPELINE_CHUNK = 128 * 1024


class SidecarError(Exception):
    """Any failure of a sidecar request."""


class BadRequestError(SidecarError):
    """Status 1: the server rejected the request (the message says which part)."""


class UnknownOpError(SidecarError):
    """Status 2: the server does not have this op."""


class ServerError(SidecarError):
    """Status 3 (internal error), or a response that breaks the protocol."""


class SidecarTimeout(SidecarError, TimeoutError):
    """No response within the timeout."""


class SidecarUnavailable(SidecarError, ConnectionError):
    """The socket cannot be reached (not running, wrong path, permissions) or broke twice."""


_STATUS_ERRORS: dict[int, type[SidecarError]] = {
    1: BadRequestError,
    2: UnknownOpError,
    3: ServerError,
}


@dataclass(frozen=True, slots=True)
class Explain:
    member: bool | None
    source: str  # "local" | "aerospike" | "none"
    version: int | None
    age_ms: int | None
    reason: str | None = None  # why it was not answered locally (None when it was)


def error_for(status: object, message: object) -> SidecarError:
    cls = _STATUS_ERRORS.get(status, ServerError) if type(status) is int else ServerError
    if cls is ServerError and status not in _STATUS_ERRORS:
        return ServerError(f"unexpected response status {status!r}: {message!r}")
    return cls(str(message))


def too_large(size: int, limit: int) -> str:
    return f"request of {size} bytes is over the frame limit of {limit} bytes"


def convert(op: str, result: Any) -> Any:
    """The typed result of `op`."""
    if op == "explain" and isinstance(result, dict):
        return Explain(
            result.get("member"),
            result.get("source", "none"),
            result.get("version"),
            result.get("age_ms"),
            result.get("reason"),
        )
    return result


def packed_args(users: Iterable[int] | Any, segments: str | Sequence[str]) -> list[Any]:
    """The arguments of a `batch_packed` request; BadRequestError for bad input."""
    try:
        return list(pack_batch(users, segments))
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def packed_result(answers: Any, raw: bool) -> list[bool | None] | bytes:
    """The typed result of `batch_packed`; ServerError when it is not answer bytes."""
    if type(answers) is not bytes or (raw and answers.translate(None, b"\x00\x01\x02")):
        raise ServerError(f"malformed batch_packed result: {answers!r}"[:200])
    try:
        return answers if raw else unpack_answers(answers)
    except ValueError as exc:
        raise ServerError(str(exc)) from None


class _Eof(Exception):
    """The server closed the connection."""


class SidecarClient:
    """`SidecarClient(path, timeout=1.0)`; also a context manager. Methods raise
    SidecarError subclasses."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        timeout: float = 1.0,
        *,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._buf = bytearray(64 * 1024)
        self._view = memoryview(self._buf)
        self._start = 0  # unread data is self._buf[_start:_end]
        self._end = 0
        self._id = 0

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> SidecarClient:
        if self._sock is None:
            self._sock = self._open()
        return self

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None and self.timeout > 0:
            secs = int(self.timeout)
            tv = struct.pack("ll", secs, int((self.timeout - secs) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
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
        if self._end - self._start < 4:
            if self._start == self._end:
                self._start = self._end = 0
            self._fill(sock, 4)
        length = _hunpack(self._buf, self._start)[0]
        if self._end - self._start < 4 + length:
            self._fill(sock, 4 + length)
        body_start = self._start + 4
        self._start = body_start + length
        resp = _unpackb(self._view[body_start : self._start], raw=False, strict_map_key=False)
        if self._start == self._end:
            self._start = self._end = 0
        if type(resp) is not list or len(resp) != 3:
            raise ServerError(f"malformed response: {resp!r}"[:200])
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

    def _next_id(self) -> int:
        self._id = rid = (self._id + 1) & 0xFFFFFFFF
        return rid

    def call(self, op: str, *args: Any) -> Any:
        """One request; returns the raw result or raises the matching SidecarError."""
        self._id = rid = (self._id + 1) & 0xFFFFFFFF
        try:
            body = self._pack([rid, op, *args])
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequestError(f"cannot encode the request: {exc}") from None
        if len(body) > self.max_frame:
            raise BadRequestError(too_large(len(body), self.max_frame))
        resp = self._exchange(_hpack(len(body)) + body, [rid])[0]
        if resp[1] == 0:
            return resp[2]
        raise error_for(resp[1], resp[2])

    # -- ops -----------------------------------------------------------------------------------
    def ping(self) -> str:
        return self.call("ping")

    def check(self, user: int, segment: str) -> bool | None:
        """True / False, or None when neither the replica nor the fallback can answer."""
        return self.call("check", user, segment)

    def check_many(self, user: int, segments: Sequence[str]) -> list[bool | None]:
        return self.call("check_many", user, list(segments))

    def batch(self, pairs: Iterable[tuple[int, str] | Sequence[Any]]) -> list[bool | None]:
        """`pairs` of (user, segment); tuples are sent as they are (no copy)."""
        return self.call("batch", pairs if isinstance(pairs, list | tuple) else list(pairs))

    @overload
    def batch_packed(
        self,
        users: Iterable[int] | Any,
        segments: str | Sequence[str],
        *,
        raw: Literal[False] = ...,
    ) -> list[bool | None]: ...
    @overload
    def batch_packed(
        self, users: Iterable[int] | Any, segments: str | Sequence[str], *, raw: Literal[True]
    ) -> bytes: ...
    def batch_packed(
        self, users: Iterable[int] | Any, segments: str | Sequence[str], *, raw: bool = False
    ) -> list[bool | None] | bytes:
        """Many checks in the packed form (`sidecar/packed.py`): `users` (ints, or a uint64
        array such as `array('Q')` or numpy's, taken as it is) against one segment id, or
        against `segments[i]` each. The fastest way to check a list of users. With
        `raw=True` the answers stay bytes, one per user: 0 not a member, 1 member, 2 unknown
        (`numpy.frombuffer(answers, numpy.uint8)` reads them without a copy)."""
        return packed_result(self.call("batch_packed", *packed_args(users, segments)), raw)

    def segments(self, user: int) -> list[str]:
        return self.call("segments", user)

    def explain(self, user: int, segment: str) -> Explain:
        return convert("explain", self.call("explain", user, segment))

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def pipeline(self, requests: Iterable[Sequence[Any]]) -> list[Any]:
        """Send many requests `(op, *args)` in one write and read all responses, in order.
        Each result is typed like the op's method, or the SidecarError of that request
        (one failed request does not fail the others)."""
        results: list[Any] = []
        frames: list[bytes] = []
        ops: list[str] = []
        ids: list[int] = []
        size = 0
        for req in requests:
            op = req[0]
            rid = self._next_id()
            try:
                body = self._pack([rid, *req])
            except (TypeError, ValueError, OverflowError) as exc:
                raise BadRequestError(f"cannot encode request {len(ops)}: {exc}") from None
            if len(body) > self.max_frame:
                raise BadRequestError(f"request {len(ops)}: {too_large(len(body), self.max_frame)}")
            frames.append(_hpack(len(body)))
            frames.append(body)
            ops.append(op)
            ids.append(rid)
            size += 4 + len(body)
            if size >= PIPELINE_CHUNK:  # keep both socket buffers from filling up
                results += self._pipeline_chunk(frames, ops, ids)
                frames, ops, ids, size = [], [], [], 0
        if ids:
            results += self._pipeline_chunk(frames, ops, ids)
        return results

    def _pipeline_chunk(self, frames: list[bytes], ops: list[str], ids: list[int]) -> list[Any]:
        responses = self._exchange(b"".join(frames), ids)
        out: list[Any] = []
        for op, resp in zip(ops, responses, strict=False):
            out.append(convert(op, resp[2]) if resp[1] == 0 else error_for(resp[1], resp[2]))
        if len(responses) < len(ids):  # a frame-level error closed the exchange early
            lost = SidecarUnavailable("the connection closed before this response")
            out += [lost] * (len(ids) - len(responses))
        return out

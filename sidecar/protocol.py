"""Unix-socket protocol, version 1 (DESIGN.md "Interfaces"): framing, limits, status codes,
ops and the encoding of requests and responses, for the server and both clients.

A frame is a 4-byte big-endian length and that many bytes of msgpack. A request is an array
`[id, op, args...]` with a non-negative integer id; the response is `[id, status, result]`,
in request order. Status 0 ok, 1 bad request, 2 unknown op, 3 internal error (the result is
then a message). Frame-level errors (over the size limit, not msgpack, no usable id) are
answered with id nil; only an oversize frame closes the connection.

A leaf module (msgpack and sidecar.ids only): clients import it without the servers.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .ids import BadRequest, describe

VERSION = 1
OK = 0
BAD_REQUEST = 1
UNKNOWN_OP = 2
INTERNAL_ERROR = 3

#: Default limit for one frame body (requests and responses); clients refuse a larger request
#: before sending it.
DEFAULT_MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

#: op -> number of arguments after [id, op]
OPS: dict[str, int] = {
    "ping": 0,
    "check": 2,
    "check_at": 4,
    "check_many": 2,
    "batch": 1,
    "batch_packed": 3,
    "segments": 1,
    "explain": 2,
    "status": 0,
    "eval": 2,
    "eval_many": 2,
    "count": 1,
    "shm_info": 0,
}
ARG_NAMES: dict[str, str] = {
    "ping": "no arguments",
    "check": "2 arguments (user, segment)",
    "check_at": "4 arguments (user, segment, min_version, wait_ms)",
    "check_many": "2 arguments (user, [segment, ...])",
    "batch": "1 argument ([[user, segment], ...])",
    "batch_packed": "3 arguments (segments, users as bin uint64, index as bin uint16)",
    "segments": "1 argument (user)",
    "explain": "2 arguments (user, segment)",
    "status": "no arguments",
    "eval": "2 arguments (user, expr)",
    "eval_many": "2 arguments (users as bin uint64, expr)",
    "count": "1 argument (expr)",
    "shm_info": "no arguments",
}


class FrameError(Exception):
    """A frame that has no usable request id: answered `[nil, 1, message]`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownOp(Exception):
    """A well-formed request naming an op this server does not have (status 2)."""


class EncodeError(ValueError):
    """A request that cannot be sent: not encodable, or over the frame limit."""


class ResponseError(ValueError):
    """A response frame that breaks the protocol (not msgpack, not `[id, status, result]`)."""


_pack = msgpack.Packer(use_bin_type=True).pack
_header_pack = HEADER.pack
_unpackb = msgpack.unpackb

# -- requests ------------------------------------------------------------------------------


def encode_request(rid: int, op: str, args: tuple[Any, ...] | list[Any], limit: int) -> bytes:
    """One framed request; EncodeError when it cannot be encoded or is over `limit` bytes."""
    try:
        body = _pack([rid, op, *args])
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode the request: {exc}") from None
    if len(body) > limit:
        raise EncodeError(f"request of {len(body)} bytes is over the frame limit of {limit} bytes")
    return _header_pack(len(body)) + body


def decode_request(body: bytes | bytearray | memoryview) -> tuple[Any, ...]:
    """The request array of one frame body (arrays decode as tuples: faster); FrameError when
    there is no usable request id."""
    try:
        req = _unpackb(body, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises ValueError/TypeError/its own errors
        raise FrameError(f"frame body is not valid msgpack: {type(exc).__name__}") from None
    if type(req) is not tuple or not req:
        raise FrameError("a request is a msgpack array [id, op, args...]")
    rid = req[0]
    if type(rid) is not int or rid < 0:
        raise FrameError(f"the request id must be a non-negative integer, got {describe(rid)}")
    return req


def op_of(req: tuple[Any, ...]) -> str:
    """The op name of a decoded request, with its arity checked."""
    if len(req) < 2:
        raise BadRequest("a request is [id, op, args...]: the op is missing")
    op = req[1]
    if type(op) is not str:
        raise BadRequest(f"op must be a string, got {describe(op)}")
    arity = OPS.get(op)
    if arity is None:
        raise UnknownOp(f"unknown op {op[:40]!r}; ops are {', '.join(OPS)}")
    if len(req) != arity + 2:
        raise BadRequest(f"{op} takes {ARG_NAMES[op]}, got {len(req) - 2}")
    return op


def check_layout() -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """How a check travels around its ids, for the socket server's check in C
    (sidecar/shm/_native.c `FastCheck`), which matches and writes these bytes and owns none
    of them: (the request's array header, its op, the response's array header, the status and
    result of a False answer, of a True one). The ids are msgpack's shortest uints."""
    packer = msgpack.Packer(use_bin_type=True)
    return (
        packer.pack_array_header(OPS["check"] + 2),
        _pack("check"),
        packer.pack_array_header(3),
        _pack(OK) + _pack(False),
        _pack(OK) + _pack(True),
    )


def batch_packed_layout() -> tuple[bytes, bytes, bytes, bytes]:
    """How a `batch_packed` travels around its arguments, for the socket server's batch in C
    (sidecar/shm/_native.c `FastBatch`), which matches and writes these bytes and owns none of
    them: (the request's array header, its op, the response's array header, the OK status).
    The arguments and the answers' bin are msgpack's own encodings."""
    packer = msgpack.Packer(use_bin_type=True)
    return (
        packer.pack_array_header(OPS["batch_packed"] + 2),
        _pack("batch_packed"),
        packer.pack_array_header(3),
        _pack(OK),
    )


def oversize_message(length: int, limit: int) -> str:
    return f"frame of {length} bytes is over the limit of {limit} bytes; closing the connection"


# -- responses -----------------------------------------------------------------------------


def encode_response(rid: int | None, status: int, result: Any) -> bytes:
    """One framed response. A result that cannot be encoded becomes an internal error."""
    try:
        body = _pack([rid, status, result])
    except Exception:  # a value msgpack cannot represent: never a broken frame on the wire
        body = _pack([rid, INTERNAL_ERROR, "internal error: unencodable result"])
    return _header_pack(len(body)) + body


def decode_response(body: bytes | bytearray | memoryview) -> list[Any]:
    """`[id, status, result]` of one response frame body; ResponseError when it is not one."""
    try:
        resp = _unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ResponseError(f"undecodable response: {exc}") from None
    if type(resp) is not list or len(resp) != 3:
        raise ResponseError(f"malformed response: {resp!r}"[:200])
    return resp

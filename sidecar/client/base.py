"""What both clients share (httpx's shared base client is the model): the errors, the typed
results, and each op's request encoding and result decoding. `SidecarClient` and
`AsyncSidecarClient` add only the I/O; the wire format is sidecar/protocol.py's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlencode

from ..expr.results import Count
from ..ids import MAX_WAIT_MS
from ..packed import pack_batch, pack_users, unpack_answers
from ..protocol import (
    BAD_REQUEST,
    DEFAULT_MAX_FRAME,
    INTERNAL_ERROR,
    OK,
    UNKNOWN_OP,
    EncodeError,
    encode_request,
)

#: Users for the packed ops: ints, or a uint64 array (`array('Q')`, numpy) taken as it is.
Users = Iterable[int] | Any
#: One segment id for every user, or one per user.
Segments = str | Sequence[str]

DEFAULT_PATH = os.environ.get("SEG_UDS") or "/tmp/seg-sidecar/sidecar.sock"
#: The sidecar's HTTP address, for the audience export (the socket protocol has no export).
DEFAULT_HTTP = os.environ.get("SEG_HTTP") or "127.0.0.1:8571"
#: The server's default frame limit; a larger request is refused before it is sent.
MAX_FRAME = DEFAULT_MAX_FRAME


class SidecarError(Exception):
    """Any failure of a sidecar request."""


class BadRequestError(SidecarError):
    """Status 1: the server rejected the request (the message says which part)."""


class UnknownOpError(SidecarError):
    """Status 2: the server does not have this op."""


class ServerError(SidecarError):
    """Status 3 (internal error), or a response that breaks the protocol."""


class NotLocalError(BadRequestError):
    """HTTP 409: a count or an audience names segments the sidecar does not hold locally and
    fresh; `segments` lists them."""

    def __init__(self, message: str, segments: Sequence[str]) -> None:
        super().__init__(message)
        self.segments = list(segments)


class SidecarTimeout(SidecarError, TimeoutError):
    """No response within the timeout."""


class SidecarUnavailable(SidecarError, ConnectionError):
    """The socket cannot be reached (not running, wrong path, permissions) or broke twice."""


_STATUS_ERRORS: dict[int, type[SidecarError]] = {
    BAD_REQUEST: BadRequestError,
    UNKNOWN_OP: UnknownOpError,
    INTERNAL_ERROR: ServerError,
}


@dataclass(frozen=True, slots=True)
class Explain:
    member: bool | None
    source: str  # "local" | "aerospike" | "none"
    version: int | None
    age_ms: int | None
    reason: str | None = None  # why it was not answered locally (None when it was)
    #: a member of a TTL segment: when its membership expires (ms since the epoch), from the
    #: replica's expiry index or, answered by Aerospike, the stored value
    expires_at: int | None = None


def error_for(status: object, message: object) -> SidecarError:
    """The SidecarError of a response with a status other than OK."""
    cls = _STATUS_ERRORS.get(status) if type(status) is int else None  # type: ignore[call-overload]
    if cls is None:
        return ServerError(f"unexpected response status {status!r}: {message!r}")
    return cls(str(message))


def value_of(resp: list[Any]) -> Any:
    """The result of a response, or its SidecarError raised."""
    if resp[1] == OK:
        return resp[2]
    raise error_for(resp[1], resp[2])


# -- each op's encoding and decoding ---------------------------------------------------------


class Call(NamedTuple):
    """One request as the clients send it: the op, its arguments, and what turns the raw
    result into the typed one (None: the result as it is)."""

    op: str
    args: tuple[Any, ...]
    decode: Callable[[Any], Any] | None = None
    #: seconds the server may hold the answer back on purpose (check_at's wait), added to
    #: the client's timeout for this request
    wait: float = 0.0


def explain_result(result: Any) -> Any:
    if isinstance(result, dict):
        return Explain(
            result.get("member"),
            result.get("source", "none"),
            result.get("version"),
            result.get("age_ms"),
            result.get("reason"),
            result.get("expires_at"),
        )
    return result


def packed_result(answers: Any, raw: bool = False) -> list[bool | None] | bytes:
    """The typed result of `batch_packed`; ServerError when it is not answer bytes."""
    if type(answers) is not bytes or (raw and answers.translate(None, b"\x00\x01\x02")):
        raise ServerError(f"malformed batch_packed result: {answers!r}"[:200])
    try:
        return answers if raw else unpack_answers(answers)
    except ValueError as exc:
        raise ServerError(str(exc)) from None


def _packed_raw(answers: Any) -> list[bool | None] | bytes:
    return packed_result(answers, True)


def check_at(user: int, segment: str, min_version: int, wait_ms: int) -> Call:
    """Read-your-publish: the answer from state at `min_version` or later (what publish()
    returned), waiting up to `wait_ms` (0..1000) for it; None when it has not landed and the
    fallback's stored version does not qualify. Arguments are checked by the server."""
    wait = wait_ms / 1000 if type(wait_ms) is int and 0 < wait_ms <= MAX_WAIT_MS else 0.0
    return Call("check_at", (user, segment, min_version, wait_ms), None, wait)


def check_many(user: int, segments: Sequence[str]) -> Call:
    return Call("check_many", (user, list(segments)))


def batch(pairs: Iterable[tuple[int, str] | Sequence[Any]]) -> Call:
    """`pairs` of (user, segment); a list or tuple is sent as it is (no copy)."""
    return Call("batch", (pairs if isinstance(pairs, list | tuple) else list(pairs),))


def batch_packed(users: Users, segments: Segments, raw: bool) -> Call:
    """BadRequestError for bad input, before anything is sent."""
    try:
        args = pack_batch(users, segments)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    return Call("batch_packed", tuple(args), _packed_raw if raw else packed_result)


def explain(user: int, segment: str) -> Call:
    return Call("explain", (user, segment), explain_result)


def eval_many(users: Users, expr: str, raw: bool) -> Call:
    """`users` as `batch_packed` takes them; BadRequestError for bad input before sending."""
    try:
        packed = pack_users(users)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    return Call("eval_many", (packed, expr), _packed_raw if raw else packed_result)


def count_result(result: Any) -> Any:
    if isinstance(result, dict) and "count" in result:
        return Count(result["count"], result.get("versions") or {})
    raise ServerError(f"malformed count result: {result!r}"[:200])


def count(expr: str) -> Call:
    return Call("count", (expr,), count_result)


def shm_info_result(result: Any) -> dict[str, Any] | None:
    """Where the sidecar publishes its shared replica (`{layout, dir, index, instance}`), or
    None when it does not (docs/SHARED_REPLICA.md)."""
    if result is None or (isinstance(result, dict) and "index" in result):
        return result
    raise ServerError(f"malformed shm_info result: {result!r}"[:200])


def shm_info() -> Call:
    return Call("shm_info", (), shm_info_result)


#: How a pipeline types the result of each op given as `(op, *args)`.
PIPELINE_DECODERS: dict[str, Callable[[Any], Any]] = {
    "explain": explain_result,
    "count": count_result,
    "shm_info": shm_info_result,
}


def typed(op: str, resp: list[Any]) -> Any:
    """A pipelined response: its typed result, or the SidecarError of that request."""
    if resp[1] != OK:
        return error_for(resp[1], resp[2])
    decode = PIPELINE_DECODERS.get(op)
    return decode(resp[2]) if decode is not None else resp[2]


# -- the audience export (HTTP) --------------------------------------------------------------


def audience_target(expr: str, after: int | None, limit: int | None) -> str:
    """The request target of `GET /v1/audience`."""
    query: dict[str, Any] = {"expr": expr}
    if after is not None:
        query["after"] = after
    if limit is not None:
        query["limit"] = limit
    return "/v1/audience?" + urlencode(query)


def http_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `http://HOST:PORT`) as (host, port); BadRequestError otherwise."""
    text = address.removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise BadRequestError(f"the sidecar's HTTP address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def http_failure(status: int, body: bytes) -> SidecarError:
    """The SidecarError of an HTTP error response (`{"error", ...}`)."""
    try:
        doc = json.loads(body)
        message = str(doc["error"])
    except (ValueError, TypeError, KeyError):
        doc, message = {}, body[:200].decode("utf-8", "replace")
    if status == 409:
        return NotLocalError(message, doc.get("segments") or [])
    if status == 400:
        return BadRequestError(message)
    return ServerError(f"HTTP {status}: {message}")


class Export:
    """An audience being streamed: `versions` and `count` (the whole audience's size, not
    just this page) from the response headers; iterate it for the ids, ascending."""

    def __init__(self, headers: Any) -> None:
        try:
            self.versions: dict[str, int] = json.loads(headers.get("Seg-Versions") or "{}")
            self.count = int(headers.get("Seg-Count") or 0)
        except ValueError as exc:
            raise ServerError(f"malformed audience headers: {exc}") from None
        self._rest = b""

    def _ids(self, data: bytes, end: bool = False) -> list[int]:
        """The ids of the complete lines in `data` (after what an earlier call left)."""
        data = self._rest + data
        cut = len(data) if end else data.rfind(b"\n") + 1
        self._rest = data[cut:]
        try:
            return [int(line) for line in data[:cut].split()]
        except ValueError:
            raise ServerError("malformed audience line") from None


# -- the shared client state ----------------------------------------------------------------


class BaseClient:
    """Settings, request ids and request framing of both clients."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        timeout: float = 1.0,
        *,
        max_frame: int = MAX_FRAME,
        http: str = DEFAULT_HTTP,
    ) -> None:
        self.path = os.fspath(path)
        #: where the audience export goes: the sidecar's HTTP server, HOST:PORT
        self.http = http
        self.timeout = timeout
        self.max_frame = max_frame
        self._id = 0
        self._init_io()

    def _init_io(self) -> None:
        """The client's own connection state."""

    def _next_id(self) -> int:
        self._id = rid = (self._id + 1) & 0xFFFFFFFF
        return rid

    def _frame(self, rid: int, op: str, args: Sequence[Any], what: str = "") -> bytes:
        """One framed request; BadRequestError when it cannot be sent (`what` names it in a
        pipeline)."""
        try:
            return encode_request(rid, op, args, self.max_frame)
        except EncodeError as exc:
            raise BadRequestError(f"{what}{exc}") from None

    def _frames(self, requests: Sequence[Sequence[Any]]) -> tuple[bytes, list[int]]:
        """The frames of many requests `(op, *args)` in one payload, and their ids."""
        ids = []
        frames = []
        many = len(requests) > 1
        for i, req in enumerate(requests):
            rid = self._next_id()
            frames.append(self._frame(rid, req[0], req[1:], f"request {i}: " if many else ""))
            ids.append(rid)
        return b"".join(frames), ids

"""The packed batch (op `batch_packed`): many checks in three compact arguments, so that neither
side builds or walks an object per check. Shared by the clients (encode) and the server
(decode); the only module that knows this layout.

Request `[id, "batch_packed", segments, users, index]`:

- `segments`: an array of up to 65,536 segment ids (empty only when `users` is);
- `users`: bin, n user ids as little-endian unsigned 64-bit integers (8n bytes);
- `index`: bin, n little-endian unsigned 16-bit integers; item i asks whether `users[i]` is in
  `segments[index[i]]`. It may be empty (0 bytes) when `segments` holds exactly one id: every
  user is then checked against it.

Result: bin of n bytes in request order, each `0` (not a member), `1` (member) or `2` (unknown:
neither the replica nor the fallback could answer).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, cast

from .ids import BadRequest
from .shm import native_or_none

NOT_MEMBER = 0
MEMBER = 1
UNKNOWN = 2
MAX_SEGMENTS = 1 << 16
#: answer byte -> the value the other ops use
ANSWERS: tuple[bool | None, ...] = (False, True, None)
_LITTLE = sys.byteorder == "little"
_U64_FORMATS = frozenset(("Q", "L", "<Q", "<L", "=Q", "=L", "@Q", "@L"))
_NATIVE = native_or_none()
#: the C extension's whole-buffer packing and unpacking (`_native.pack_u64`, `pack_index`,
#: `answers`), each None without it (`native_or_none`): the Python code below then does
#: all of it. The C calls return None for anything but the plain case (a list or tuple of
#: ints in range, of str), which the Python code then packs or reports, so the errors have
#: one owner.
_pack_u64: Any = None if _NATIVE is None else _NATIVE.pack_u64
_pack_index: Any = None if _NATIVE is None else _NATIVE.pack_index
_answers: Any = None if _NATIVE is None else _NATIVE.answers


def _native_u64(buf: Any) -> memoryview | None:
    """`buf` as a flat memoryview of native unsigned 64-bit integers, when it is one (an
    `array('Q')`, a numpy uint64 array, ...), else None."""
    try:
        view = memoryview(buf)
    except TypeError:
        return None
    if view.itemsize == 8 and view.format in _U64_FORMATS and view.c_contiguous:
        return view.cast("B").cast("Q") if view.ndim != 1 else view
    return None


def pack_users(users: Iterable[int] | Any) -> bytes:
    """User ids as the `users` argument. Accepts any iterable of ints, and uint64 buffers
    (`array('Q')`, numpy uint64) without converting them element by element. ValueError for
    an id that is not an unsigned 64-bit integer."""
    if _pack_u64 is not None:
        packed_c = _pack_u64(users)
        if packed_c is not None:
            return packed_c  # type: ignore[no-any-return]
    view = _native_u64(users)
    if view is not None:
        if _LITTLE:
            return view.tobytes()
        packed = array("Q", view.tobytes())
    else:
        if isinstance(users, str | bytes | bytearray | memoryview):
            raise ValueError("users must be integers (or a uint64 array), not a string or bytes")
        try:
            packed = array("Q", users if isinstance(users, list | tuple) else list(users))
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"every user must be an unsigned 64-bit integer: {exc}") from None
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def pack_batch(
    users: Iterable[int] | Any, segments: str | Sequence[str]
) -> tuple[list[str], bytes, bytes]:
    """The (segments, users, index) arguments of `batch_packed`. `segments` is one segment id
    for every user, or a sequence with one segment id per user."""
    packed = pack_users(users)
    if isinstance(segments, str):
        return [segments], packed, b""
    n = len(packed) // 8
    if len(segments) != n:
        raise ValueError(f"{n} users but {len(segments)} segments: give one segment per user")
    if _pack_index is not None:
        found = _pack_index(segments, MAX_SEGMENTS)
        if found is not None:
            return found[0], packed, found[1]
    try:
        distinct = list(set(segments))  # any order: the index says which is which
    except TypeError:
        raise ValueError("segments must be strings") from None
    if len(distinct) > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS:,} distinct segments per request")
    position = {s: i for i, s in enumerate(distinct)}
    return distinct, packed, struct.pack(f"<{n}H", *map(position.__getitem__, segments))


def unpack_answers(data: bytes) -> list[bool | None]:
    """The result as [True / False / None, ...]."""
    if _answers is not None and type(data) is bytes:
        return _answers(data)  # type: ignore[no-any-return]
    try:
        return [ANSWERS[b] for b in data]
    except (IndexError, TypeError):
        raise ValueError("malformed batch_packed result") from None


def packed_length(segments: object, users: object, index: object) -> int:
    """The number of checks, once the arguments' shapes are valid; BadRequest says what is
    wrong. What the index refers to is not checked (`unpack_request` does)."""
    if type(segments) is not list and type(segments) is not tuple:
        raise BadRequest(f"segments must be an array of segment ids, got {_kind(segments)}")
    if len(segments) > MAX_SEGMENTS:
        raise BadRequest(f"segments holds {len(segments):,} ids; at most {MAX_SEGMENTS:,}")
    n = _users_length(users)
    if type(index) is not bytes:
        raise BadRequest(f"index must be bin (little-endian uint16), got {_kind(index)}")
    if n and not segments:
        raise BadRequest("segments is empty: it must hold the segment ids the index refers to")
    if not index:
        if len(segments) != 1 and n:
            raise BadRequest(
                f"index is empty but segments holds {len(segments)} ids: "
                "an empty index needs exactly one segment"
            )
    elif len(index) != 2 * n:
        raise BadRequest(f"index must be 2 bytes per user: {n} users, {len(index)} bytes")
    return n


def unpack_request(
    segments: object, users: object, index: object
) -> tuple[Sequence[Any], Sequence[int], Sequence[int] | None]:
    """Validate the arguments (`packed_length`, and what the index refers to): (segments,
    user ids, segment index per user or None when every user goes with the one segment).
    Segment ids themselves are checked by the caller. BadRequest says what is wrong."""
    packed_length(segments, users, index)
    segs = cast(Sequence[Any], segments)
    ids = _little_endian(cast(bytes, users), "Q")
    if not index:
        return segs, ids, None
    positions = _little_endian(cast(bytes, index), "H")
    if max(positions) >= len(segs):
        raise BadRequest(
            f"index refers to segment {max(positions)}, but segments holds {len(segs)} ids"
        )
    return segs, ids, positions


def unpack_users(users: object) -> Sequence[int]:
    """The `users` argument (bin of little-endian uint64 ids) as ints; BadRequest says what
    is wrong. Also the users of `eval_many`."""
    _users_length(users)
    return _little_endian(cast(bytes, users), "Q")


def _users_length(users: object) -> int:
    """The number of ids in the `users` argument; BadRequest when it is not one."""
    if type(users) is not bytes:
        raise BadRequest(f"users must be bin (little-endian uint64 ids), got {_kind(users)}")
    if len(users) % 8:
        raise BadRequest(f"users must be 8 bytes per user id, got {len(users)} bytes")
    return len(users) // 8


def _little_endian(data: bytes, code: str) -> Sequence[int]:
    """`data` as little-endian unsigned integers of array type `code` ("Q" or "H")."""
    if _LITTLE:
        return memoryview(data).cast(code)
    out = array(code, data)
    out.byteswap()
    return out


def _kind(value: object) -> str:
    return "nil" if value is None else type(value).__name__

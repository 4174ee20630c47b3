"""The query layer shared by the Unix-socket and HTTP servers (DESIGN.md "Replica
semantics").

A segment that `Replica.local` answers (present, fresh, replica ready) is answered locally,
and that answer is authoritative: a local "not a member" never goes to the fallback.
Everything else (a segment unknown locally or dropped, stale, diverged, not held because of
`--segments`, or a replica that is not ready yet) is asked of the fallback, with one
`segments_of(user)` call per user per request shared by every item of that request. When the
fallback cannot answer, the answer is unknown: member None, source "none".

Every op has one result shape, `(value, source)`: the value the op answers (what the socket
sends) and where it came from, "local", "aerospike" or "none" (the worst of its items for a
multi-item op). Two entry points per op: `q.check(...)` returns the result when no fallback
call is needed and otherwise a coroutine (not yet scheduled) returning it, so only requests
that need the fallback pay for a coroutine or a task; `await settle(q.check(...))` is the
awaited form. Metrics labels are the servers' business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ..fallback.base import Fallback, FallbackMap, NoFallback
from ..ids import (
    MAX_USER,
    BadRequest,
    SegmentNames,
    segment_id,
    user_id,
    version_arg,
    wait_ms_arg,
)
from ..packed import UNKNOWN as UNKNOWN_BYTE
from ..packed import packed_length, unpack_request
from ..protocol import VERSION
from ..replica.forms import batch_lookup
from ..replica.state import BEHIND, SegmentState
from .expressions import ExpressionQueries
from .results import AEROSPIKE, LOCAL, NONE, Deferred, Result

if TYPE_CHECKING:
    from ..replica.runner import Replica
    from .metrics import Metrics

log = logging.getLogger(__name__)

_UNSEEN: Any = object()
_PAIR_TYPES = frozenset((tuple, list))


class Queries(ExpressionQueries):
    def __init__(
        self,
        replica: Replica,
        fallback: Fallback | None = None,
        *,
        metrics: Metrics | None = None,
        fallback_timeout: float = 0.25,
        fallback_concurrency: int = 64,
    ) -> None:
        self.replica = replica
        self.fallback = fallback if fallback is not None else NoFallback()
        # None when no fallback is configured: unknown answers are then synchronous.
        self._fb: Fallback | None = None if isinstance(self.fallback, NoFallback) else fallback
        self._local = replica.local
        self.names = SegmentNames()
        self._valid_names = self.names.valid
        self.metrics = metrics
        self.fallback_timeout = fallback_timeout
        self._fallback_concurrency = fallback_concurrency
        self._sem: asyncio.Semaphore | None = None
        #: `_native.lookup`, or None without the C extension (`batch_packed` then loops)
        self._lookup = batch_lookup()
        #: `_native.LocalCheck.members_of` (or None): `_bitmaps` for names already validated
        local = replica.native_local
        self._members_of = None if local is None else local.members_of

    @property
    def has_fallback(self) -> bool:
        return self._fb is not None

    def _bitmap(self, segment: str) -> Any:
        """The bitmap answering `segment` locally, or None."""
        st = self._local(segment)
        return st.bitmap if type(st) is SegmentState else None

    def _bitmaps(self, segments: Sequence[object]) -> list[Any]:
        """Validate `segments[i]` each; the bitmap answering each locally, or None."""
        members_of = self._members_of
        if members_of is not None:  # `Replica.local`'s rule in C, when every name is known
            found = members_of(segments, self._valid_names)
            if found is not None:
                return found  # type: ignore[no-any-return]
        names = self.names
        valid = self._valid_names
        bitmap = self._bitmap
        out: list[Any] = []
        for i, seg in enumerate(segments):
            if type(seg) is not str or seg not in valid:
                names.check(seg, f"segments[{i}]")
            out.append(bitmap(seg))
        return out

    # -- the fallback ---------------------------------------------------------------------------
    async def ask(self, user: int) -> dict[str, int] | None:
        """The fallback's segment map of `user`, or None when it cannot answer. Never raises,
        never waits longer than `fallback_timeout`."""
        fb = self._fb
        if fb is None:
            return None
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._fallback_concurrency)
        started = time.perf_counter()
        result: dict[str, int] | None
        try:
            async with self._sem, asyncio.timeout(self.fallback_timeout):
                result = await fb.segments_of(user)
            if result is not None and not isinstance(result, dict):
                log.error("fallback %s returned %s, not a map", fb.name, type(result).__name__)
                result = None
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.warning("fallback %s did not answer within %.3f s", fb.name, self.fallback_timeout)
            result = None
        except Exception:
            log.exception("fallback %s failed", fb.name)
            result = None
        if self.metrics is not None:
            self.metrics.fallback_call(result is not None, time.perf_counter() - started)
        return result

    async def _ask_many(self, users: list[int]) -> dict[int, dict[str, int] | None]:
        if len(users) == 1:
            return {users[0]: await self.ask(users[0])}
        maps = await asyncio.gather(*(self.ask(u) for u in users))
        return dict(zip(users, maps, strict=True))

    # -- check --------------------------------------------------------------------------------
    def check(self, user: object, segment: object) -> Result | Deferred:
        """Membership of `user` in `segment`: True / False / None (unknown)."""
        if type(user) is not int or user < 0 or user > MAX_USER:
            user_id(user)
        if type(segment) is not str or segment not in self._valid_names:
            self.names.check(segment)
        st = self._local(segment)  # type: ignore[arg-type]
        if type(st) is SegmentState:
            return user in st.bitmap, LOCAL
        if self._fb is None:
            return None, NONE
        return self._check_fallback(user, segment)  # type: ignore[arg-type]

    async def _check_fallback(self, user: int, segment: str) -> Result:
        m = await self.ask(user)
        if m is None:
            return None, NONE
        return segment in m, AEROSPIKE

    # -- check_at: read-your-publish (DESIGN.md "Freshness") ---------------------------------
    def check_at(
        self,
        user: object,
        segment: object,
        min_version: object,
        wait_ms: object,
        *,
        versioned: bool = False,
    ) -> Result | Deferred:
        """`check` answered from state at `min_version` or later: the local state once it
        gets there (waiting at most `wait_ms` for the replica thread to wake it), else the
        fallback when its stored version qualifies (`qualifies`), else unknown. The value is
        the member, or with `versioned` (member, the answering version or None)."""
        user = user_id(user)
        segment = self.names.check(segment)
        min_version = version_arg(min_version, "min_version")
        wait_ms = wait_ms_arg(wait_ms)
        st = self.replica.at_version(segment, min_version)
        if type(st) is SegmentState:
            return _at(user in st.bitmap, st.version, versioned), LOCAL
        if st == BEHIND and wait_ms:
            return self._check_at_waiting(user, segment, min_version, wait_ms, versioned)
        if self._fb is None:
            return _at(None, None, versioned), NONE
        return self._check_at_fallback(user, segment, min_version, versioned)

    async def _check_at_waiting(
        self, user: int, segment: str, min_version: int, wait_ms: int, versioned: bool
    ) -> Result:
        st = await self.replica.wait_version(segment, min_version, wait_ms / 1000)
        if type(st) is SegmentState:
            return _at(user in st.bitmap, st.version, versioned), LOCAL
        if self._fb is None:
            return _at(None, None, versioned), NONE
        return await self._check_at_fallback(user, segment, min_version, versioned)

    async def _check_at_fallback(
        self, user: int, segment: str, min_version: int, versioned: bool
    ) -> Result:
        version = qualifies(await self.ask(user), segment, min_version)
        if version is None:
            return _at(None, None, versioned), NONE
        return _at(True, version, versioned), AEROSPIKE

    # -- check_many and batch -------------------------------------------------------------------
    def check_many(self, user: object, segments: object) -> Result | Deferred:
        user = user_id(user)
        if type(segments) is not list and type(segments) is not tuple:
            raise BadRequest(
                f"segments must be a list of segment ids, got {type(segments).__name__}"
            )
        out: list[bool | None] = []
        missing: list[int] = []
        for i, bm in enumerate(self._bitmaps(segments)):
            if bm is not None:
                out.append(user in bm)
            else:
                out.append(None)
                missing.append(i)
        if not missing:
            return out, LOCAL
        if self._fb is None:
            return out, NONE
        return self._check_many_fallback(user, segments, out, missing)

    async def _check_many_fallback(
        self, user: int, segments: Sequence[str], out: list[bool | None], missing: list[int]
    ) -> Result:
        m = await self.ask(user)
        if m is None:
            return out, NONE
        for i in missing:
            out[i] = segments[i] in m
        return out, AEROSPIKE

    def _scan_batch(self, pairs: object) -> tuple[Any, list[bool | None], list[int]]:
        """Validate `[[user, segment], ...]` and answer what is local. Returns the pairs, the
        members (None where not answered) and the indexes that need the fallback. The loop is
        the hot path of a batch: no per-item index or message; a bad item sends the whole
        request through `_batch_error`, which finds it and says which."""
        if type(pairs) is not list and type(pairs) is not tuple:
            raise BadRequest(
                f"batch takes a list of [user, segment] pairs, got {type(pairs).__name__}"
            )
        names = self.names
        valid = self._valid_names
        bitmap_of = self._bitmap
        seen: dict[str, Any] = {}  # segment -> its bitmap for this request, or None
        out: list[bool | None] = []
        append = out.append
        missing: list[int] = []
        try:
            for item in pairs:
                user, seg = item  # not a pair: ValueError / TypeError
                bitmap = seen.get(seg, _UNSEEN)  # unhashable segment: TypeError
                if bitmap is _UNSEEN:
                    if type(seg) is not str or seg not in valid:
                        names.check(seg, f"batch item {len(out)} segment")
                    bitmap = seen[seg] = bitmap_of(seg)
                if type(user) is not int or user < 0 or user > MAX_USER:
                    raise _batch_error(pairs)
                if bitmap is None:
                    missing.append(len(out))
                    append(None)
                else:
                    append(user in bitmap)
        except BadRequest:
            raise
        except (TypeError, ValueError):
            raise _batch_error(pairs) from None
        # A 2-key map also unpacks into two values: items must really be arrays.
        if not _PAIR_TYPES.issuperset(map(type, pairs)):
            raise _batch_error(pairs)
        return pairs, out, missing

    def batch(self, pairs: object, *, sources: bool = False) -> Result | Deferred:
        """Members of `[[user, segment], ...]`; with `sources`, `[(member, source), ...]`."""
        items, out, missing = self._scan_batch(pairs)
        if not missing or self._fb is None:
            source = NONE if missing else LOCAL
            if sources:
                return [(m, LOCAL if m is not None else NONE) for m in out], source
            return out, source
        return self._batch_fallback(items, out, missing, sources)

    async def _batch_fallback(
        self, pairs: Sequence[Any], out: list[bool | None], missing: list[int], sources: bool
    ) -> Result:
        maps = await self._ask_many(list({pairs[i][0] for i in missing}))
        source = AEROSPIKE
        answered = set()
        for i in missing:
            user, seg = pairs[i]
            m = maps[user]
            if m is None:
                source = NONE
            else:
                out[i] = seg in m
                answered.add(i)
        if not sources:
            return out, source
        by_item = [
            (m, AEROSPIKE if i in answered else LOCAL if m is not None else NONE)
            for i, m in enumerate(out)
        ]
        return by_item, source

    def batch_packed(self, segments: object, users: object, index: object) -> Result | Deferred:
        """The `batch_packed` op (sidecar/packed.py): one answer byte per user. Which segments
        answer locally is `_bitmaps`' (`Replica.local`'s) rule; the lookups themselves are one
        C call over the members in either form (`forms.batch_lookup`) when it is built."""
        lookup = self._lookup
        if lookup is None:
            return self._batch_packed_python(segments, users, index)
        n = packed_length(segments, users, index)
        segs = cast(Sequence[str], segments)
        try:
            bitmaps = self._bitmaps(segs)
        except BadRequest:
            unpack_request(segments, users, index)  # a bad index is reported first, as ever
            raise
        if not n:
            return b"", LOCAL
        try:
            answers = lookup(bitmaps, users, index, UNKNOWN_BYTE)
        except IndexError:
            unpack_request(segments, users, index)  # raises the BadRequest naming it
            raise
        if None not in bitmaps or UNKNOWN_BYTE not in answers:
            return answers, LOCAL
        if self._fb is None:
            return answers, NONE
        _, ids, positions = unpack_request(segs, users, index)
        out = bytearray(answers)
        missing = [k for k, b in enumerate(out) if b == UNKNOWN_BYTE]
        return self._batch_packed_fallback(segs, ids, positions, out, missing)

    def _batch_packed_python(
        self, segments: object, users: object, index: object
    ) -> Result | Deferred:
        """`batch_packed` without the C extension: a Python pass over the items."""
        segs, ids, positions = unpack_request(segments, users, index)
        bitmaps = self._bitmaps(segs)
        if not ids:
            return b"", LOCAL
        if None not in bitmaps:  # all local: one pass, no per-item branch
            if positions is None:
                bm = bitmaps[0]
                return bytes([u in bm for u in ids]), LOCAL
            return bytes([u in bitmaps[p] for u, p in zip(ids, positions, strict=True)]), LOCAL
        out = bytearray(len(ids))
        missing: list[int] = []
        for k, u in enumerate(ids):
            bm = bitmaps[positions[k] if positions is not None else 0]
            if bm is None:
                out[k] = UNKNOWN_BYTE
                missing.append(k)
            elif u in bm:
                out[k] = 1
        if not missing:
            return bytes(out), LOCAL
        if self._fb is None:
            return bytes(out), NONE
        return self._batch_packed_fallback(segs, ids, positions, out, missing)

    async def _batch_packed_fallback(
        self,
        segs: Sequence[str],
        ids: Sequence[int],
        positions: Sequence[int] | None,
        out: bytearray,
        missing: list[int],
    ) -> Result:
        maps = await self._ask_many(list({ids[k] for k in missing}))
        source = AEROSPIKE
        for k in missing:
            m = maps[ids[k]]
            if m is None:
                source = NONE
            else:
                out[k] = segs[positions[k] if positions is not None else 0] in m
        return bytes(out), source

    # -- segments of a user ---------------------------------------------------------------------
    def segments(self, user: object) -> Result | Deferred:
        """The sorted segments of `user`; the source is "none" when part of the answer should
        have come from a fallback that could not answer (or is not configured)."""
        user = user_id(user)
        found, fresh, complete = self.replica.memberships_of(user)
        if complete:
            return found, LOCAL
        if self._fb is None:
            return found, NONE
        return self._segments_fallback(user, found, fresh, self.replica.ready)

    async def _segments_fallback(
        self, user: int, found: list[str], fresh: set[str], ready: bool
    ) -> Result:
        m = await self.ask(user)
        if m is None:  # best effort: what this replica holds
            return found, NONE
        if not ready:  # the replica answers for nothing yet
            return sorted(m), AEROSPIKE
        return sorted(set(found).union(s for s in m if s not in fresh)), AEROSPIKE

    # -- explain and status -----------------------------------------------------------------------
    def explain(self, user: object, segment: object) -> Result | Deferred:
        """The check with its version, the segment's age, a TTL membership's expiry and why
        it was not answered locally: {"member", "source", "version", "age_ms", "expires_at",
        "reason"}."""
        user = user_id(user)
        segment = self.names.check(segment)
        st = self._local(segment)
        if type(st) is SegmentState:
            member = user in st.bitmap
            doc = {
                "member": member,
                "source": LOCAL,
                "version": st.version,
                "age_ms": max(0, int(time.time() * 1000) - st.updated_ms),
                "expires_at": self.replica.expires_at(segment, user) if member else None,
                "reason": None,
            }
            return doc, LOCAL
        if self._fb is None:
            return _explained(None, NONE, None, st), NONE
        return self._explain_fallback(user, segment, st)

    async def _explain_fallback(self, user: int, segment: str, reason: str) -> Result:
        m = await self.ask(user)
        if m is None:
            return _explained(None, NONE, None, reason), NONE
        version = m.get(segment)
        member = segment in m
        doc = _explained(member, AEROSPIKE, version if type(version) is int else None, reason)
        if isinstance(m, FallbackMap):
            doc["expires_at"] = m.expires_at.get(segment)
        return doc, AEROSPIKE

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.replica.status()
        st["fallback"] = self.fallback.status()
        st["protocol"] = VERSION
        if self.metrics is not None:
            st["requests"] = self.metrics.request_counts()
        return st


def _at(member: bool | None, version: int | None, versioned: bool) -> Any:
    return (member, version) if versioned else member


def qualifies(m: dict[str, Any] | None, segment: str, min_version: int) -> int | None:
    """The fallback's stored version of `segment` in a user's map `m` when it answers at
    `min_version` or later, else None. A map value is the version of the publish that last
    wrote that membership, so only a membership written at `min_version` or later qualifies.
    A non-member never does: its absence carries no version (the user may have been removed
    by a publish before or after `min_version`), so a read-your-publish check answers it only
    from a replica that has the version."""
    if m is None:
        return None
    version = m.get(segment)
    if type(version) is int and version >= min_version:
        return version
    return None


def _batch_error(pairs: Any) -> BadRequest:
    """The BadRequest naming the first bad item of a batch."""
    for i, item in enumerate(pairs):
        if type(item) not in (list, tuple) or len(item) != 2:
            return BadRequest(f"batch item {i} must be a [user, segment] pair")
        try:
            user_id(item[0], f"batch item {i} user")
            segment_id(item[1], f"batch item {i} segment")
        except BadRequest as exc:
            return exc
    return BadRequest("malformed batch")


def _explained(
    member: bool | None, source: str, version: int | None, reason: str
) -> dict[str, Any]:
    return {
        "member": member,
        "source": source,
        "version": version,
        "age_ms": None,
        "expires_at": None,
        "reason": reason,
    }

"""The query service shared by the Unix-socket and HTTP servers (DESIGN.md "Replica
semantics").

A segment that is present and fresh on a ready replica is answered locally, and that answer
is authoritative: a local "not a member" never goes to the fallback. Everything else (a
segment unknown locally or dropped, stale, diverged, not held because of `--segments`, or a
replica that is not ready yet) is asked of the fallback, with one `segments_of(user)` call per
user per request shared by every item of that request. When the fallback cannot answer, the
answer is unknown: member None, source "none".

Speed: the local path is plain synchronous code. The `*_fast` methods return the result
directly when no fallback is needed and a coroutine (not yet scheduled) otherwise, so only
requests that really need the fallback pay for a coroutine or a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..fallback.base import Fallback, NoFallback
from ..ids import MAX_USER, BadRequest, segment_id
from ..packed import UNKNOWN as UNKNOWN_BYTE
from ..packed import unpack_request
from ..replica.state import Health, SegmentState
from .metrics import OK_KEYS
from .protocol import SegmentNames, user_arg

if TYPE_CHECKING:
    from ..replica.runner import Replica
    from .metrics import Metrics

log = logging.getLogger(__name__)

LOCAL = "local"
AEROSPIKE = "aerospike"
NONE = "none"

_FRESH = Health.FRESH
_K_LOCAL = OK_KEYS[LOCAL]
_K_NONE = OK_KEYS[NONE]
_UNSEEN: Any = object()
_PAIR_TYPES = frozenset((tuple, list))


class Answer(NamedTuple):
    """One check: member True/False/None (unknown), where the answer came from, the version of
    the segment that answered (None when unknown or not a member per the fallback)."""

    member: bool | None
    source: str
    version: int | None


UNKNOWN = Answer(None, NONE, None)

#: A coroutine the caller awaits when the fallback is needed; it returns (result, source).
Deferred = Coroutine[Any, Any, tuple[Any, str]]


def _retry(fn: Any, attempts: int = 5) -> Any:
    """Call `fn`, retrying when another thread changed a dict it iterates (the replica thread
    inserts segments while the event loop reads)."""
    for _ in range(attempts - 1):
        try:
            return fn()
        except RuntimeError:
            continue
    return fn()


class Service:
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
        self._engine = replica.engine
        self._ready_event = replica.ready
        #: True once `is_ready()` has seen the replica ready: a plain attribute for hot paths
        self.ready_seen = False
        self.names = SegmentNames()
        self._valid_names = self.names.valid
        self.metrics = metrics
        self.fallback_timeout = fallback_timeout
        self._fallback_concurrency = fallback_concurrency
        self._sem: asyncio.Semaphore | None = None

    @property
    def has_fallback(self) -> bool:
        return self._fb is not None

    # -- readiness and local state ------------------------------------------------------------
    def is_ready(self) -> bool:
        if self.ready_seen:
            return True
        if self._ready_event.is_set():  # the replica never goes back to not ready
            self.ready_seen = True
        return self.ready_seen

    def local_state(self, segment: str) -> SegmentState | None:
        """The state that answers `segment` locally: present, fresh, replica ready."""
        st = self._engine.segments.get(segment)
        if st is None or st.health is not _FRESH or not (self.ready_seen or self.is_ready()):
            return None
        return st

    def why_not_local(self, segment: str) -> str | None:
        """Why `segment` is not answered locally (None when it is)."""
        if not self.is_ready():
            return "not_ready"
        if not self.replica.holds(segment):
            return "not_held"
        st = self._engine.segments.get(segment)
        if st is None:
            return "dropped" if segment in self._engine.dropped else "unknown"
        if st.health is not _FRESH:
            return st.health.value
        return None

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

    # -- check ------------------------------------------------------------------------------
    def member_fast(self, user: int, segment: str) -> bool | None | Deferred:
        """`user` and `segment` already validated. The membership, or a coroutine returning
        (membership, source) when the fallback is needed."""
        st = self._engine.segments.get(segment)
        if st is not None and st.health is _FRESH and (self.ready_seen or self.is_ready()):
            return user in st.bitmap
        if self._fb is None:
            return None
        return self._member_fallback(user, segment)

    def check_op(self, user: object, segment: object) -> tuple[bool | None, Any] | Deferred:
        """The Unix-socket `check` op, validation included, in as few steps as possible:
        (membership, metrics key) when answered now, else a coroutine returning (membership,
        source)."""
        if type(user) is not int or user < 0 or user > MAX_USER:
            user_arg(user)
        if type(segment) is not str or segment not in self._valid_names:
            self.names.check(segment)
        st = self._engine.segments.get(segment)
        if st is not None and st.health is _FRESH and self.ready_seen:
            return user in st.bitmap, _K_LOCAL
        r = self.member_fast(user, segment)  # type: ignore[arg-type]
        if r is None:
            return None, _K_NONE
        if r is True or r is False:
            return r, _K_LOCAL
        return r

    async def _member_fallback(self, user: int, segment: str) -> tuple[bool | None, str]:
        m = await self.ask(user)
        if m is None:
            return None, NONE
        return segment in m, AEROSPIKE

    def check_local(self, user: int, segment: str) -> Answer | None:
        """The answer when it needs no fallback call, else None."""
        st = self.local_state(segment)
        if st is not None:
            return Answer(user in st.bitmap, LOCAL, st.version)
        if self._fb is None:
            return UNKNOWN
        return None

    async def check(self, user: object, segment: object) -> Answer:
        """Validating check for any caller: (member, source, version)."""
        user = user_arg(user)
        segment = self.names.check(segment)
        answer = self.check_local(user, segment)
        if answer is not None:
            return answer
        return _from_map(await self.ask(user), segment)

    # -- check_many and batch ------------------------------------------------------------------
    def check_many_fast(self, user: object, segments: object) -> list[bool | None] | Deferred:
        user = user_arg(user)
        if type(segments) is not list and type(segments) is not tuple:
            raise BadRequest(
                f"segments must be a list of segment ids, got {type(segments).__name__}"
            )
        names = self.names
        ready = self.ready_seen or self.is_ready()
        table = self._engine.segments
        out: list[bool | None] = []
        missing: list[int] = []
        for i, seg in enumerate(segments):
            if type(seg) is not str or not names.is_valid(seg):
                names.check(seg, f"segments[{i}]")
            st = table.get(seg) if ready else None
            if st is not None and st.health is _FRESH:
                out.append(user in st.bitmap)
            else:
                out.append(None)
                missing.append(i)
        if not missing or self._fb is None:
            return out
        return self._check_many_fallback(user, segments, out, missing)

    async def _check_many_fallback(
        self, user: int, segments: list[str], out: list[bool | None], missing: list[int]
    ) -> tuple[list[bool | None], str]:
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
        table = self._engine.segments
        ready = self.ready_seen or self.is_ready()
        names = self.names
        seen: dict[str, Any] = {}  # segment -> its bitmap for this request, or None
        out: list[bool | None] = []
        append = out.append
        missing: list[int] = []
        try:
            for item in pairs:
                user, seg = item  # not a pair: ValueError / TypeError
                bitmap = seen.get(seg, _UNSEEN)  # unhashable segment: TypeError
                if bitmap is _UNSEEN:
                    if type(seg) is not str or not names.is_valid(seg):
                        names.check(seg, f"batch item {len(out)} segment")
                    st = table.get(seg) if ready else None
                    bitmap = st.bitmap if st is not None and st.health is _FRESH else None
                    seen[seg] = bitmap
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

    def batch_fast(self, pairs: object) -> list[bool | None] | Deferred:
        items, out, missing = self._scan_batch(pairs)
        if not missing or self._fb is None:
            return out
        return self._batch_fallback(items, out, missing)

    async def _batch_fallback(
        self, pairs: list[Any], out: list[bool | None], missing: list[int]
    ) -> tuple[list[bool | None], str]:
        users = list({pairs[i][0] for i in missing})
        maps = await self._ask_many(users)
        source = AEROSPIKE
        for i in missing:
            user, seg = pairs[i]
            m = maps[user]
            if m is None:
                source = NONE
            else:
                out[i] = seg in m
        return out, source

    def batch_packed_fast(self, segments: object, users: object, index: object) -> bytes | Deferred:
        """The `batch_packed` op (sidecar/packed.py): one answer byte per user, or a coroutine
        returning (answers, source) when the fallback is needed."""
        segs, ids, positions = unpack_request(segments, users, index)
        names = self.names
        ready = self.ready_seen or self.is_ready()
        table = self._engine.segments
        bitmaps: list[Any] = []
        for i, seg in enumerate(segs):
            if type(seg) is not str or not names.is_valid(seg):
                names.check(seg, f"segments[{i}]")
            st = table.get(seg) if ready else None
            bitmaps.append(st.bitmap if st is not None and st.health is _FRESH else None)
        if not ids:
            return b""
        if None not in bitmaps:  # all local: one pass, no per-item branch
            if positions is None:
                bm = bitmaps[0]
                return bytes([u in bm for u in ids])
            return bytes([u in bitmaps[p] for u, p in zip(ids, positions, strict=True)])
        out = bytearray(len(ids))
        missing: list[int] = []
        for k, u in enumerate(ids):
            bm = bitmaps[positions[k] if positions is not None else 0]
            if bm is None:
                out[k] = UNKNOWN_BYTE
                missing.append(k)
            elif u in bm:
                out[k] = 1
        if not missing or self._fb is None:
            return bytes(out)
        return self._batch_packed_fallback(segs, ids, positions, out, missing)

    async def _batch_packed_fallback(
        self,
        segs: Sequence[str],
        ids: Sequence[int],
        positions: Sequence[int] | None,
        out: bytearray,
        missing: list[int],
    ) -> tuple[bytes, str]:
        maps = await self._ask_many(list({ids[k] for k in missing}))
        source = AEROSPIKE
        for k in missing:
            m = maps[ids[k]]
            if m is None:
                source = NONE
            else:
                out[k] = segs[positions[k] if positions is not None else 0] in m
        return bytes(out), source

    async def batch(self, pairs: object) -> list[tuple[bool | None, str]]:
        """Validating batch with the source of every answer: [(member, source), ...]."""
        items, out, missing = self._scan_batch(pairs)
        sources = [LOCAL if m is not None else NONE for m in out]
        if missing and self._fb is not None:
            users = list({items[i][0] for i in missing})
            maps = await self._ask_many(users)
            for i in missing:
                user, seg = items[i]
                m = maps[user]
                if m is not None:
                    out[i] = seg in m
                    sources[i] = AEROSPIKE
        return list(zip(out, sources, strict=True))

    # -- segments of a user ---------------------------------------------------------------------
    def _local_segments(self, user: int) -> tuple[list[str], set[str], bool]:
        """(fresh held segments containing user, all fresh held segments, any unhealthy)."""
        items = _retry(lambda: list(self._engine.segments.items()))
        found: list[str] = []
        fresh: set[str] = set()
        unhealthy = False
        for name, st in items:
            if st.health is _FRESH:
                fresh.add(name)
                if user in st.bitmap:
                    found.append(name)
            else:
                unhealthy = True
        return found, fresh, unhealthy

    def segments_fast(self, user: object) -> list[str] | Deferred:
        user = user_arg(user)
        found, fresh, unhealthy = self._local_segments(user)
        ready = self.is_ready()
        if self._fb is None or (ready and not self.replica.partial and not unhealthy):
            found.sort()
            return found
        return self._segments_fallback(user, found, fresh, ready)

    async def _segments_fallback(
        self, user: int, found: list[str], fresh: set[str], ready: bool
    ) -> tuple[list[str], str]:
        m = await self.ask(user)
        if m is None:  # best effort: what this replica holds
            found.sort()
            return found, NONE
        if not ready:  # the replica answers for nothing yet
            return sorted(m), AEROSPIKE
        return sorted(set(found).union(s for s in m if s not in fresh)), AEROSPIKE

    async def segments(self, user: object) -> tuple[list[str], bool]:
        """(sorted segments of user, complete): complete is False when part of the answer
        should have come from a fallback that could not answer (or is not configured)."""
        user = user_arg(user)
        found, fresh, unhealthy = self._local_segments(user)
        ready = self.is_ready()
        complete = ready and not self.replica.partial and not unhealthy
        if complete:
            found.sort()
            return found, True
        if self._fb is None:
            found.sort()
            return found, False
        result, source = await self._segments_fallback(user, found, fresh, ready)
        return result, source == AEROSPIKE

    # -- explain and status -----------------------------------------------------------------------
    def explain_fast(self, user: object, segment: object) -> dict[str, Any] | Deferred:
        user = user_arg(user)
        segment = self.names.check(segment)
        st = self.local_state(segment)
        if st is not None:
            return {
                "member": user in st.bitmap,
                "source": LOCAL,
                "version": st.version,
                "age_ms": max(0, int(time.time() * 1000) - st.updated_ms),
                "reason": None,
            }
        reason = self.why_not_local(segment)
        if self._fb is None:
            return _explained(UNKNOWN, reason)
        return self._explain_fallback(user, segment, reason)

    async def _explain_fallback(
        self, user: int, segment: str, reason: str | None
    ) -> tuple[dict[str, Any], str]:
        answer = _from_map(await self.ask(user), segment)
        return _explained(answer, reason), answer.source

    async def explain(self, user: object, segment: object) -> dict[str, Any]:
        r = self.explain_fast(user, segment)
        if isinstance(r, dict):
            return r
        result, _ = await r
        return result

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = _retry(self.replica.status)
        st["fallback"] = self.fallback.status()
        st["protocol"] = 1
        return st


def _batch_error(pairs: Any) -> BadRequest:
    """The BadRequest naming the first bad item of a batch."""
    for i, item in enumerate(pairs):
        if type(item) not in (list, tuple) or len(item) != 2:
            return BadRequest(f"batch item {i} must be a [user, segment] pair")
        try:
            user_arg(item[0], f"batch item {i} user")
            segment_id(item[1], f"batch item {i} segment")
        except BadRequest as exc:
            return exc
    return BadRequest("malformed batch")


def _from_map(m: dict[str, int] | None, segment: str) -> Answer:
    if m is None:
        return UNKNOWN
    version = m.get(segment)
    return Answer(segment in m, AEROSPIKE, version if type(version) is int else None)


def _explained(answer: Answer, reason: str | None) -> dict[str, Any]:
    return {
        "member": answer.member,
        "source": answer.source,
        "version": answer.version,
        "age_ms": None,
        "reason": reason,
    }

"""Segment expressions over one consistent view of a replica (DESIGN.md "Audiences: segment
expressions").

Deltas change engine bitmaps in place (sidecar/replica/engine.py), under `Engine.lock`. Every
function here reads the segments an expression names while holding that lock, so no publish
lands half-way through a read: each segment is seen at exactly one version, and the versions
returned are the ones the answer used. What is read under the lock is either a membership test
or a new bitmap computed from the engine's (an audience, or the engine's bitmaps restricted to
a request's users); the engine's own bitmaps never leave it. A segment in the compact form
(sidecar/replica/forms.py) answers membership tests as it is; for a count or an audience the
expression runs over ascending id arrays when compact members are most of what it reads
(sidecar/replica/sorted_ids.py: one merge pass in C per operation), else over BitMap64 with
the compact ones converted (O(n)); a request's users are tested one by one. The lock is held
for the roaring operations only: microseconds for one user, milliseconds for a count over
millions.

A segment is answered locally exactly when `check` would answer it locally (`Replica.local`);
the fallback is the query layer's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pyroaring import BitMap64

from ..expr import Audience, Count, Expr
from ..ids import BadRequest
from .forms import to_bitmap, within
from .sorted_ids import operands
from .state import SegmentState

if TYPE_CHECKING:
    from .runner import Replica

T = TypeVar("T")


class NotLocal(BadRequest):
    """A count or an audience that names segments this replica does not answer locally (HTTP
    409, socket status 1). `reasons`: segment -> why ("stale", "not_held", ...)."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = dict(sorted(reasons.items()))
        self.segments = list(self.reasons)
        shown = ", ".join(f"{s} ({why})" for s, why in self.reasons.items())
        super().__init__(
            "a count or an audience needs every segment held locally and fresh; "
            f"not answered locally: {shown}"
        )


@dataclass(slots=True)
class Leaves:
    """One user's local answers: `values[i]` for segment i of the expression (None where it
    is not answered locally), the indexes not answered locally, the local versions."""

    values: list[bool | None]
    missing: list[int]
    versions: dict[str, int]


@dataclass(slots=True)
class ManyLeaves:
    """Many users' local answers. When every segment is local, `answers` (one byte per user,
    0 / 1). Else the members and unknown users by local answers alone, and, for the unknown
    ones only, the local bitmaps restricted to them (None where not local)."""

    answers: bytes | None
    members: BitMap64
    unknown: BitMap64
    restricted: list[BitMap64 | None]
    missing: list[int]
    versions: dict[str, int]


def _states(replica: Replica, expr: Expr) -> list[SegmentState | str]:
    local = replica.local
    return [local(s) for s in expr.segments]


def _all_local(expr: Expr, states: list[SegmentState | str]) -> list[SegmentState]:
    reasons = {s: st for s, st in zip(expr.segments, states, strict=True) if type(st) is str}
    if reasons:
        raise NotLocal(reasons)
    return states  # type: ignore[return-value]


def count(replica: Replica, expr: Expr) -> Count:
    """How many users the (bounded) expression holds, and the versions counted."""
    return Count(*_whole(replica, expr, expr.count))


def audience(replica: Replica, expr: Expr) -> Audience:
    """The (bounded) expression's members as a new bitmap, and the versions used."""
    members, versions = _whole(replica, expr, expr.members)
    return Audience(to_bitmap(members), versions)  # the result is owned: outside the lock


def _whole(
    replica: Replica, expr: Expr, compute: Callable[[list[BitMap64]], T]
) -> tuple[T, dict[str, int]]:
    expr.require_bounded()
    with replica.engine.lock:
        states = _all_local(expr, _states(replica, expr))
        value = compute(operands([st.bitmap for st in states]))  # type: ignore[arg-type]
    return value, {s: st.version for s, st in zip(expr.segments, states, strict=True)}


def local_answers(replica: Replica, expr: Expr, user: int) -> Leaves:
    values: list[bool | None] = []
    missing: list[int] = []
    versions: dict[str, int] = {}
    with replica.engine.lock:
        for i, (segment, st) in enumerate(zip(expr.segments, _states(replica, expr), strict=True)):
            if type(st) is str:
                values.append(None)
                missing.append(i)
            else:
                values.append(user in st.bitmap)
                versions[segment] = st.version
    return Leaves(values, missing, versions)


def local_many(replica: Replica, expr: Expr, users: Sequence[int]) -> ManyLeaves:
    with replica.engine.lock:
        states = _states(replica, expr)
        bitmaps = [None if type(st) is str else st.bitmap for st in states]
        missing = [i for i, bm in enumerate(bitmaps) if bm is None]
        if not missing:
            answers = expr.members_of(bitmaps, users)  # type: ignore[arg-type]
            members = unknown = BitMap64()
            restricted: list[BitMap64 | None] = []
        else:
            answers = None
            asked = BitMap64(users)
            bitmaps = [None if bm is None else within(bm, asked) for bm in bitmaps]
            members, unknown = expr.evaluate_many(bitmaps, asked)
            restricted = [None if bm is None else bm & unknown for bm in bitmaps] if unknown else []
    versions = {
        s: st.version for s, st in zip(expr.segments, states, strict=True) if type(st) is not str
    }
    return ManyLeaves(answers, members, unknown, restricted, missing, versions)

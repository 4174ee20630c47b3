"""Set algebra over compact segments without building their BitMap64 (counts and audiences,
sidecar/replica/view.py).

A compact segment (forms.py) holds ids spread out, where a BitMap64 costs ~100 bytes and a
roaring insert per member: converting one per count took ~110-170 ms per million members. Its
`to_array()` is one pass in C (~3-8 ms per million), and so is each operation on ascending
id arrays (`_native.merge`). `operands` chooses, per expression, which algebra runs:
`SortedIds` when compact members are at least half of those it reads (8 bytes a member
while it runs), else BitMap64 with the compact ones converted (a large dense roaring segment
would cost more as an array than the compact ones as bitmaps).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from pyroaring import BitMap64

from .forms import Members, is_compact, to_bitmap

_EMPTY = array("Q")


def _merge() -> Any:
    from ..shm import native

    return native().merge


class SortedIds:
    """Distinct ids, ascending (`array('Q')`), with the part of BitMap64's interface an
    expression's set algebra uses (sidecar/expr/compiled.py); immutable: every operation
    returns a new one."""

    __slots__ = ("ids",)

    def __init__(self, ids: array[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __contains__(self, user: int) -> bool:
        from bisect import bisect_left

        i = bisect_left(self.ids, user)
        return i < len(self.ids) and self.ids[i] == user

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SortedIds) and self.ids == other.ids

    __hash__ = None  # type: ignore[assignment]

    def to_array(self) -> array[int]:
        return self.ids

    def copy(self) -> SortedIds:
        return SortedIds(array("Q", self.ids))

    def __or__(self, other: SortedIds) -> SortedIds:
        return SortedIds(_merge()(self.ids, other.ids, _EMPTY))

    def __sub__(self, other: SortedIds) -> SortedIds:
        return SortedIds(_merge()(self.ids, _EMPTY, other.ids))

    def __and__(self, other: SortedIds) -> SortedIds:
        merge = _merge()
        small, large = (self.ids, other.ids) if len(self) <= len(other) else (other.ids, self.ids)
        return SortedIds(merge(small, _EMPTY, merge(small, _EMPTY, large)))  # a - (a - b)

    @classmethod
    def union(cls, *sets: SortedIds) -> SortedIds:
        out = sets[0].copy()
        for more in sets[1:]:
            out = out | more
        return out

    @classmethod
    def intersection(cls, *sets: SortedIds) -> SortedIds:
        ordered = sorted(sets, key=len)
        out = ordered[0].copy()
        for more in ordered[1:]:
            out = out & more
        return out

    def union_cardinality(self, other: SortedIds) -> int:
        return len(self | other)

    def intersection_cardinality(self, other: SortedIds) -> int:
        return len(self & other)

    def difference_cardinality(self, other: SortedIds) -> int:
        return len(self - other)


def operands(members: Sequence[Members]) -> list[BitMap64] | list[SortedIds]:
    """One expression's segments in one algebra: as SortedIds when compact members are at
    least half of all, else as BitMap64 (roaring ones as they are, never to be changed)."""
    compact = sum(len(m) for m in members if is_compact(m))
    if compact and 2 * compact >= sum(len(m) for m in members):
        return [SortedIds(m.to_array()) for m in members]
    return [to_bitmap(m) for m in members]

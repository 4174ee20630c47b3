"""An audience in ascending order, a chunk at a time, for exports that must not build the
whole id list in memory."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from pyroaring import BitMap64

from ..ids import MAX_USER

CHUNK = 8192


def id_chunks(
    members: BitMap64, after: int | None = None, limit: int | None = None, size: int = CHUNK
) -> Iterator[array]:
    """The ids of `members` greater than `after`, at most `limit` of them, ascending, as
    uint64 arrays of at most `size` ids. `members` must not change while this runs."""
    start = 0 if after is None else members.rank(after)  # members <= after come first
    stop = len(members)
    if limit is not None:
        stop = min(stop, start + limit)
    top = members.max() == MAX_USER if stop else False
    for i in range(start, stop, size):
        j = min(i + size, stop)
        if top and j == len(members):
            # pyroaring 1.2 overflows slicing a dense run that ends at 2**64 - 1
            ids = members[i : j - 1].to_array() if j - 1 > i else array("Q")
            ids.append(MAX_USER)
            yield ids
        else:
            yield members[i:j].to_array()


def as_lines(ids: array) -> bytes:
    """One decimal id per line."""
    if not ids:
        return b""
    return ("\n".join(map(str, ids)) + "\n").encode("ascii")

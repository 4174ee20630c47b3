"""A segment's in-memory form, chosen by its shape (DESIGN.md "Performance targets": memory).

Two forms answer `x in members`, `len()`, iteration and `to_array()` alike:

- roaring (`pyroaring.BitMap64`), for dense and clustered ids: a delta changes it in place;
- compact: the shared replica's segment file format (sidecar/shm/_native.c, documented in
  docs/SHARED_REPLICA.md: Elias-Fano, sorted uint64 ids or flat containers of 16-bit low
  halves, whichever is smallest) in one bytes object, searched in place by `_native.Segment`.
  For ids spread out, where roaring gives every few members a container of their own and each
  costs ~100 bytes beside its payload (pyroaring 1.2's 64-bit index and container headers,
  measured in RSS): Elias-Fano takes about log2(range / n) + 2 bits a member, ~5.6 bytes for
  ids random over 2^64 (roaring: 112), ~1.6 over 2^32 (roaring: 4.7).

A form is chosen whenever a segment's members are installed or changed (`FormPolicy` has
the rule: compact for large segments of spread-out ids where it is clearly smaller, with
hysteresis). A compact segment is
immutable: a delta builds its successor by merging sorted arrays, O(n) per delta, where
roaring's in-place change is O(delta). Set algebra (counts, audiences) runs on id arrays
where compact segments dominate (sorted_ids.py), else converts a compact segment to a
BitMap64 on demand (`to_bitmap`); the socket's and the shared replica's checks only test
membership.
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
from dataclasses import dataclass
from typing import Any

from pyroaring import BitMap64

from ..shm import native_or_none

log = logging.getLogger(__name__)

#: Bytes roaring holds per container beside its payload (RSS of a fresh process holding
#: 1M one-member containers: 111.6 B each, payload 2 B; 2^32-spread ids: 99 B per container).
CONTAINER_OVERHEAD = 100
#: the form's name in checkpoints
COMPACT = "segment"

#: a segment's members in either form: BitMap64 or `_native.Segment` (the compact form)
Members = Any


@dataclass(frozen=True, slots=True)
class FormPolicy:
    """When a segment is held compact: at least `min_members`, spread out (on average at
    most `max_per_container` members per 2^16-id range, i.e. roaring's ~100-byte overhead per
    container matters), and smaller: at most `to_compact` of roaring's estimated bytes. A
    compact segment stays so while it has at most twice `max_per_container` members per
    range and costs at most `to_roaring` of roaring (the gap keeps a segment near the line
    from flipping on every delta). Clustered ids stay roaring even where Elias-Fano would be
    smaller (1 in 16: 0.8 against 2.2 bytes a member): their deltas then cost O(delta), not
    a rebuild."""

    min_members: int = 4096
    max_per_container: int = 128
    to_compact: float = 0.75
    to_roaring: float = 0.9

    def compact(self, n: int, containers: int, roaring: int, size: int, held: bool) -> bool:
        """Whether n members in `containers` 2^16 ranges, costing `roaring` bytes as roaring
        and `size` compact, are held compact (`held`: they are now)."""
        if n < self.min_members or not containers:
            return False
        if held:
            return (
                n <= 2 * self.max_per_container * containers and size <= self.to_roaring * roaring
            )
        return n <= self.max_per_container * containers and size <= self.to_compact * roaring


DEFAULT_POLICY = FormPolicy()


def _native() -> Any:
    return native_or_none()  # None: every segment stays roaring (it warns once, saying why)


def batch_lookup() -> Any:
    """`_native.lookup(members, users, index, unknown)`: a packed batch's answers over members
    of either form (or None: not answered here) in one C call; None without the C extension."""
    nat = _native()
    return None if nat is None else nat.lookup


def roaring_bytes(containers: int, payload: int) -> int:
    """Roaring's estimated memory for `containers` holding `payload` bytes."""
    return payload + containers * CONTAINER_OVERHEAD


def _compact_estimate(nat: Any, st: dict[str, int]) -> int:
    """The compact encoding's size from roaring's statistics, without listing the ids."""
    k, n = st["n_containers"], st["cardinality"]
    runs = min(2 * st["n_values_run_containers"], 8192 * st["n_run_containers"])
    containers = (
        64 + 20 * k + 2 * st["n_values_array_containers"] + 8192 * st["n_bitset_containers"] + runs
    )
    if n == 0:
        return containers
    return min(containers, 64 + 8 * n, nat.ef_size(n, st["min_value"], st["max_value"]))


def joined(bitmaps: list[BitMap64]) -> BitMap64:
    """The union of a snapshot's chunks, built in the first one: chunks are fresh from
    decoding and cover disjoint id ranges, so each later one is copied in once and nothing
    else is (`BitMap64.union` copies the first too: a second copy of every large segment
    at bootstrap)."""
    out = bitmaps[0]
    for more in bitmaps[1:]:
        out |= more
    return out


def is_compact(members: Members) -> bool:
    return type(members) is not BitMap64


def to_bitmap(members: Members) -> BitMap64:
    """`members` as a BitMap64: itself when roaring (do not change it), else a new one."""
    if type(members) is BitMap64:
        return members
    return BitMap64(members.to_array())


def within(members: Members, users: BitMap64) -> BitMap64:
    """A BitMap64 holding `members & users` for set algebra over a request's users: roaring
    as is (the caller intersects), a compact form by testing each user."""
    if type(members) is BitMap64:
        return members
    return BitMap64([u for u in users if u in members])


def nbytes(members: Members) -> int:
    """Bytes the members' data holds: roaring's container bytes (its index not counted), or
    the compact encoding's size."""
    if type(members) is not BitMap64:
        return int(members.size)
    return _payload(members.get_statistics())


def _payload(st: dict[str, int]) -> int:
    """Roaring's container bytes from its statistics."""
    return (
        st["n_bytes_array_containers"]
        + st["n_bytes_run_containers"]
        + st["n_bytes_bitset_containers"]
    )


def dump(members: Members) -> tuple[bytes, str | None]:
    """(bytes, form) for a checkpoint: roaring's portable serialization and None, or the
    compact encoding and COMPACT."""
    if type(members) is BitMap64:
        return members.serialize(), None
    return members.data, COMPACT


def load(data: bytes, form: str | None) -> Members:
    """What `dump` wrote; ValueError when it cannot be read here."""
    if form is None:
        return BitMap64.deserialize(data)
    if form != COMPACT:
        raise ValueError(f"unknown segment form {form!r}")
    nat = _native()
    if nat is None:
        raise ValueError("a compact segment needs the C extension, which is not built")
    return nat.Segment.frombytes(bytes(data))


class Forms:
    """Chooses forms by `policy`; with None every segment is roaring (the publisher, which
    diffs states, keeps roaring)."""

    def __init__(self, policy: FormPolicy | None = DEFAULT_POLICY) -> None:
        self.native = _native() if policy is not None else None
        self.policy = policy if self.native is not None else None

    def settle(self, members: Members, version: int) -> Members:
        """`members`, just installed or changed, in the form its shape calls for (the compact
        form's header carries `version`, as a shared replica file does)."""
        policy = self.policy
        if policy is None:
            return to_bitmap(members)
        if type(members) is not BitMap64 or len(members) < policy.min_members:
            return members
        st = members.get_statistics()
        n, k = st["cardinality"], st["n_containers"]
        roaring = roaring_bytes(k, _payload(st))
        if not policy.compact(n, k, roaring, _compact_estimate(self.native, st), False):
            return members
        ids = members.to_array()
        _containers, _bytes, size = self.native.shape(ids)
        if not policy.compact(n, k, roaring, size, False):
            return members
        return self.native.Segment.frombytes(self.native.encode(ids, version))

    # -- a snapshot's chunks, as they arrive (sidecar/replica/recovery.py) ---------------------
    def part(self, chunk: BitMap64) -> BitMap64 | array[int]:
        """A chunk's members as kept until its snapshot is whole: the sorted ids when the
        chunk's shape calls for the compact form, else the bitmap. Taking the ids at once
        means a sparse snapshot never becomes one huge BitMap64 (a ~100-byte container per
        member, whose freed memory the heap keeps in fragments)."""
        if self.policy is None:
            return chunk
        st = chunk.get_statistics()
        n, k = st["cardinality"], st["n_containers"]
        estimate = _compact_estimate(self.native, st)
        roaring = roaring_bytes(k, _payload(st))
        # judged as if large enough: the whole snapshot decides on `min_members`
        if n and not dataclasses.replace(self.policy, min_members=0).compact(
            n, k, roaring, estimate, False
        ):
            return chunk
        return chunk.to_array()

    def assemble(self, parts: list[BitMap64 | array[int]], version: int) -> Members:
        """A whole snapshot from its chunks' `part`s, in chunk order (chunks cover ascending
        id ranges: when every part is ids, they are concatenated, and checked ascending)."""
        if self.policy is not None and all(type(p) is array for p in parts):
            ids = array("Q")
            for p in parts:
                ids.extend(p)
            containers, payload, size = self.native.shape(ids)
            roaring = roaring_bytes(containers, payload)
            if self.policy.compact(len(ids), containers, roaring, size, False):
                try:
                    return self.native.Segment.frombytes(self.native.encode(ids, version))
                except ValueError:  # not ascending: chunks out of order
                    pass
            bitmap = BitMap64(ids)
            bitmap.run_optimize()
            return bitmap
        return joined([p if type(p) is BitMap64 else BitMap64(p) for p in parts])

    def apply(self, members: Members, add: BitMap64, remove: BitMap64, version: int) -> Members:
        """A compact segment's successor after a change: O(n), a merge of sorted arrays.
        Compact again unless its shape now favours roaring (hysteresis: `to_roaring`)."""
        nat = self.native
        assert nat is not None and self.policy is not None
        ids = nat.merge(members.to_array(), add.to_array(), remove.to_array())
        k, payload, size = nat.shape(ids)
        if self.policy.compact(len(ids), k, roaring_bytes(k, payload), size, True):
            return nat.Segment.frombytes(nat.encode(ids, version))
        bitmap = BitMap64(ids)
        bitmap.run_optimize()
        return bitmap

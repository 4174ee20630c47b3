"""Aerospike writes of a publish (DESIGN.md "Aerospike layout"; the layout itself is owned by
`sidecar.aerospike_layout`).

Adds are map puts, removes map remove-by-key, written with the key stored and a never-expire
TTL. A TTL segment's puts (its adds and re-affirmations) write `[version, expires_at_ms]`
(`aerospike_layout.map_value`); its memberships lapse by that value, not by record TTL.
Users whose operations are the same (the common case: one segment's adds) are written together
with `batch_operate`, in batches of `batch_size`, on a few threads. The groups are found with
array sorts when numpy is installed (the compute extra), else with bitmap algebra, never user
by user in Python.
A remove on a user with no record is a no-op (the server's code 2); a user whose map becomes
empty has its record deleted (a generation-checked delete, so a concurrent write wins). Rows
failing with a transient code are retried; a whole-batch error (such as over the server's
batch-max-requests) fails the publish in one line. Written before the log transaction
commits, and idempotent, so re-running a publish after a crash repairs both stores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import aerospike
from aerospike_helpers.batch.records import BatchRecords, Remove
from aerospike_helpers.operations import map_operations
from pyroaring import BitMap64

from sidecar.aerospike_layout import (
    DEFAULT_BATCH_SIZE,
    INDEX,
    POLICY_KEY_SEND,
    TTL_NEVER_EXPIRE,
    AerospikeTarget,
    map_value,
    user_key,
    user_of_key,
)

log = logging.getLogger(__name__)


_TRANSIENT = {
    -11,  # MAX_RETRIES_EXCEEDED
    -8,  # NO_MORE_CONNECTIONS / server not available
    -15,  # NO_RESPONSE: a batch row whose parent command timed out or lost its connection
    9,  # TIMEOUT
    11,  # PARTITION_UNAVAILABLE
    14,  # KEY_BUSY
    18,  # DEVICE_OVERLOAD
    22,  # FORBIDDEN (migrations)
}
_NOT_FOUND, _GENERATION = 2, 3
#: the client's "some rows failed" batch result: the rows say which
_ROWS_FAILED = -16
#: names of whole-batch codes worth spelling out (the server's, as the client reports them)
_BATCH_CODES = {
    151: "batch max requests exceeded: lower --aerospike-batch-size below the server's "
    "batch-max-requests",
    152: "batch max queued exceeded on the server",
    150: "batch is disabled on the server",
    4: "bad parameter",
    16: "unsupported feature",
}

# The parent command's policy carries the timeouts of batch_operate ("batch_write" is the
# per-row policy and has none; the default parent total timeout, 1 s, times out 5,000-row
# batches on a loaded server).
_POLICIES = {
    "batch_parent_write": {"total_timeout": 60_000, "socket_timeout": 30_000, "max_retries": 2},
    "batch_write": {"key": POLICY_KEY_SEND},
    "write": {"key": POLICY_KEY_SEND},
    "operate": {"key": POLICY_KEY_SEND},
    "scan": {"total_timeout": 0, "socket_timeout": 30_000},
    "query": {"total_timeout": 0, "socket_timeout": 30_000},
}


class AerospikeSinkError(RuntimeError):
    pass


class MapChange(Protocol):
    """What the sink needs of a change (publisher.plan.Change has it)."""

    segment: str
    version: int
    add: BitMap64
    remove: BitMap64
    #: a TTL segment's expiry of this publish's adds and re-affirmations (0: plain)
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A map operation: put `segment: version` (`[version, expires_at_ms]` for a TTL
    segment), or (version None) remove `segment`."""

    segment: str
    version: int | None
    expires_at_ms: int = 0


Signature = tuple[Entry, ...]


def _entries(changes: Iterable[MapChange]) -> list[tuple[Entry, BitMap64]]:
    """Every change's adds, then its removes: the operations, in the order rows apply them."""
    out = []
    for change in changes:
        if change.add:
            entry = Entry(change.segment, change.version, change.expires_at_ms)
            out.append((entry, change.add))
        if change.remove:
            out.append((Entry(change.segment, None), change.remove))
    return out


def group_users(changes: Iterable[MapChange]) -> list[tuple[Signature, Sequence[int]]]:
    """Partition the users the changes touch by the exact list of operations each needs;
    each group's users ascending. With numpy (the compute extra) it is sorting arrays;
    without it, refinement over bitmaps (`group_users_bitmaps`)."""
    entries = _entries(changes)
    try:
        import numpy as np
    except ImportError:
        return [(sig, m.to_array()) for sig, m in group_users_bitmaps(entries)]
    return _group_users_numpy(entries, np)


def _group_users_numpy(entries: list[tuple[Entry, BitMap64]], np: Any) -> list[Any]:
    """Each user's set of operations as a bit mask (one bit per entry, in words of 64): the
    users are the bitmaps' union, each entry sets its bit at its users' positions (a binary
    search), then users are grouped by equal masks with one sort. No Python per user, only
    per group."""
    if not entries:
        return []
    everyone = BitMap64.union(BitMap64(), *(users for _, users in entries))
    unique = np.frombuffer(everyone.to_array(), dtype=np.uint64)
    words = (len(entries) + 63) // 64
    masks = np.zeros((len(unique), words), dtype=np.uint64)
    for j, (_, users) in enumerate(entries):
        at = np.searchsorted(unique, np.frombuffer(users.to_array(), dtype=np.uint64))
        masks[at, j // 64] |= np.uint64(1 << (j % 64))
    if words == 1:
        order = np.argsort(masks[:, 0], kind="stable")  # users stay ascending within a mask
        ordered = masks[order, 0]
        changed = ordered[1:] != ordered[:-1]
    else:
        order = np.lexsort(masks.T[::-1])  # stable too
        ordered = masks[order]
        changed = (ordered[1:] != ordered[:-1]).any(axis=1)
    starts = np.concatenate(([0], np.flatnonzero(changed) + 1)).tolist()
    ends = [*starts[1:], len(order)]
    users_in_order = unique[order]
    out = []
    for start, end in zip(starts, ends, strict=True):
        mask = ordered[start].tolist()
        signature = []
        for w, bits in enumerate([mask] if words == 1 else mask):
            while bits:
                low = bits & -bits
                signature.append(entries[w * 64 + low.bit_length() - 1][0])
                bits ^= low
        out.append((tuple(signature), users_in_order[start:end]))
    return out


def group_users_bitmaps(
    entries: list[tuple[Entry, BitMap64]],
) -> list[tuple[Signature, BitMap64]]:
    """The same partition by refinement over bitmaps: each entry's users split every class
    they overlap into the part inside and the part outside. The union of the classes so far
    answers "does this bitmap touch any class" at once, and the scan of the classes stops once
    every overlapping user is placed, so disjoint segments cost one bitmap operation each."""
    classes: list[tuple[Signature, BitMap64]] = []
    union = BitMap64()
    for entry, users in entries:
        overlap = users & union
        if overlap:
            remaining = BitMap64(overlap)
            refined: list[tuple[Signature, BitMap64]] = []
            for i, (signature, members) in enumerate(classes):
                if not remaining:
                    refined.extend(classes[i:])
                    break
                inside = members & remaining
                if not inside:
                    refined.append((signature, members))
                    continue
                remaining -= inside
                outside = members - inside
                if outside:
                    refined.append((signature, outside))
                refined.append(((*signature, entry), inside))
            classes = refined
        fresh = users - overlap if overlap else users
        if fresh:
            classes.append(((entry,), BitMap64(fresh)))
            union |= fresh
    return classes


def _chunks(users: Sequence[int], size: int) -> Iterator[list[int]]:
    """Python ints (numpy's uint64 would not wrap to a signed key)."""
    tolist = getattr(users, "tolist", None)
    for i in range(0, len(users), size):
        part = users[i : i + size]
        yield part.tolist() if tolist is not None else list(part)


class AerospikeSink:
    def __init__(
        self,
        client: Any,
        target: AerospikeTarget,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 4,
        retries: int = 3,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.client = client
        self.target = target
        self.batch_size = batch_size
        self.threads = threads
        self.retries = retries

    @classmethod
    def connect(cls, target: AerospikeTarget | str, **kwargs: Any) -> AerospikeSink:
        """A sink on a connected client; `target` may be just `host:port[,...]`."""
        if isinstance(target, str):
            target = AerospikeTarget.at(target)
        try:
            client = target.connect(_POLICIES)
        except aerospike.exception.AerospikeError as exc:
            raise AerospikeSinkError(
                f"cannot connect to Aerospike at {target.describe()}: {exc}"
            ) from exc
        return cls(client, target, **kwargs)

    def close(self) -> None:
        self.client.close()

    # -- the secondary index and what it serves ---------------------------------------------

    def create_index(self, name: str = INDEX) -> None:
        """The mapkeys secondary index on the bin ("who is in segment S" from Aerospike)."""
        t = self.target
        with contextlib.suppress(aerospike.exception.IndexFoundError):
            self.client.index_map_keys_create(
                t.namespace, t.set_name, t.bin_name, aerospike.INDEX_STRING, name
            )

    def members(self, segment: str) -> Iterator[int]:
        """The users whose map holds `segment`, through the mapkeys index (needs
        `create_index`), in no particular order. Keys are stored, so each row names its user;
        a record written without its key (by an older publisher) is skipped and counted in
        `self.keyless`."""
        t = self.target
        query = self.client.query(t.namespace, t.set_name)
        query.select(t.bin_name)
        query.where(
            aerospike.predicates.contains(t.bin_name, aerospike.INDEX_TYPE_MAPKEYS, segment)
        )
        self.keyless = 0
        for (_, _, key, _), _meta, _bins in query.results():
            if key is None:
                self.keyless += 1
            else:
                yield user_of_key(key)

    def scan(self, callback: Callable[[Any, bytes, dict[Any, Any] | None], None]) -> None:
        """Stream every record of the set: callback(user id or None when the key is not
        stored, digest, the map or None)."""
        t = self.target
        query = self.client.query(t.namespace, t.set_name)
        query.select(t.bin_name)

        def each(record: Any) -> None:
            (_, _, key, digest), _meta, bins = record
            value = (bins or {}).get(t.bin_name)
            callback(None if key is None else user_of_key(key), bytes(digest), value)

        query.foreach(each)

    # -- writes -------------------------------------------------------------------------------

    def operations(self, signature: Signature) -> tuple[list[Any], bool]:
        """The map operations of a signature, and whether a record can end up empty (then the
        last operation reads the map's size)."""
        bin_name = self.target.bin_name
        puts = [
            map_operations.map_put(bin_name, e.segment, map_value(e.version, e.expires_at_ms))
            for e in signature
            if e.version is not None
        ]
        removes = [
            map_operations.map_remove_by_key(bin_name, e.segment, aerospike.MAP_RETURN_NONE)
            for e in signature
            if e.version is None
        ]
        if removes and not puts:
            return [*removes, map_operations.map_size(bin_name)], True
        return puts + removes, False

    def _batch(self, keys: list[tuple[Any, ...]], ops: list[Any]) -> Any:
        return self.client.batch_operate(keys, ops, None, None, TTL_NEVER_EXPIRE)

    def _write(
        self, signature: Signature, users: Sequence[int], emptied: list[tuple[tuple[Any, ...], int]]
    ) -> int:
        """One batch of users sharing a signature; records left empty go to `emptied`."""
        ops, may_empty = self.operations(signature)
        ns, set_name, bin_name = self.target.namespace, self.target.set_name, self.target.bin_name
        pending = [(ns, set_name, user_key(u)) for u in users]
        for attempt in range(self.retries + 1):
            try:
                result = self._batch(pending, ops)
            except aerospike.exception.AerospikeError as exc:
                if attempt == self.retries:
                    raise AerospikeSinkError(f"batch_operate failed: {exc}") from exc
                time.sleep(0.05 * 2**attempt)
                continue
            if result.result not in (0, _ROWS_FAILED):
                self._batch_failed(result.result, len(pending), attempt)
                time.sleep(0.05 * 2**attempt)
                continue
            failed = []
            for rec in result.batch_records:
                code = rec.result
                if code == 0:
                    if may_empty and rec.record[2].get(bin_name) == 0:
                        emptied.append((rec.key[:3], rec.record[1]["gen"]))
                    continue
                if code == _NOT_FOUND and may_empty:
                    continue  # only removes, and no record: nothing to remove
                if code in _TRANSIENT and attempt < self.retries:
                    failed.append(rec.key[:3])
                else:
                    raise AerospikeSinkError(
                        f"write of user {user_of_key(rec.key[2])} failed: code {code}"
                    )
            if not failed:
                return len(users)
            pending = failed
            time.sleep(0.05 * 2**attempt)
        raise AerospikeSinkError(f"{len(pending)} records still failing after retries")

    def _batch_failed(self, code: int, rows: int, attempt: int) -> None:
        """A whole-batch error: raise it (in one line) unless it is transient and retries
        remain."""
        if code in _TRANSIENT and attempt < self.retries:
            return
        reason = _BATCH_CODES.get(code, "")
        raise AerospikeSinkError(
            f"Aerospike refused a batch of {rows:,} records: code {code}"
            + (f" ({reason})" if reason else "")
        )

    def _delete_emptied(self, emptied: Sequence[tuple[tuple[Any, ...], int]]) -> int:
        """Delete records whose map became empty, each only if no write came since (the
        generation the emptying write returned)."""
        return self._remove(
            [
                Remove(key, policy={"gen": aerospike.POLICY_GEN_EQ, "generation": gen})
                for key, gen in emptied
            ]
        )

    def delete_records(self, records: Iterable[int | bytes]) -> int:
        """Delete records by user id, or by digest (a record without a stored key)."""
        t = self.target
        return self._remove(
            [
                Remove((t.namespace, t.set_name, None, r) if isinstance(r, bytes) else t.key(r))
                for r in records
            ]
        )

    def _remove(self, removes: list[Remove]) -> int:
        """Batched deletes; a record already gone, or written since (generation), is kept
        out of the count. Returns the number deleted."""
        deleted = 0
        for i in range(0, len(removes), self.batch_size):
            batch = BatchRecords(removes[i : i + self.batch_size])
            result = self.client.batch_write(batch)
            if result.result not in (0, _ROWS_FAILED):
                self._batch_failed(result.result, len(batch.batch_records), self.retries)
            for rec in result.batch_records:
                if rec.result == 0:
                    deleted += 1
                elif rec.result not in (_NOT_FOUND, _GENERATION):
                    raise AerospikeSinkError(f"delete of {rec.key[2]} failed: code {rec.result}")
        return deleted

    def apply(self, changes: Iterable[MapChange], progress: Callable[[int, int], None]) -> int:
        """Write the changes; returns the number of user records written."""
        jobs = [
            (signature, users)
            for signature, members in group_users(changes)
            for users in _chunks(members, self.batch_size)
        ]
        total = sum(len(users) for _, users in jobs)
        emptied: list[tuple[tuple[Any, ...], int]] = []
        lock = threading.Lock()

        def run(job: tuple[Signature, Sequence[int]]) -> int:
            mine: list[tuple[tuple[Any, ...], int]] = []
            written = self._write(job[0], job[1], mine)
            if mine:
                with lock:
                    emptied.extend(mine)
            return written

        done = 0
        with ThreadPoolExecutor(self.threads) as pool:
            for written in pool.map(run, jobs):
                done += written
                progress(done, total)
        self.deleted = self._delete_emptied(emptied)
        return done

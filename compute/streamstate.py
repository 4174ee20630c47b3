"""The stream job's per-user state, held in the driver as numpy arrays and saved as Parquet.

For each track (compute/rules.py) the state is every user's newest `depth` timestamps no older
than the track's horizon behind the clock: three aligned arrays sorted by (user asc, ts desc)
plus each row's rank within its user (0 = newest). Merging a micro-batch and evaluating the
rules are a few vectorized numpy passes.

Why the driver and not a Spark table: the publisher needs every streaming segment's full
membership in the driver anyway (it diffs BitMap64s), and the state is at most `depth` rows per
member-candidate, i.e. the same order of size. Spark does the part that grows with the event
rate (reading Kafka, parsing and validating JSON, selecting the events a track needs); keeping
the state out of Spark saves several Spark jobs per micro-batch, which is most of its latency.

User ids are unsigned 64-bit; they are held as int64 (two's complement for ids >= 2**63) and
viewed as uint64 when bitmaps are built.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyroaring import BitMap64

from compute.rules import StreamRule, TrackSpec

SCHEMA = pa.schema([("track", pa.string()), ("user_id", pa.int64()), ("ts", pa.int64())])
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TrackState:
    """Rows sorted by (user asc, ts desc); `rank` counts from 0 within each user."""

    users: np.ndarray
    ts: np.ndarray
    rank: np.ndarray

    @classmethod
    def empty(cls) -> TrackState:
        return cls(_EMPTY, _EMPTY, _EMPTY)

    @classmethod
    def build(cls, users: np.ndarray, ts: np.ndarray, depth: int) -> TrackState:
        """Sort, rank and keep each user's newest `depth` rows."""
        users = np.asarray(users, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        if len(users) == 0:
            return cls.empty()
        # Sort by user, then ts descending: lexsort's last key is the primary one; `~ts` is a
        # descending order for int64 without the overflow of `-ts`.
        order = np.lexsort((~ts, users))
        users, ts = users[order], ts[order]
        index = np.arange(len(users))
        starts = np.empty(len(users), dtype=bool)
        starts[0] = True
        np.not_equal(users[1:], users[:-1], out=starts[1:])
        rank = index - np.maximum.accumulate(np.where(starts, index, 0))
        keep = rank < depth
        return cls(users[keep], ts[keep], rank[keep])

    def __len__(self) -> int:
        return len(self.users)

    def nth(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, ts) of every user's n-th newest timestamp (n = 0: the newest)."""
        sel = self.rank == n
        return self.users[sel], self.ts[sel]


State = dict[str, TrackState]


def merge(
    state: Mapping[str, TrackState],
    new: Mapping[str, tuple[np.ndarray, np.ndarray]],
    specs: Iterable[TrackSpec],
    clock: int,
) -> State:
    """The state after adding `new` (track id -> users, ts) as of `clock`. Tracks that no spec
    names are dropped; a track without old state starts from its new rows."""
    out: State = {}
    for spec in specs:
        tid = spec.track.id
        old = state.get(tid, TrackState.empty())
        users, ts = new.get(tid, (_EMPTY, _EMPTY))
        all_users = np.concatenate([old.users, users])
        all_ts = np.concatenate([old.ts, ts])
        live = all_ts > clock - spec.horizon_ms
        out[tid] = TrackState.build(all_users[live], all_ts[live], spec.depth)
    return out


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each of `wanted`, (found, value) in the sorted unique `keys`."""
    if len(keys) == 0:
        return np.zeros(len(wanted), dtype=bool), np.zeros(len(wanted), dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[pos] == wanted
    return found, values[pos]


def members(state: Mapping[str, TrackState], rule: StreamRule, clock: int) -> np.ndarray:
    """The users (int64) in `rule`'s segment as of `clock`."""
    track = state.get(rule.track.id, TrackState.empty())
    users, kth = track.nth(rule.min_count - 1)
    users = users[kth > clock - rule.window_ms]
    if rule.unless_track is None or len(users) == 0:
        return users
    newest_users, newest_ts = track.nth(0)
    _, last = _lookup(newest_users, newest_ts, users)
    cancel = state.get(rule.unless_track.id, TrackState.empty())
    cancel_users, cancel_ts = cancel.nth(0)
    found, cancelled_at = _lookup(cancel_users, cancel_ts, users)
    return users[~found | (cancelled_at < last)]


def bitmap(users: np.ndarray) -> BitMap64:
    out = BitMap64()
    if len(users):
        out.update(array.array("Q", np.ascontiguousarray(users, dtype=np.int64).tobytes()))
    return out


def memberships(
    state: Mapping[str, TrackState], rules: Iterable[StreamRule], clock: int
) -> dict[str, BitMap64]:
    return {rule.name: bitmap(members(state, rule, clock)) for rule in rules}


def to_table(state: Mapping[str, TrackState]) -> pa.Table:
    parts = [
        pa.table(
            {
                "track": pa.array([tid] * len(ts), pa.string()),
                "user_id": pa.array(ts.users, pa.int64()),
                "ts": pa.array(ts.ts, pa.int64()),
            },
            schema=SCHEMA,
        )
        for tid, ts in sorted(state.items())
    ]
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def split_rows(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(track, user_id, ts) rows -> track id -> (users, ts)."""
    if table.num_rows == 0:
        return {}
    table = table.sort_by("track")
    tracks = table.column("track").to_numpy(zero_copy_only=False)
    users = table.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    ts = table.column("ts").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    cuts = np.flatnonzero(tracks[1:] != tracks[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(tracks)]
    return {str(tracks[a]): (users[a:b], ts[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)}


def from_table(table: pa.Table, specs: Iterable[TrackSpec]) -> State:
    """A saved state, re-ranked for the current specs (a deeper track keeps what it has)."""
    rows = split_rows(table)
    return {
        s.track.id: TrackState.build(*rows.get(s.track.id, (_EMPTY, _EMPTY)), s.depth)
        for s in specs
    }

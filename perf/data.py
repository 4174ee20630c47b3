"""Synthetic segments, deterministic from a seed, built fast enough for 100M memberships.

Users live in a 64-bit id space window that crosses 2**32 (so the 64-bit paths are used).
Segment sizes are log-uniform over a 100x range. Every other segment is the union of a few
arithmetic progressions `range(start, start + n * step, step)` (steps 1 to 64: roaring runs,
bitsets and arrays, like ids allotted in order); the others are members drawn uniformly at
random from a window of the space, at densities from 1/1000 to 1/3 (scattered users: roaring
arrays, the costlier case). Random ids use numpy when it is installed (the `compute` extra),
else the `random` module (slower, same distribution).
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from typing import Any

from pyroaring import BitMap64

#: Users live in [USER_BASE, USER_BASE + USER_SPAN): crosses 2**32.
USER_BASE = 3 * 2**31
USER_SPAN = 2**33
STEPS = (1, 1, 2, 3, 4, 7, 12, 24, 64)


def segment_name(i: int, prefix: str = "seg") -> str:
    return f"{prefix}-{i:05d}"


def sizes(n_segments: int, total: int, rng: random.Random, spread: float = 100.0) -> list[int]:
    """`n_segments` sizes summing to `total`, log-uniform over a `spread`x range."""
    raw = [spread ** rng.random() for _ in range(n_segments)]
    scale = total / sum(raw)
    out = [max(1, int(r * scale)) for r in raw]
    out[0] += total - sum(out)
    if out[0] < 1:  # tiny totals: spread evenly instead
        base, extra = divmod(total, n_segments)
        out = [base + (1 if i < extra else 0) for i in range(n_segments)]
    return out


def progression_bitmap(n: int, rng: random.Random, pieces: int = 3) -> BitMap64:
    """About `n` members as `pieces` arithmetic progressions (exactly `n` unless pieces
    overlap, which the random offsets make rare)."""
    bm = BitMap64()
    left = n
    for k in range(pieces):
        take = left if k == pieces - 1 else rng.randint(0, left)
        if take <= 0:
            continue
        step = rng.choice(STEPS)
        span = take * step
        start = USER_BASE + rng.randrange(max(1, USER_SPAN - span))
        bm |= BitMap64(range(start, start + span, step))
        left -= take
    return bm


def random_window_bitmap(n: int, rng: random.Random) -> BitMap64:
    """`n` members drawn uniformly from a window of the user space whose density is
    log-uniform in [1/1000, 1/3]: how a behavioural segment of scattered users looks."""
    density = 10 ** rng.uniform(-3, -0.5)
    window = min(USER_SPAN, max(n + 1, int(n / density)))
    start = USER_BASE + rng.randrange(max(1, USER_SPAN - window))
    return random_ids(n, start, start + window, rng.randrange(2**32))


def make_segments(
    n_segments: int, total: int, seed: int = 1, prefix: str = "seg"
) -> dict[str, BitMap64]:
    """Every other segment arithmetic progressions (ids allotted in order: compact runs,
    bitsets), the others scattered random members (roaring arrays): the mix real segment
    sets have."""
    rng = random.Random(seed)
    out = {}
    for i, n in enumerate(sizes(n_segments, total, rng)):
        make = progression_bitmap if i % 2 == 0 else random_window_bitmap
        out[segment_name(i, prefix)] = make(n, rng)
    return out


def memberships(segments: dict[str, BitMap64]) -> int:
    return sum(len(b) for b in segments.values())


def _numpy() -> Any:
    """numpy when installed (the `compute` extra brings it): random ids at C speed."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def random_ids(n: int, low: int, high: int, seed: int) -> BitMap64:
    """`n` distinct uniformly random ids in [low, high)."""
    np = _numpy()
    bm = BitMap64()
    if np is not None:
        gen = np.random.default_rng(seed)
        while len(bm) < n:
            need = n - len(bm)
            vals = gen.integers(low, high, size=need + need // 50 + 8, dtype=np.uint64)
            vals.sort()
            bm.update(array("Q", vals.tobytes()))
    else:
        rng = random.Random(seed)
        while len(bm) < n:
            need = n - len(bm)
            batch = [low + rng.randrange(high - low) for _ in range(need + need // 50 + 8)]
            batch.sort()
            bm.update(batch)
    if len(bm) > n:  # drop the largest extras in one range removal
        bm.remove_range(bm[n], bm.max() + 1)
    return bm


def random_members(bm: BitMap64, k: int, seed: int) -> BitMap64:
    """`k` members of `bm` drawn at random (without replacement)."""
    k = min(k, len(bm))
    np = _numpy()
    if np is not None:
        members = np.frombuffer(bm.to_array(), dtype=np.uint64)
        picked = np.random.default_rng(seed).choice(members, size=k, replace=False)
        picked.sort()
        out = BitMap64()
        out.update(array("Q", picked.tobytes()))
        return out
    rng = random.Random(seed)
    return BitMap64(sorted(bm[i] for i in rng.sample(range(len(bm)), k)))


def queries(
    segments: dict[str, BitMap64], n: int, seed: int, member_share: float = 0.5
) -> list[tuple[int, str]]:
    """`n` (user, segment) checks over `segments`: `member_share` of them members, the rest
    random users (almost all non-members)."""
    rng = random.Random(seed)
    names = sorted(segments)
    members: dict[str, Any] = {}  # segment -> its members as an array (O(1) picks)
    out: list[tuple[int, str]] = []
    for _ in range(n):
        seg = rng.choice(names)
        arr = members.get(seg)
        if arr is None:
            arr = members[seg] = segments[seg].to_array()
        if rng.random() < member_share and len(arr):
            user = arr[rng.randrange(len(arr))]
        else:
            user = USER_BASE + rng.randrange(USER_SPAN)
        out.append((user, seg))
    return out


def user_lists(
    segments: dict[str, BitMap64], n: int, size: int, seed: int, member_share: float = 0.5
) -> list[tuple[str, list[int]]]:
    """`n` (segment, `size` users) checks of many users against one segment each, as a
    notification service filters a recipient list: `member_share` of the users members."""
    rng = random.Random(seed)
    names = sorted(segments)
    members: dict[str, Any] = {}
    out: list[tuple[str, list[int]]] = []
    for _ in range(n):
        seg = rng.choice(names)
        arr = members.get(seg)
        if arr is None:
            arr = members[seg] = segments[seg].to_array()
        users = [
            arr[rng.randrange(len(arr))]
            if rng.random() < member_share and len(arr)
            else USER_BASE + rng.randrange(USER_SPAN)
            for _ in range(size)
        ]
        out.append((seg, users))
    return out


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


#: The `bootstrap` scenario's user base: ids allotted in order from USER_BASE (crosses 2**32).
POPULATION = 100_000_000


def population_segments(
    n_segments: int, total: int, users: int = POPULATION, seed: int = 1, prefix: str = "seg"
) -> dict[str, BitMap64]:
    """`n_segments` segments of one user base of `users` ids allotted in order, `total`
    memberships in all (sizes log-uniform over a 1000x range), in four shapes taking turns:
    sign-up cohorts (1-3 contiguous id ranges: roaring runs), 1-in-k samples (an arithmetic
    progression, k from 2 to 12: bitsets), behavioural bands (random members of a window of
    the base at densities 1/16 to 1/2: bitsets) and scattered members (random over the whole
    base, 1 in 100 to 1 in 100,000: arrays, the costly shape). Built from ranges and numpy,
    about 1B memberships a minute."""
    rng = random.Random(seed)
    out = {}
    for i, n in enumerate(sizes(n_segments, total, rng, spread=1000.0)):
        n = min(n, users)
        kind = i % 4
        if kind == 0:
            out[segment_name(i, prefix)] = _cohorts(n, users, rng)
        elif kind == 1:
            step = rng.randint(2, 12)
            n = min(n, users // step)
            start = USER_BASE + rng.randrange(users - n * step + 1)
            out[segment_name(i, prefix)] = BitMap64(range(start, start + n * step, step))
        else:
            density = 2 ** rng.uniform(-4, -1) if kind == 2 else n / users
            window = min(users * 31 // 32, max(n + 1, int(n / density)))  # room for the tail
            start = USER_BASE + rng.randrange(users - window - window // 32 + 1)
            out[segment_name(i, prefix)] = _spread(n, start, window, rng.randrange(2**32))
    return out


def _spread(n: int, start: int, window: int, seed: int) -> BitMap64:
    """`n` ids from `start` on at density about n / window, each gap to the next drawn
    geometric (a Bernoulli process: uniform positions, sorted and distinct without a sort);
    the last may pass the window by a few standard deviations."""
    np = _numpy()
    if np is None:
        return random_ids(n, start, start + window, seed)
    gaps = np.random.default_rng(seed).geometric(min(1.0, n / window), size=n)
    ids = np.cumsum(gaps, dtype=np.uint64)
    ids += np.uint64(start - 1)
    bm = BitMap64()
    bm.update(array("Q", ids.tobytes()))
    return bm


def _cohorts(n: int, users: int, rng: random.Random) -> BitMap64:
    bm = BitMap64()
    pieces = rng.randint(1, 3)
    while len(bm) < n:
        take = max(1, (n - len(bm)) // pieces)
        start = USER_BASE + rng.randrange(users - take + 1)
        bm.add_range(start, start + take)
        pieces = max(1, pieces - 1)
    if len(bm) > n:
        bm.remove_range(bm[n], bm.max() + 1)
    return bm

"""`seg-compute gen-data`: a synthetic, deterministic e-commerce data lake in Parquet.

Layout (hive-style partitions, one file per day per table):

    DIR/_lake.json                              the parameters and row counts
    DIR/users/part-00000.parquet ...            user_id, country, tier, signup_date
    DIR/orders/dt=YYYY-MM-DD/part-00000.parquet order_id, user_id, ts, amount, category
    DIR/events/dt=YYYY-MM-DD/part-00000.parquet user_id, ts, type, product_id, category

The lake covers the `days` days before `as_of` (as_of itself is "now": midnight UTC at the start
of that day, so no row has ts >= as_of). Activity per user is heavy-tailed (Pareto weights), a
share of users never buys, some users sign up inside the window and some stop being active.
Same parameters, same bytes: every random stream is seeded from (seed, table, chunk or day).

Users are generated in chunks and written as they go; orders and events are generated one day
at a time from a few small per-user arrays (about 20 bytes per user), so 10M users fit easily.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from compute.fsutil import atomic_directory, fsync_path

LAKE_MARKER = "_lake.json"
LAKE_FORMAT = 1
GENERATOR = "seg-compute gen-data"
DEFAULT_AS_OF = dt.date(2026, 11, 1)
DEFAULT_SEED = 42
DEFAULT_DAYS = 120
DEFAULT_ORDERS_PER_USER = 4.0
DEFAULT_EVENTS_PER_USER = 20.0
MAX_USERS = 1_000_000_000
USERS_CHUNK = 1_000_000

COUNTRIES = ("US", "DE", "GB", "FR", "IN", "BR", "JP", "ES", "IT", "NL",
             "PL", "SE", "CA", "AU", "MX", "KR", "TR", "AT", "CH", "BE")  # fmt: skip
TIERS = ("basic", "silver", "gold", "vip")
TIER_P = (0.78, 0.14, 0.06, 0.02)
CATEGORIES = ("electronics", "fashion", "home", "books", "beauty", "sports", "toys", "grocery")
EVENT_TYPES = ("view", "add_to_cart", "remove_from_cart")
EVENT_P = (0.82, 0.13, 0.05)
PRODUCTS_PER_CATEGORY = 100_000

# User ids: most are 10_000_000 + 7k (a sparse 32-bit-ish range); every 211th user gets an id
# above 2**40 and every 4999th (k % 4999 == 3) one above 2**62, so 64-bit ids always appear.
# The three ranges are disjoint and each mapping is injective, so ids are unique.
DENSE_BASE, DENSE_STRIDE = 10_000_000, 7
WIDE_BASE, WIDE_STRIDE, WIDE_EVERY = 2**40, 1_000_003, 211
TOP_BASE, TOP_EVERY, TOP_AT = 2**62, 4999, 3

SCHEMAS: dict[str, pa.Schema] = {
    "users": pa.schema([
        ("user_id", pa.int64()), ("country", pa.string()), ("tier", pa.string()),
        ("signup_date", pa.date32()),
    ]),
    "orders": pa.schema([
        ("order_id", pa.int64()), ("user_id", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")),
        ("amount", pa.decimal128(12, 2)), ("category", pa.string()),
    ]),
    "events": pa.schema([
        ("user_id", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")), ("type", pa.string()),
        ("product_id", pa.int64()), ("category", pa.string()),
    ]),
}  # fmt: skip

PARTITION_COLUMN = "dt"
PARTITIONED = frozenset({"orders", "events"})
_SPARK_TYPES = {
    pa.int64(): "BIGINT",
    pa.string(): "STRING",
    pa.date32(): "DATE",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP",
    pa.decimal128(12, 2): "DECIMAL(12,2)",
}

_DAY_US = 86_400 * 1_000_000
_EPOCH = dt.date(1970, 1, 1)
_STREAM_USERS, _STREAM_ORDERS, _STREAM_EVENTS = 1, 2, 3


@dataclass(frozen=True)
class LakeParams:
    users: int
    seed: int = DEFAULT_SEED
    days: int = DEFAULT_DAYS
    orders_per_user: float = DEFAULT_ORDERS_PER_USER
    events_per_user: float = DEFAULT_EVENTS_PER_USER
    as_of: dt.date = DEFAULT_AS_OF

    def __post_init__(self) -> None:
        if not 1 <= self.users <= MAX_USERS:
            raise ValueError(f"users must be in 1..{MAX_USERS}, got {self.users}")
        if not 1 <= self.days <= 3650:
            raise ValueError(f"days must be in 1..3650, got {self.days}")
        if not 0 <= self.orders_per_user <= 10_000:
            raise ValueError(f"orders-per-user must be in 0..10000, got {self.orders_per_user}")
        if not 0 <= self.events_per_user <= 100_000:
            raise ValueError(f"events-per-user must be in 0..100000, got {self.events_per_user}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")

    @property
    def start(self) -> dt.date:
        """The first day in the lake."""
        return self.as_of - dt.timedelta(days=self.days)


def user_ids(k: np.ndarray) -> np.ndarray:
    """The user id of the k-th user (k = 0, 1, ...): deterministic, unique, >= 0, < 2**63."""
    k = k.astype(np.int64)
    ids = DENSE_BASE + DENSE_STRIDE * k
    ids = np.where(k % WIDE_EVERY == 0, WIDE_BASE + WIDE_STRIDE * k, ids)
    return np.where(k % TOP_EVERY == TOP_AT, TOP_BASE + k, ids)


def _skewed(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


COUNTRY_P = _skewed(len(COUNTRIES), 1.1)
CATEGORY_P = _skewed(len(CATEGORIES), 0.8)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _labels(values: tuple[str, ...], idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(values, pa.string()), pa.array(idx.astype(np.int32)))


def _decimal_cents(cents: np.ndarray, precision: int = 12) -> pa.Array:
    """A decimal128(precision, 2) array from non-negative integer cents (exact, no floats)."""
    words = np.zeros((len(cents), 2), dtype=np.int64)
    words[:, 0] = cents
    return pa.Array.from_buffers(
        pa.decimal128(precision, 2), len(cents), [None, pa.py_buffer(words.tobytes())]
    )


@dataclass
class _UserState:
    """What day-by-day generation needs per user (index k)."""

    ids: np.ndarray  # int64
    first_day: np.ndarray  # int16, first active day index (0 = lake start)
    end_day: np.ndarray  # int16, first inactive day index
    order_rate: np.ndarray  # expected orders per active day (float32; a weight until scaled)
    event_rate: np.ndarray  # expected events per active day (float32; a weight until scaled)
    favorite: np.ndarray  # int8, favourite category


def _gen_users(
    p: LakeParams, lo: int, hi: int, chunk: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    rng = _rng(p.seed, _STREAM_USERS, chunk)
    n = hi - lo
    ids = user_ids(np.arange(lo, hi, dtype=np.int64))
    country = rng.choice(len(COUNTRIES), size=n, p=COUNTRY_P)
    tier = rng.choice(len(TIERS), size=n, p=TIER_P)
    # 15% signed up inside the window, the rest up to three years before it.
    new = rng.random(n) < 0.15
    signup = np.where(new, rng.integers(0, p.days, n), -rng.integers(1, 3 * 365 + 1, n)).astype(
        np.int64
    )
    first = np.maximum(signup, 0)
    # A quarter of users stop being active at some day inside the window.
    churned = rng.random(n) < 0.25
    stop = first + 1 + (rng.random(n) * (p.days - first)).astype(np.int64)
    end = np.where(churned, np.minimum(stop, p.days), p.days)
    # Heavy-tailed activity (Pareto, alpha 1.5, mean 3), capped; 30% of users never buy.
    weight = np.minimum(1.0 + rng.pareto(1.5, n), 200.0) / 3.0
    buyer = rng.random(n) >= 0.30
    vip_boost = np.where(tier == TIERS.index("vip"), 2.0, 1.0)
    order_weight = weight * buyer * vip_boost
    event_weight = weight * (0.5 + rng.random(n))
    favorite = rng.choice(len(CATEGORIES), size=n, p=CATEGORY_P)
    start_epoch = (p.start - _EPOCH).days
    table = pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "country": _labels(COUNTRIES, country),
            "tier": _labels(TIERS, tier),
            "signup_date": pa.array((start_epoch + signup).astype(np.int32), pa.date32()),
        },
        schema=SCHEMAS["users"],
    )
    state = {
        "ids": ids,
        "first_day": first.astype(np.int16),
        "end_day": end.astype(np.int16),
        "order_rate": order_weight,
        "event_rate": event_weight,
        "favorite": favorite.astype(np.int8),
    }
    return table, state


def _rates(users: _UserState, weight: np.ndarray, expected_total: float) -> np.ndarray:
    """Per-day rates proportional to `weight` whose expected total over the lake is given."""
    exposure = float(np.dot(weight, (users.end_day - users.first_day).astype(np.float64)))
    scale = expected_total / exposure if exposure > 0 else 0.0
    return (weight * scale).astype(np.float32)


def _pick(rng: np.random.Generator, rates: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Draw a Poisson number of events, each from a user chosen proportionally to its rate."""
    cum = np.cumsum(np.where(active, rates, 0.0), dtype=np.float64)
    total = float(cum[-1]) if len(cum) else 0.0
    if total <= 0.0:
        return np.empty(0, dtype=np.int64)
    n = int(rng.poisson(total))
    # Sorted queries make the binary searches cache-friendly; callers reorder by time.
    picks = np.searchsorted(cum, np.sort(rng.random(n)) * total, side="right")
    return np.minimum(picks, len(cum) - 1)


def _category(rng: np.random.Generator, favorite: np.ndarray, share: float) -> np.ndarray:
    n = len(favorite)
    other = rng.choice(len(CATEGORIES), size=n, p=CATEGORY_P)
    return np.where(rng.random(n) < share, favorite, other)


def _day_rows(
    p: LakeParams, day: int, stream: int, rate: np.ndarray, active: np.ndarray
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The rows of one day of a stream: its generator (to draw the rest of the columns),
    who (indexes into the users) and ts (microseconds), in time order."""
    rng = _rng(p.seed, stream, day)
    who = _pick(rng, rate, active)
    day_us = ((p.start - _EPOCH).days + day) * _DAY_US
    ts = day_us + rng.integers(0, _DAY_US, len(who))
    by_time = np.argsort(ts, kind="stable")
    return rng, who[by_time], ts[by_time]


def _gen_orders(
    p: LakeParams, day: int, users: _UserState, active: np.ndarray, first_order_id: int
) -> pa.Table:
    rng, who, ts = _day_rows(p, day, _STREAM_ORDERS, users.order_rate, active)
    n = len(who)
    cents = np.maximum(np.round(rng.lognormal(3.6, 0.8, n) * 100), 1).astype(np.int64)
    category = _category(rng, users.favorite[who], 0.5)
    return pa.table(
        {
            "order_id": pa.array(first_order_id + np.arange(n, dtype=np.int64), pa.int64()),
            "user_id": pa.array(users.ids[who], pa.int64()),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "amount": _decimal_cents(cents),
            "category": _labels(CATEGORIES, category),
        },
        schema=SCHEMAS["orders"],
    )


def _gen_events(p: LakeParams, day: int, users: _UserState, active: np.ndarray) -> pa.Table:
    rng, who, ts = _day_rows(p, day, _STREAM_EVENTS, users.event_rate, active)
    n = len(who)
    kind = rng.choice(len(EVENT_TYPES), size=n, p=EVENT_P)
    category = _category(rng, users.favorite[who], 0.6)
    rank = (rng.zipf(1.3, n) - 1) % PRODUCTS_PER_CATEGORY
    return pa.table(
        {
            "user_id": pa.array(users.ids[who], pa.int64()),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "type": _labels(EVENT_TYPES, kind),
            "product_id": pa.array(category * PRODUCTS_PER_CATEGORY + rank, pa.int64()),
            "category": _labels(CATEGORIES, category),
        },
        schema=SCHEMAS["events"],
    )


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")
    fsync_path(path)


class _Writer:
    """Writes Parquet files on a background thread (pyarrow releases the GIL) so encoding
    overlaps with generating the next day; at most `depth` tables wait in memory."""

    def __init__(self, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gen-data-write")
        self._pending: deque[Future[None]] = deque()
        self._depth = depth

    def submit(self, table: pa.Table, path: Path) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_write, table, path))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def generate(out: Path | str, params: LakeParams, progress: Progress | None = None) -> dict:
    """Write the lake to `out` (atomically replacing an earlier lake there); return _lake.json.

    `progress` receives one short line per finished chunk (default: stderr).
    """
    report = progress or _stderr_progress
    t0 = time.perf_counter()
    steps = -(-params.users // USERS_CHUNK) + params.days
    done = 0
    shown = -1

    def tick(what: str) -> None:
        nonlocal done, shown
        done += 1
        pct = 100 * done // steps
        if pct // 10 != shown // 10 or done == steps:
            shown = pct
            report(f"gen-data: {pct:3d}% {what} ({time.perf_counter() - t0:.1f} s)")

    with atomic_directory(Path(out), LAKE_MARKER, "data lake") as tmp:
        writer = _Writer()
        try:
            meta = _generate_into(tmp, params, writer, tick)
        finally:
            writer.close()
        (tmp / LAKE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _generate_into(
    tmp: Path, params: LakeParams, writer: _Writer, tick: Callable[[str], None]
) -> dict:
    parts: dict[str, list[np.ndarray]] = {}
    for chunk, lo in enumerate(range(0, params.users, USERS_CHUNK)):
        hi = min(lo + USERS_CHUNK, params.users)
        table, state = _gen_users(params, lo, hi, chunk)
        writer.submit(table, tmp / "users" / f"part-{chunk:05d}.parquet")
        for key, arr in state.items():
            parts.setdefault(key, []).append(arr)
        tick(f"users {hi:,}/{params.users:,}")
    users = _UserState(**{key: np.concatenate(arrs) for key, arrs in parts.items()})
    del parts
    users.order_rate = _rates(users, users.order_rate, params.orders_per_user * params.users)
    users.event_rate = _rates(users, users.event_rate, params.events_per_user * params.users)
    counts = {"users": params.users, "orders": 0, "events": 0}
    for day in range(params.days):
        date = params.start + dt.timedelta(days=day)
        part = f"{PARTITION_COLUMN}={date.isoformat()}/part-00000.parquet"
        active = (users.first_day <= day) & (day < users.end_day)
        orders = _gen_orders(params, day, users, active, counts["orders"])
        events = _gen_events(params, day, users, active)
        writer.submit(orders, tmp / "orders" / part)
        writer.submit(events, tmp / "events" / part)
        counts["orders"] += orders.num_rows
        counts["events"] += events.num_rows
        tick(f"day {date.isoformat()} ({day + 1}/{params.days})")
    return lake_meta(params) | {"rows": counts}


def lake_meta(params: LakeParams) -> dict:
    """_lake.json as `generate` writes it for these parameters, but for its row counts."""
    return {
        "format": LAKE_FORMAT,
        "generator": GENERATOR,
        **asdict(params),
        "as_of": params.as_of.isoformat(),
        "start": params.start.isoformat(),
    }


def spark_ddl(table: str) -> str:
    """The Spark schema (DDL) of a gen-data table, partition column included, so a reader can
    skip schema inference."""
    columns = [f"`{f.name}` {_SPARK_TYPES[f.type]}" for f in SCHEMAS[table]]
    if table in PARTITIONED:
        columns.append(f"`{PARTITION_COLUMN}` DATE")
    return ", ".join(columns)


def read_lake_meta(lake: Path | str) -> dict | None:
    """The lake's _lake.json, or None when the lake was not written by gen-data."""
    path = Path(lake) / LAKE_MARKER
    if not path.is_file():
        return None
    try:
        return parse_lake_meta(path.read_bytes(), str(path))
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def parse_lake_meta(data: bytes, where: str) -> dict:
    """The content of a _lake.json (read from anywhere) as a dict; ValueError naming `where`."""
    try:
        meta = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: not a JSON object")
    return meta

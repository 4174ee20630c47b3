"""Ground truth for the example segments, computed without Spark.

`truth_from_lake(lake_dir, definitions_file)` reads the lake's Parquet files with pyarrow and
evaluates every segment of the definitions file with plain numpy / pyarrow code written per
segment name (TRUTH below), using the file's parameters. It shares no code with compute/, so it
checks Spark's results (tests/test_compute_batch.py) and, later, the sidecar's answers.

Semantics mirror compute/definitions/example.toml: `as_of` is midnight UTC at the start of the
lake's as-of day; "the last N days" is ts in [as_of - N days, as_of).
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class Lake:
    """The lake's columns as numpy arrays (timestamps as microseconds since the epoch)."""

    user_id: np.ndarray
    country: Labels
    tier: Labels
    signup_day: np.ndarray  # days since the epoch
    order_user: np.ndarray
    order_ts: np.ndarray
    order_cents: np.ndarray
    order_category: Labels
    event_user: np.ndarray
    event_ts: np.ndarray
    event_type: Labels
    event_category: Labels


def _table(path: Path, columns: list[str]) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table(columns=columns)


@dataclass(frozen=True)
class Labels:
    """A string column, dictionary-encoded: `labels.eq("vip")` is a boolean mask."""

    codes: np.ndarray
    vocabulary: list[str]

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> Labels:
        encoded = pc.dictionary_encode(column.combine_chunks())
        return cls(encoded.indices.to_numpy(), encoded.dictionary.to_pylist())

    def eq(self, value: str) -> np.ndarray:
        if value not in self.vocabulary:
            return np.zeros(len(self.codes), dtype=bool)
        return self.codes == self.vocabulary.index(value)


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def load_lake(lake_dir: Path | str) -> Lake:
    root = Path(lake_dir)
    users = _table(root / "users", ["user_id", "country", "tier", "signup_date"])
    orders = _table(root / "orders", ["user_id", "ts", "amount", "category"])
    events = _table(root / "events", ["user_id", "ts", "type", "category"])
    amount = orders["amount"].cast(pa.float64()).to_numpy()
    return Lake(
        user_id=users["user_id"].to_numpy(),
        country=Labels.of(users["country"]),
        tier=Labels.of(users["tier"]),
        signup_day=users["signup_date"].cast(pa.int32()).to_numpy().astype(np.int64),
        order_user=orders["user_id"].to_numpy(),
        order_ts=_micros(orders["ts"]),
        order_cents=np.round(amount * 100).astype(np.int64),
        order_category=Labels.of(orders["category"]),
        event_user=events["user_id"].to_numpy(),
        event_ts=_micros(events["ts"]),
        event_type=Labels.of(events["type"]),
        event_category=Labels.of(events["category"]),
    )


def _ids(values: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(values)}


def _group(users: np.ndarray, values: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct user: sum / count / max of `values`."""
    if len(users) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    t = pa.table({"u": users, "v": values}).group_by("u").aggregate([("v", how)])
    return t["u"].to_numpy(), t[f"v_{how}"].to_numpy()


class Window:
    def __init__(self, as_of: dt.date) -> None:
        self.end = (as_of - dt.date(1970, 1, 1)).days * DAY_US

    def last(self, ts: np.ndarray, days: int) -> np.ndarray:
        """ts in [as_of - days, as_of)."""
        return (ts >= self.end - days * DAY_US) & (ts < self.end)


def vip_buyers(lake: Lake, p: Mapping) -> set[int]:
    w = Window(p["as_of"])
    m = w.last(lake.order_ts, int(p["lookback_days"]))
    users, cents = _group(lake.order_user[m], lake.order_cents[m], "sum")
    return _ids(lake.user_id[lake.tier.eq("vip")]) | _ids(users[cents >= p["min_spend"] * 100])


def big_spenders_30d(lake: Lake, p: Mapping) -> set[int]:
    m = Window(p["as_of"]).last(lake.order_ts, 30)
    users, cents = _group(lake.order_user[m], lake.order_cents[m], "sum")
    return _ids(users[cents >= p["min_spend"] * 100])


def cart_abandoners_7d(lake: Lake, p: Mapping) -> set[int]:
    w = Window(p["as_of"])
    m = w.last(lake.event_ts, 7) & lake.event_type.eq("add_to_cart")
    cart_users, last_add = _group(lake.event_user[m], lake.event_ts[m], "max")
    order_users, last_order = _group(lake.order_user, lake.order_ts, "max")
    latest_order = dict(zip(order_users.tolist(), last_order.tolist(), strict=True))
    return {
        int(u)
        for u, added in zip(cart_users.tolist(), last_add.tolist(), strict=True)
        if latest_order.get(u, -1) < added
    }


def new_users_30d(lake: Lake, p: Mapping) -> set[int]:
    end = (p["as_of"] - dt.date(1970, 1, 1)).days
    return _ids(lake.user_id[(lake.signup_day >= end - 30) & (lake.signup_day < end)])


def electronics_fans(lake: Lake, p: Mapping) -> set[int]:
    w = Window(p["as_of"])
    m = w.last(lake.order_ts, int(p["lookback_days"])) & lake.order_category.eq("electronics")
    buyers, orders = _group(lake.order_user[m], lake.order_ts[m], "count")
    m = (
        w.last(lake.event_ts, 30)
        & lake.event_category.eq("electronics")
        & lake.event_type.eq("view")
    )
    viewers, views = _group(lake.event_user[m], lake.event_ts[m], "count")
    return _ids(buyers[orders >= p["min_orders"]]) | _ids(viewers[views >= p["min_views"]])


def churn_risk(lake: Lake, p: Mapping) -> set[int]:
    w = Window(p["as_of"])
    m = lake.order_ts < w.end
    users, last = _group(lake.order_user[m], lake.order_ts[m], "max")
    return _ids(users[last < w.end - int(p["quiet_days"]) * DAY_US])


def country_de(lake: Lake, p: Mapping) -> set[int]:
    return _ids(lake.user_id[lake.country.eq("DE")])


def window_shoppers_30d(lake: Lake, p: Mapping) -> set[int]:
    w = Window(p["as_of"])
    m = w.last(lake.event_ts, 30) & lake.event_type.eq("view")
    viewers, views = _group(lake.event_user[m], lake.event_ts[m], "count")
    buyers = _ids(lake.order_user[w.last(lake.order_ts, 30)])
    return _ids(viewers[views >= p["min_views"]]) - buyers


TRUTH: dict[str, Callable[[Lake, Mapping], set[int]]] = {
    f.__name__: f
    for f in (
        vip_buyers,
        big_spenders_30d,
        cart_abandoners_7d,
        new_users_30d,
        electronics_fans,
        churn_risk,
        country_de,
        window_shoppers_30d,
    )
}


def lake_as_of(lake_dir: Path | str) -> dt.date:
    meta = json.loads((Path(lake_dir) / "_lake.json").read_text())
    return dt.date.fromisoformat(meta["as_of"])


def segment_params(lake_dir: Path | str, definitions_file: Path | str) -> dict[str, dict]:
    """Each segment's parameters: as_of from the lake, then [params], then [segment.params]."""
    doc = tomllib.loads(Path(definitions_file).read_text())
    base = {"as_of": lake_as_of(lake_dir), **doc.get("params", {})}
    return {s["name"]: {**base, **s.get("params", {})} for s in doc["segment"]}


def truth_from_lake(lake_dir: Path | str, definitions_file: Path | str) -> dict[str, set[int]]:
    """Every segment of the definitions file, computed with pyarrow + numpy (no Spark)."""
    params = segment_params(lake_dir, definitions_file)
    missing = sorted(set(params) - set(TRUTH))
    if missing:
        raise KeyError(f"no ground truth for segment(s): {', '.join(missing)}")
    lake = load_lake(lake_dir)
    return {name: TRUTH[name](lake, p) for name, p in params.items()}

"""`seg-compute gen-events`: realistic click / cart / order events to Kafka at a fixed rate.

One event is one JSON object, the record value; the key is the user id (so one user's events
stay in order within one partition):

    {"user_id": 10000007, "type": "add_to_cart", "product_id": 100042,
     "category": "electronics", "amount": 59.9, "ts": 1793491200000}

`type` is one of view, add_to_cart, remove_from_cart, order; `ts` is milliseconds since the
epoch (the producer's clock when the event is made); `amount` is the product's price (view and
cart events) or the cart's total (order). Users come from a lake (`--users-from`) or are the
first N ids `gen-data --users N` would make (`--users`), so batch and streaming segments talk
about the same people. Each user keeps a cart: adds fill it, removes take an item out, an order
checks it out and empties it, so some carts are abandoned and some are bought.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypedDict

import numpy as np

from compute.kafkaconf import kafka_config
from compute.lake import CATEGORIES, CATEGORY_P, PRODUCTS_PER_CATEGORY, user_ids

EVENT_TYPES = ("view", "add_to_cart", "remove_from_cart", "order")
DEFAULT_PARTITIONS = 4
DEFAULT_SEED = 42
MAX_CART = 20
_DRAW_CHUNK = 4096
_CATEGORY_CUM = np.cumsum(CATEGORY_P)


class Event(TypedDict):
    user_id: int
    type: str
    product_id: int
    category: str
    amount: float
    ts: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_event(
    user_id: int,
    type: str,
    *,
    ts: int | None = None,
    category: str = "electronics",
    product_id: int = 1,
    amount: float = 0.0,
) -> Event:
    """One event with explicit fields (tests and tools); `ts` defaults to now."""
    if type not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {EVENT_TYPES}, got {type!r}")
    return Event(
        user_id=int(user_id),
        type=type,
        product_id=int(product_id),
        category=category,
        amount=float(amount),
        ts=now_ms() if ts is None else int(ts),
    )


def encode(event: Event) -> tuple[bytes, bytes]:
    """(key, value) of an event's Kafka record."""
    return str(event["user_id"]).encode(), json.dumps(event, separators=(",", ":")).encode()


def price(product_id: int) -> float:
    """A product's price: fixed per product, log-normal around ~30, 0.99 .. 2,000."""
    x = random.Random(product_id).lognormvariate(3.4, 1.0)
    return round(min(max(x, 0.99), 2000.0), 2)


class EventGenerator:
    """An endless stream of plausible events for a fixed set of users.

    Activity is heavy-tailed (a few users do most of the clicking); a user browses one category
    at a time; carts persist per user, so add_to_cart without a later order (an abandoned cart)
    is common, as it is in real shops.
    """

    def __init__(self, users: np.ndarray, seed: int = DEFAULT_SEED) -> None:
        if len(users) == 0:
            raise ValueError("no users to generate events for")
        self.users = users.astype(np.uint64)
        self.rng = np.random.default_rng(seed)
        weights = self.rng.pareto(1.2, len(users)) + 1.0
        self._cum = np.cumsum(weights / weights.sum())
        self._carts: dict[int, list[tuple[int, int, float]]] = {}
        self._browsing: dict[int, int] = {}
        self._picks: Iterator[tuple[int, float, float, float]] = iter(())

    def _draws(self) -> Iterator[tuple[int, float, float, float]]:
        """(user index, three uniforms) drawn a chunk at a time: numpy per event is slow."""
        while True:
            idx = np.searchsorted(self._cum, self.rng.random(_DRAW_CHUNK), side="right")
            idx = np.minimum(idx, len(self.users) - 1)
            u = self.rng.random((_DRAW_CHUNK, 3))
            for i in range(_DRAW_CHUNK):
                yield int(idx[i]), float(u[i, 0]), float(u[i, 1]), float(u[i, 2])

    def _product(self, user: int, u1: float, u2: float) -> tuple[int, int]:
        cat = self._browsing.get(user)
        if cat is None or u1 < 0.15:  # a new visitor picks a category; others switch now and then
            u = u1 if cat is None else u1 / 0.15
            cat = min(int(np.searchsorted(_CATEGORY_CUM, u, side="right")), len(CATEGORIES) - 1)
            self._browsing[user] = cat
        rank = int(PRODUCTS_PER_CATEGORY ** (u2**3))  # popular products get most clicks
        return cat, cat * PRODUCTS_PER_CATEGORY + min(rank, PRODUCTS_PER_CATEGORY - 1)

    def next(self, ts: int | None = None) -> Event:
        """The next event. Empty cart: 84% view, 16% add. Items in the cart: 72% view, 12% add,
        6% remove, 10% order."""
        if (pick := next(self._picks, None)) is None:
            self._picks = self._draws()
            pick = next(self._picks)
        i, u0, u1, u2 = pick
        user = int(self.users[i])
        cart = self._carts.setdefault(user, [])
        ts = now_ms() if ts is None else ts
        if cart and 0.72 <= u0 < 0.78:
            cat, product, amount = cart.pop(int(u1 * len(cart)) % len(cart))
            return make_event(user, "remove_from_cart", ts=ts, category=CATEGORIES[cat],
                              product_id=product, amount=amount)  # fmt: skip
        if cart and 0.78 <= u0 < 0.88:
            total = round(sum(item[2] for item in cart), 2)
            cat, product, _ = cart[-1]
            cart.clear()
            return make_event(user, "order", ts=ts, category=CATEGORIES[cat], product_id=product,
                              amount=total)  # fmt: skip
        cat, product = self._product(user, u1, u2)
        amount = price(product)
        kind = "view"
        if u0 >= (0.88 if cart else 0.84) and len(cart) < MAX_CART:
            kind = "add_to_cart"
            cart.append((cat, product, amount))
        return make_event(user, kind, ts=ts, category=CATEGORIES[cat], product_id=product,
                          amount=amount)  # fmt: skip


def users_from_lake(lake: str | Path) -> np.ndarray:
    """The user ids of a lake written by `seg-compute gen-data`."""
    import pyarrow.parquet as pq

    path = Path(lake) / "users"
    if not path.is_dir():
        raise ValueError(f"{lake} is not a lake: no users/ directory")
    ids = pq.read_table(path, columns=["user_id"]).column("user_id").to_numpy()
    if len(ids) == 0:
        raise ValueError(f"{path} holds no users")
    return ids.astype(np.uint64)


def synthetic_users(n: int) -> np.ndarray:
    """The first n user ids `seg-compute gen-data --users n` makes."""
    if n < 1:
        raise ValueError(f"--users must be >= 1, got {n}")
    return user_ids(np.arange(n, dtype=np.int64)).astype(np.uint64)


# -- Kafka -------------------------------------------------------------------------------------


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int = DEFAULT_PARTITIONS,
    config: dict[str, str] | None = None,
    client: Mapping[str, str] | None = None,
) -> int:
    """Create the topic (with topic `config`, e.g. compaction) when it is missing; returns
    its partition count. An existing topic is used as it is. `client`: the librdkafka
    settings (SASL, SSL, ...) of the command's other clients, which the admin client takes
    too."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_config(bootstrap, **(client or {})))
    meta = admin.list_topics(timeout=15)
    found = meta.topics.get(topic)
    if found is not None and found.error is None:
        return len(found.partitions)
    futures = admin.create_topics(
        [NewTopic(topic, partitions, 1, config=config or {})], request_timeout=30
    )
    try:
        futures[topic].result()
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not isinstance(err, KafkaError) or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = admin.list_topics(topic, timeout=15).topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            return len(found.partitions)
        time.sleep(0.2)
    raise RuntimeError(f"topic {topic} did not appear on {bootstrap}")


class ProduceError(RuntimeError):
    """Kafka did not accept some events."""


def produce(
    bootstrap: str,
    topic: str,
    events: Iterable[Event],
    *,
    rate: float | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 1.0,
    client: Mapping[str, str] | None = None,
) -> int:
    """Send `events` to `topic`, at most `rate` per second (None: as fast as Kafka takes them);
    `client`: extra librdkafka settings (SASL, SSL, ...), as `ensure_topic`'s.

    The rate is held against a fixed schedule (event i is due at start + i / rate), so short
    stalls are caught up and the average stays exact. Returns the number of events delivered;
    raises ProduceError when any failed. Every event is acknowledged (acks=all, idempotent)
    before this returns.
    """
    from confluent_kafka import Producer

    producer = Producer(
        kafka_config(bootstrap, **{"enable.idempotence": True, "linger.ms": 5,
                                   "compression.type": "zstd", **(client or {})})
    )  # fmt: skip
    failed: list[str] = []
    delivered = 0

    def on_delivery(err: object, _msg: object) -> None:
        nonlocal delivered
        if err is not None:
            failed.append(str(err))
        else:
            delivered += 1

    start = last = time.monotonic()
    sent = 0
    try:
        for event in events:
            if rate:
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0.001:
                    producer.poll(0)
                    time.sleep(ahead)
            key, value = encode(event)
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let it drain
                    producer.poll(0.05)
            sent += 1
            producer.poll(0)
            now = time.monotonic()
            if progress is not None and now - last >= progress_every:
                last = now
                progress(
                    f"{sent:,} events in {now - start:.1f} s ({sent / (now - start):,.0f}/s), "
                    f"{delivered:,} acked, {len(failed)} failed"
                )
    finally:
        left = producer.flush(30)
    if left or failed:
        reason = failed[0] if failed else f"{left} events still queued after 30 s"
        raise ProduceError(f"{len(failed) + left} of {sent} events not delivered: {reason}")
    if progress is not None:
        took = max(time.monotonic() - start, 1e-9)
        progress(f"done: {sent:,} events in {took:.1f} s ({sent / took:,.0f}/s)")
    return delivered


def generate(
    users: np.ndarray,
    *,
    seed: int = DEFAULT_SEED,
    count: int | None = None,
    duration: float | None = None,
) -> Iterator[Event]:
    """Events stamped with the wall clock when they are taken: `count` of them, or for
    `duration` seconds, or forever when neither is given."""
    gen = EventGenerator(users, seed)
    end = time.monotonic() + duration if duration is not None else None
    made = 0
    while (count is None or made < count) and (end is None or time.monotonic() < end):
        yield gen.next()
        made += 1


def stderr_progress(message: str) -> None:
    print(f"gen-events: {message}", file=sys.stderr, flush=True)

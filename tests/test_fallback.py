"""The Aerospike fallback (sidecar/fallback/aerospike.py) against the wire-level test server,
with the real `aerospike` client on both sides: records written with map operations are read
back by `segments_of`; the time budget, the circuit breaker and the in-flight limit hold under
the server's fault knobs (latency, down/up, error codes).

pytest-asyncio is not installed: each test runs its body with `asyncio.run`. Tests about the
answers (not about timing) give the fallback a generous budget, because the test server runs
in this process and shares the GIL with the client threads; the budget tests use the
production default of 5 ms.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aerospike_helpers.operations import map_operations

from sidecar.aerospike_layout import AerospikeTarget, map_version, parse_hosts, user_key
from sidecar.fallback.aerospike import AerospikeFallback
from sidecar.fallback.breaker import CircuitBreaker
from tests.aerospike_fixture import aerospike_client, aerospike_server  # noqa: F401
from tests.aerospike_server import ThreadedAerospikeServer

T = TypeVar("T")
NS, SET, BIN = "test", "users", "segs"
ANSWER_BUDGET_MS = 500.0  # for tests about what is answered, not how fast


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


async def in_flight(fb: AerospikeFallback, task: asyncio.Task[Any]) -> None:
    """Wait until `task`'s call is out (it was let through, not rejected)."""
    while fb.in_flight == 0:
        assert not task.done(), f"the call was not let through: {fb.status()}"
        await asyncio.sleep(0)


def make_fallback(server: ThreadedAerospikeServer, **kwargs: Any) -> AerospikeFallback:
    kwargs.setdefault("budget_ms", ANSWER_BUDGET_MS)
    return AerospikeFallback(AerospikeTarget([(server.host, server.port)], namespace=NS), **kwargs)


def write_segs(client: Any, user: int, segs: dict[str, int]) -> None:
    """A user's `segs` map written the way the publisher does it: map puts."""
    ops = [map_operations.map_put(BIN, seg, version) for seg, version in segs.items()]
    client.operate((NS, SET, user_key(user)), ops)


async def answer(
    fb: AerospikeFallback,
    user: int,
    timeout: float = 10.0,
    between: Callable[[], None] | None = None,
) -> dict[str, int]:
    """The first non-None answer (the client connects in the background on first use).
    `between`: called after each None (a test's fake breaker clock moves on there, so calls
    a loaded machine timed out, which may open the breaker, are retried after its cooldown)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await fb.segments_of(user)
        if result is not None:
            return result
        assert time.monotonic() < deadline, f"no answer for {user} in {timeout} s: {fb.status()}"
        if between is not None:
            between()
        await asyncio.sleep(0.02)


def data_commands(server: ThreadedAerospikeServer) -> dict[str, int]:
    """Data commands the server has seen (info/tending traffic excluded)."""
    return {k: v for k, v in server.command_counts().items() if not k.startswith("info:")}


# -- answers ----------------------------------------------------------------------------------


def test_user_key_wraps_ids_above_2_63() -> None:
    assert user_key(0) == 0
    assert user_key(2**63 - 1) == 2**63 - 1
    assert user_key(2**63) == -(2**63)
    assert user_key(2**64 - 1) == -1
    users = [0, 1, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
    keys = [user_key(u) for u in users]
    assert len(set(keys)) == len(users)
    assert all(-(2**63) <= k < 2**63 for k in keys)


def test_parse_hosts() -> None:
    assert parse_hosts("a:3000, b:3001") == [("a", 3000), ("b", 3001)]
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hosts("localhost")


def test_segments_written_with_map_put_are_returned(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    users = {
        7: {"vip_buyers": 3},
        8: {"vip_buyers": 3, "cart_abandoners_30m": 12, "ns:seg.v-1": 1},
        9: {},
    }
    for user, segs in users.items():
        if segs:
            write_segs(aerospike_client, user, segs)
    assert aerospike_server.record(SET, 8) == {BIN: users[8]}

    async def body() -> None:
        fb = make_fallback(aerospike_server)
        try:
            await answer(fb, 7)
            for user, segs in users.items():
                assert await fb.segments_of(user) == segs
            status = fb.status()
            assert status["kind"] == "aerospike"
            assert status["breaker"] == "closed"
            assert status["hosts"] == [aerospike_server.address]
            assert status["calls"]["error"] == status["calls"]["timeout"] == 0
        finally:
            await fb.close()

    run(body)


def test_get_reads_bin_segs_only(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    """Defect 8 of issue 11: the fallback read the whole record; it reads bin segs only."""
    aerospike_client.put((NS, SET, 42), {BIN: {"a": 1}, "profile": "x" * 50_000})

    async def body() -> None:
        fb = make_fallback(aerospike_server, budget_ms=200)
        try:
            assert await answer(fb, 42) == {"a": 1}
        finally:
            await fb.close()

    run(body)
    counts = aerospike_server.command_counts()
    assert counts["get:" + BIN] >= 1 and counts["get:" + BIN] == counts["get"], counts


def test_ttl_map_values_are_honoured(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    """A TTL segment's value is [version, expires_at_ms]: a member until then, not after."""
    now = int(time.time() * 1000)
    segs = {"plain": 2, "live": [3, now + 3_600_000], "gone": [4, now - 1]}
    aerospike_client.put((NS, SET, 77), {BIN: segs})
    aerospike_client.put((NS, SET, 78), {BIN: {"bad": "x"}})

    async def body() -> None:
        fb = make_fallback(aerospike_server, budget_ms=200)
        try:
            assert await answer(fb, 77) == {"plain": 2, "live": 3}
            errors = fb.calls["error"]
            assert await fb.segments_of(78) is None  # malformed: unknown, not "not a member"
            assert fb.calls["error"] == errors + 1
        finally:
            await fb.close()

    run(body)


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [(5, None, 5), ([5, 100], None, 5), ([5, 100], 99, 5), ([5, 100], 100, None)],
)
def test_map_version(value: Any, now: int | None, expected: int | None) -> None:
    assert map_version(value, now) == expected


@pytest.mark.parametrize("value", [0, True, "3", 3.0, [3], [3, "x"], [True, 5], None])
def test_map_version_refuses_malformed_values(value: Any) -> None:
    with pytest.raises(ValueError, match="malformed"):
        map_version(value, 0)


def test_unknown_user_is_empty_not_none(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
) -> None:
    async def body() -> None:
        fb = make_fallback(aerospike_server)
        try:
            assert await answer(fb, 123456) == {}
            before = dict(fb.calls)
            assert await fb.segments_of(654321) == {}
            assert fb.calls["not_found"] == before["not_found"] + 1
            assert fb.status()["breaker"] == "closed"  # not found is not a failure
        finally:
            await fb.close()

    run(body)


def test_ids_at_and_above_2_63_round_trip(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    users = [2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 0]
    for i, user in enumerate(users):
        write_segs(aerospike_client, user, {f"s{i}": i + 1})
        # Stored under the wrapped signed key, i.e. where any Aerospike client finds it.
        assert aerospike_server.record(SET, user_key(user)) == {BIN: {f"s{i}": i + 1}}

    async def body() -> None:
        fb = make_fallback(aerospike_server)
        try:
            await answer(fb, users[0])
            for i, user in enumerate(users):
                assert await fb.segments_of(user) == {f"s{i}": i + 1}, user
            # 2**64 - 1 and -1 are one record; 2**63 - 1 and 2**63 are not.
            assert await fb.segments_of(2**64 - 2) == {}
        finally:
            await fb.close()

    run(body)


# -- the time budget --------------------------------------------------------------------------


def test_latency_above_budget_is_none_within_budget(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    write_segs(aerospike_client, 42, {"a": 1})

    async def body() -> None:
        fb = make_fallback(aerospike_server, budget_ms=5)
        try:
            assert await answer(fb, 42) == {"a": 1}
            aerospike_server.latency_s = 1.0  # far past the budget: a wait would show
            before = dict(fb.calls)
            for _ in range(3):
                started = time.perf_counter()
                result = await fb.segments_of(42)
                elapsed = time.perf_counter() - started
                assert result is None
                assert elapsed < 0.5, f"took {elapsed * 1000:.1f} ms with a 5 ms budget"
            assert fb.calls["timeout"] == before["timeout"] + 3
            assert fb.status()["breaker"] == "closed"  # 3 calls < the 20 it needs to open
            aerospike_server.latency_s = 0
            assert await answer(fb, 42) == {"a": 1}
        finally:
            await fb.close()

    run(body)


@dataclass(frozen=True)
class GatedTarget(AerospikeTarget):
    """A target whose connect waits until `opened` is set (5 s at most): calls made before
    are made while connecting, however fast the machine connects."""

    opened: threading.Event = field(default_factory=threading.Event, compare=False)

    def connect(self, policies: dict[str, Any], **extra: Any) -> Any:
        self.opened.wait(5)
        return super().connect(policies, **extra)


def test_startup_burst_does_not_open_the_breaker(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
) -> None:
    """Connecting takes longer than the budget: calls made meanwhile answer None at once,
    and they are not failures, so a burst of first calls leaves the breaker closed."""
    aerospike_server.seed(SET, 5, {BIN: {"a": 2}})

    async def body() -> None:
        target = GatedTarget([(aerospike_server.host, aerospike_server.port)], namespace=NS)
        fb = AerospikeFallback(target, budget_ms=5)
        try:
            started = time.perf_counter()
            results = await asyncio.gather(*(fb.segments_of(5) for _ in range(50)))
            # Not a speed check: a wait for the connect (held for 5 s) would show.
            assert time.perf_counter() - started < 0.5
            assert results == [None] * 50
            assert fb.status()["breaker"] == "closed"
            assert fb.breaker.opened_total == 0
            assert fb.calls["rejected"] == 50
            target.opened.set()
            # It connects, and answers (a 5 ms budget can miss on a loaded machine: retried).
            deadline = time.monotonic() + 10
            while fb._client is None:
                assert time.monotonic() < deadline, "never connected"
                await asyncio.sleep(0.01)
            assert await answer(fb, 5) == {"a": 2}
        finally:
            await fb.close()

    run(body)


def test_unreachable_server_never_hangs() -> None:
    server = ThreadedAerospikeServer().start()
    host, port = server.host, server.port
    server.stop()  # nothing listens on that port now

    async def body() -> None:
        fb = AerospikeFallback(AerospikeTarget([(host, port)]), budget_ms=5)
        try:
            for _ in range(20):
                started = time.perf_counter()
                assert await fb.segments_of(1) is None
                # Not a speed check (starting the connect thread can take tens of ms on a
                # loaded machine): a wait for the connect (1 s timeout) would show.
                assert time.perf_counter() - started < 0.5
                await asyncio.sleep(0.01)
        finally:
            await fb.close()

    run(body)


# -- the circuit breaker ----------------------------------------------------------------------


def test_down_opens_breaker_then_up_closes_it(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    write_segs(aerospike_client, 42, {"a": 1, "b": 2})
    clock = FakeClock()
    breaker = CircuitBreaker(window=10, min_calls=3, cooldown=2.0, clock=clock)

    async def body() -> None:
        fb = make_fallback(aerospike_server, budget_ms=50, breaker=breaker)

        def cooled() -> None:
            clock.advance(2.0)

        try:
            assert await answer(fb, 42, between=cooled) == {"a": 1, "b": 2}
            opened = fb.breaker.opened_total  # 0, unless a loaded machine timed calls out
            aerospike_server.down()
            for _ in range(10):  # a few failures open it
                assert await fb.segments_of(42) is None
                if fb.status()["breaker"] == "open":
                    break
            assert fb.status()["breaker"] == "open"
            assert fb.status()["breaker_opened"] == opened + 1
            assert fb.calls["error"] + fb.calls["timeout"] >= 2  # of 3 calls: the rate

            # Open: None without a network call (counted as rejected; the server sees nothing).
            counts, rejected = data_commands(aerospike_server), fb.calls["rejected"]
            for _ in range(50):
                assert await fb.segments_of(42) is None
            assert fb.calls["rejected"] == rejected + 50
            assert data_commands(aerospike_server) == counts

            aerospike_server.up()
            clock.advance(1.9)  # still cooling down, even though the server is back
            assert await fb.segments_of(42) is None
            assert data_commands(aerospike_server) == counts

            # After the cool-down one trial goes out; the client may need a tend interval to
            # find the node again, so a failed trial re-opens it and we wait another round.
            deadline = time.monotonic() + 15
            while True:
                clock.advance(2.0)
                result = await fb.segments_of(42)
                if result is not None:
                    break
                assert fb.status()["breaker"] == "open"
                assert time.monotonic() < deadline, fb.status()
                await asyncio.sleep(0.1)
            assert result == {"a": 1, "b": 2}
            assert fb.status()["breaker"] == "closed"
            for _ in range(5):  # (a 50 ms call can time out on a loaded machine: retried)
                assert await answer(fb, 42, between=cooled) == {"a": 1, "b": 2}
        finally:
            await fb.close()

    run(body)


def test_open_breaker_sends_nothing_and_half_open_sends_one_trial(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    """The same cycle with a live server answering errors, so that "no network call" is
    visible in the server's counters, and the half-open trial can be held in flight."""
    write_segs(aerospike_client, 42, {"a": 1})
    clock = FakeClock()
    breaker = CircuitBreaker(window=10, min_calls=3, cooldown=2.0, clock=clock)

    async def body() -> None:
        fb = make_fallback(aerospike_server, breaker=breaker)
        try:
            assert await answer(fb, 42) == {"a": 1}
            aerospike_server.error_code = 14  # KEY_BUSY on every data command
            for _ in range(3):
                assert await fb.segments_of(42) is None
            assert fb.status()["breaker"] == "open"
            gets = aerospike_server.command_counts()["get"]
            for _ in range(20):
                assert await fb.segments_of(42) is None
            assert aerospike_server.command_counts()["get"] == gets

            # A failed trial re-opens it.
            clock.advance(2.0)
            assert await fb.segments_of(42) is None
            assert aerospike_server.command_counts()["get"] == gets + 1
            assert fb.status()["breaker"] == "open"
            assert fb.status()["breaker_opened"] == 2

            # A slow, successful trial: exactly one call goes out while it runs.
            aerospike_server.error_code = None
            aerospike_server.latency_s = 0.1
            clock.advance(2.0)
            trial = asyncio.create_task(fb.segments_of(42))
            await in_flight(fb, trial)
            assert fb.status()["breaker"] == "half_open"
            for _ in range(10):
                assert await fb.segments_of(42) is None
            assert await trial == {"a": 1}
            assert aerospike_server.command_counts()["get"] == gets + 2
            assert fb.status()["breaker"] == "closed"
        finally:
            await fb.close()

    run(body)


class OrderedClient:
    """An aerospike client that records its calls and returns in order. Its close() never
    frees the C client under a select still running (the use-after-free that aborted CI),
    even when the fallback asks it to: it records the ask, then waits for the select."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[str] = []
        self._idle = threading.Event()
        self._idle.set()

    def select(self, *args: Any) -> Any:
        self._idle.clear()
        self.events.append("select")
        try:
            return self.inner.select(*args)
        finally:
            self.events.append("select returned")
            self._idle.set()

    def close(self) -> None:
        self.events.append("close")
        self._idle.wait(10)
        self.inner.close()


def test_close_waits_for_the_call_in_flight_before_freeing_the_client(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    """Freeing the C client under a call still running on the pool is a use-after-free (it
    aborted CI): close() waits for that call, which still answers, and lets no new one out."""
    write_segs(aerospike_client, 42, {"a": 1})

    async def body() -> None:
        fb = make_fallback(aerospike_server)
        assert await answer(fb, 42) == {"a": 1}
        client = fb._client = OrderedClient(fb._client)
        aerospike_server.latency_s = 0.2  # well within the 500 ms budget
        call = asyncio.create_task(fb.segments_of(42))
        await in_flight(fb, call)
        deadline = time.monotonic() + 10
        while "select" not in client.events:  # a pool thread is in the C call
            assert time.monotonic() < deadline, "the call never reached the client"
            await asyncio.sleep(0.001)
        await fb.close()
        # The order, not a duration: a loaded machine cannot make it pass or fail.
        assert client.events == ["select", "select returned", "close"], client.events
        assert await call == {"a": 1}
        gets = aerospike_server.command_counts()["get"]
        assert await fb.segments_of(42) is None
        assert aerospike_server.command_counts()["get"] == gets

    run(body)


def test_error_code_is_none_and_counted_as_error(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    write_segs(aerospike_client, 42, {"a": 1})

    async def body() -> None:
        fb = make_fallback(aerospike_server)
        try:
            assert await answer(fb, 42) == {"a": 1}
            before = dict(fb.calls)
            injected = aerospike_server.command_counts()["error_injected"]
            for code in (8, 22):  # SERVER_FULL, FORBIDDEN
                aerospike_server.error_code = code
                assert await fb.segments_of(42) is None
            assert fb.calls["error"] == before["error"] + 2
            assert fb.calls["timeout"] == before["timeout"]
            assert aerospike_server.command_counts()["error_injected"] == injected + 2
            assert fb.status()["breaker"] == "closed"  # 2 < 5
            aerospike_server.error_code = None
            assert await fb.segments_of(42) == {"a": 1}
        finally:
            await fb.close()

    run(body)


def test_max_in_flight_rejects_at_once(
    aerospike_server: ThreadedAerospikeServer,  # noqa: F811
    aerospike_client: Any,  # noqa: F811
) -> None:
    write_segs(aerospike_client, 42, {"a": 1})

    async def body() -> None:
        fb = make_fallback(aerospike_server, max_in_flight=1, budget_ms=3000)
        try:
            assert await answer(fb, 42) == {"a": 1}
            aerospike_server.latency_s = 1.0
            gets = aerospike_server.command_counts()["get"]
            first = asyncio.create_task(fb.segments_of(42))
            await in_flight(fb, first)
            rejected = fb.calls["rejected"]
            started = time.perf_counter()
            assert await fb.segments_of(42) is None
            assert time.perf_counter() - started < 0.5  # not queued behind the first
            assert fb.calls["rejected"] == rejected + 1
            assert await first == {"a": 1}
            assert aerospike_server.command_counts()["get"] == gets + 1
            assert fb.in_flight == 0
            assert fb.status()["breaker"] == "closed"  # a rejection is not a failure
            aerospike_server.latency_s = 0
            assert await fb.segments_of(42) == {"a": 1}
        finally:
            await fb.close()

    run(body)

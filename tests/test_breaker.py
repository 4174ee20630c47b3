"""CircuitBreaker state machine (sidecar/fallback/breaker.py), driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.fallback.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.min_calls):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN


def small(clock: FakeClock, **kwargs: float) -> CircuitBreaker:
    """A breaker over the last 10 calls that opens at half of them failed, once 4 were made."""
    options = {"window": 10, "failure_rate": 0.5, "min_calls": 4, "cooldown": 2.0, **kwargs}
    return CircuitBreaker(**options, clock=clock)  # type: ignore[arg-type]


def test_starts_closed_and_allows(clock: FakeClock) -> None:
    breaker = small(clock)
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow() for _ in range(100))
    assert breaker.opened_total == 0


def test_opens_on_the_failure_rate_of_the_window(clock: FakeClock) -> None:
    breaker = small(clock)
    for outcome in (True, False, True):  # 2 of 3 failed, but fewer than min_calls calls
        breaker.failure() if outcome else breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.success()  # 2 of 4 = 0.5, but a success never opens it
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure()  # 3 of 5
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_total == 1
    assert not breaker.allow()


def test_scattered_failures_never_open_it(clock: FakeClock) -> None:
    """Defect 7 of issue 11: a brief CPU stall times out a burst of calls in a row; with a
    healthy server that is a small share of the calls and must not open the breaker (the old
    breaker opened on 5 consecutive failures)."""
    breaker = CircuitBreaker(clock=clock)  # the defaults the sidecar runs with
    for _ in range(50):
        for _ in range(8):  # a stall: 8 timeouts in a row
            breaker.failure()
        for _ in range(92):
            assert breaker.allow()
            breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.opened_total == 0


def test_a_dead_server_opens_it_after_min_calls(clock: FakeClock) -> None:
    breaker = CircuitBreaker(clock=clock)
    for _ in range(500):
        breaker.success()
    failures = 0
    while breaker.state == CircuitBreaker.CLOSED:
        breaker.failure()
        failures += 1
    # the window held 100 successes: half of it must fail
    assert failures == int(breaker.window * breaker.failure_rate)
    fresh = CircuitBreaker(clock=clock)
    for _ in range(fresh.min_calls):
        fresh.failure()
    assert fresh.state == CircuitBreaker.OPEN


@given(st.lists(st.booleans(), max_size=300))
def test_opens_exactly_when_the_window_says_so(outcomes: list[bool]) -> None:
    """Against a model: the breaker opens at the first failure after which, among the last
    `window` outcomes, at least `min_calls` were made and the failed share is at least
    `failure_rate` (a success never opens it)."""
    clock = FakeClock()
    breaker = small(clock)
    recent: list[bool] = []
    for failed in outcomes:
        breaker.failure() if failed else breaker.success()
        recent = [*recent, failed][-10:]
        should = failed and len(recent) >= 4 and sum(recent) / len(recent) >= 0.5
        assert (breaker.state == CircuitBreaker.OPEN) == should, recent
        if should:
            return


def test_refuses_during_cooldown(clock: FakeClock) -> None:
    breaker = small(clock)
    _open(breaker)
    for _ in range(19):
        clock.advance(0.1)  # up to 1.9 s: still cooling down
        assert not breaker.allow()
        assert breaker.state == CircuitBreaker.OPEN


def test_half_open_lets_exactly_one_trial_through(clock: FakeClock) -> None:
    breaker = small(clock)
    _open(breaker)
    clock.advance(2.0)
    assert breaker.allow()  # the trial
    assert breaker.state == CircuitBreaker.HALF_OPEN
    # While the trial runs, every other call is refused, however long it takes.
    assert not breaker.allow()
    assert not breaker.allow()
    clock.advance(10.0)
    assert not breaker.allow()
    assert breaker.state == CircuitBreaker.HALF_OPEN


def test_trial_success_closes(clock: FakeClock) -> None:
    breaker = small(clock)
    _open(breaker)
    clock.advance(2.5)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow() for _ in range(10))
    # Closed again means a fresh window: failures before the opening no longer count.
    for _ in range(breaker.min_calls - 1):
        breaker.failure()
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.opened_total == 1


def test_trial_failure_reopens_for_a_full_cooldown(clock: FakeClock) -> None:
    breaker = small(clock)
    _open(breaker)
    clock.advance(2.0)
    assert breaker.allow()
    breaker.failure()  # one failure is enough in half-open
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_total == 2
    assert not breaker.allow()
    clock.advance(1.99)  # the cool-down restarts at the trial's failure
    assert not breaker.allow()
    clock.advance(0.01)
    assert breaker.allow()
    assert breaker.state == CircuitBreaker.HALF_OPEN
    assert not breaker.allow()
    breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED


def test_late_results_while_open_change_nothing(clock: FakeClock) -> None:
    breaker = small(clock, cooldown=1.0)
    _open(breaker)
    clock.advance(0.5)
    breaker.failure()  # late results of calls that were already out
    breaker.success()
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_total == 1
    clock.advance(0.5)  # the cool-down was not restarted by the late failure
    assert breaker.allow()
    assert breaker.state == CircuitBreaker.HALF_OPEN


def test_default_clock_is_monotonic() -> None:
    import time

    assert CircuitBreaker()._clock is time.monotonic


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"window": 0}, {"failure_rate": 0}, {"failure_rate": 1.5}, {"min_calls": 0},
                   {"min_calls": 11, "window": 10}, {"cooldown": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            CircuitBreaker(**kwargs)  # type: ignore[arg-type]

"""CircuitBreaker state machine (sidecar/fallback/breaker.py), driven by a fake clock."""

from __future__ import annotations

import pytest

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
    for _ in range(breaker.threshold):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN


def test_starts_closed_and_allows(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown=2.0, clock=clock)
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow() for _ in range(100))
    assert breaker.opened_total == 0


def test_opens_after_n_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown=2.0, clock=clock)
    breaker.failure()
    breaker.failure()
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_total == 1
    assert not breaker.allow()


def test_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown=2.0, clock=clock)
    for _ in range(5):  # never three failures in a row
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure()
    breaker.failure()
    assert breaker.state == CircuitBreaker.CLOSED
    breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN


def test_refuses_during_cooldown(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown=2.0, clock=clock)
    _open(breaker)
    for _ in range(19):
        clock.advance(0.1)  # up to 1.9 s: still cooling down
        assert not breaker.allow()
        assert breaker.state == CircuitBreaker.OPEN


def test_half_open_lets_exactly_one_trial_through(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown=2.0, clock=clock)
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
    breaker = CircuitBreaker(failures=2, cooldown=2.0, clock=clock)
    _open(breaker)
    clock.advance(2.5)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow() for _ in range(10))
    # Closed again means a fresh count: one failure does not re-open it.
    breaker.failure()
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.opened_total == 1


def test_trial_failure_reopens_for_a_full_cooldown(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown=2.0, clock=clock)
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


def test_failures_while_open_do_not_extend_count_of_openings(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failures=1, cooldown=1.0, clock=clock)
    breaker.failure()
    breaker.failure()  # a late failure of a call that was already out
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_total == 1


def test_default_clock_is_monotonic() -> None:
    breaker = CircuitBreaker(failures=1, cooldown=0.0)
    breaker.failure()
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.allow()  # zero cool-down: half-open at once
    assert breaker.state == CircuitBreaker.HALF_OPEN

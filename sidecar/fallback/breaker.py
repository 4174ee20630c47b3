"""A circuit breaker: after `failures` consecutive failures it opens and refuses calls for
`cooldown` seconds, then lets one trial call through (half-open); success closes it."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self,
        failures: int = 5,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_running = False
        self.state = self.CLOSED
        self.opened_total = 0

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one trial at a time."""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self.state = self.HALF_OPEN
            self._trial_running = False
        if self.state == self.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._trial_running = False
        self.state = self.CLOSED

    def failure(self) -> None:
        self._consecutive += 1
        self._trial_running = False
        if self.state == self.HALF_OPEN or self._consecutive >= self.threshold:
            if self.state != self.OPEN:
                self.opened_total += 1
            self.state = self.OPEN
            self._opened_at = self._clock()

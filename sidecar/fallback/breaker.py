"""The fallback's circuit breaker: it opens on the failure rate of the last `window` calls (at
least `failure_rate` of them failed, once `min_calls` were made), refuses calls for `cooldown`
seconds, then lets one trial call through (half-open); its success closes the breaker with a
fresh window, its failure opens it again.

A rate over a window, not N consecutive failures: a brief CPU stall of the sidecar times out a
burst of calls in a row while the server is healthy, and must not turn into seconds of unknown
answers; a dead server fails every call and opens it after `min_calls`. Results of calls that
were already out when it opened change nothing. Sizing: README "Aerospike".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self,
        *,
        window: int = 100,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1 or not 1 <= min_calls <= window:
            raise ValueError(f"need 1 <= min_calls <= window, got {min_calls} and {window}")
        if not 0 < failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0, got {cooldown}")
        self.window = window
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.cooldown = cooldown
        self._clock = clock
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failed
        self._failed = 0
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
        if self.state == self.HALF_OPEN:
            self._close()
        elif self.state == self.CLOSED:
            self._record(False)

    def failure(self) -> None:
        if self.state == self.HALF_OPEN:
            self._open()
        elif self.state == self.CLOSED:
            self._record(True)
            calls = len(self._outcomes)
            if calls >= self.min_calls and self._failed >= self.failure_rate * calls:
                self._open()

    def _record(self, failed: bool) -> None:
        if len(self._outcomes) == self.window:
            self._failed -= self._outcomes[0]
        self._outcomes.append(failed)
        self._failed += failed

    def _open(self) -> None:
        self.state = self.OPEN
        self.opened_total += 1
        self._opened_at = self._clock()
        self._trial_running = False

    def _close(self) -> None:
        self.state = self.CLOSED
        self._trial_running = False
        self._outcomes.clear()
        self._failed = 0

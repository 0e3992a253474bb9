"""Delays between reconnection attempts.

Pure arithmetic, like psycopg_pool's ``AttemptWithBackoff``: the class
constants are the defaults, the caller owns the clock and the sleeping, and
tests can check the sequence without waiting for it.
"""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with jitter, reset once a connection proved healthy.

    The first delay is ``initial``; each further failure multiplies it by
    ``FACTOR`` up to ``maximum``; every delay is spread by ``JITTER`` either
    way, so that many listeners cut off by one server restart do not all
    reconnect in the same instant.
    """

    INITIAL_DELAY = 0.1
    MAX_DELAY = 30.0
    FACTOR = 2.0
    JITTER = 0.1

    def __init__(self, initial: float = INITIAL_DELAY, maximum: float = MAX_DELAY):
        if initial <= 0:
            raise ValueError(f"the initial reconnect delay must be > 0, got {initial}")
        if maximum < initial:
            raise ValueError(
                f"the maximum reconnect delay ({maximum}) is below the initial"
                f" one ({initial})"
            )
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def next_delay(self) -> float:
        """How long to wait after one more failure."""
        delay = self._delay
        self._delay = min(self._delay * self.FACTOR, self.maximum)
        return delay * (1.0 + self.JITTER * (2.0 * random.random() - 1.0))

    def reset(self) -> None:
        """Start again from the initial delay, after a connection that held."""
        self._delay = self.initial

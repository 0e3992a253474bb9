"""Reconnect delays: pure arithmetic, checked without waiting."""

from __future__ import annotations

import pytest

from classic.pg.listener import Listener
from classic.pg.listener._backoff import Backoff


def test_defaults():
    assert Backoff.INITIAL_DELAY == 0.1
    assert Backoff.MAX_DELAY == 30.0
    assert Backoff.JITTER == 0.1


def test_delays_double_within_jitter_up_to_the_maximum():
    backoff = Backoff(0.1, 1.0)
    expected = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for base in expected:
        assert base * 0.9 <= backoff.next_delay() <= base * 1.1


def test_reset_starts_over():
    backoff = Backoff(0.5, 10.0)
    for _ in range(4):
        backoff.next_delay()
    backoff.reset()
    assert 0.45 <= backoff.next_delay() <= 0.55


def test_jitter_spreads_listeners():
    delays = {Backoff(1.0, 1.0).next_delay() for _ in range(20)}
    assert len(delays) > 1


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1), (-1, 1), (2, 1)])
def test_bad_delays_are_refused(factory, initial, maximum):
    with pytest.raises(ValueError, match="reconnect delay"):
        Listener(factory, reconnect_delay=initial, max_reconnect_delay=maximum)

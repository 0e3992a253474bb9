"""Zero-gap rotation, ``rotate()`` and ``max_connection_age``, on the real server."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener import hookimpl
from classic.pg.listener.testing import WAIT, notify, wait_until


class Numbers:
    """A callback that keeps the numbers it was sent, in arrival order."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def __call__(self, n: Notify) -> None:
        with self._changed:
            self.got.append(int(n.payload))
            self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.got) >= count, WAIT), (
                f"{len(self.got)} of {count} arrived"
            )


class Sender:
    """Numbered notifications in batches, from a thread, until stopped."""

    def __init__(self, dsn: str, channel: str) -> None:
        self.sent = 0
        self._dsn, self._channel = dsn, channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send)

    def _send(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.wait(0.002):
                first = self.sent
                notify(conn, self._channel, *(str(first + i) for i in range(50)))
                self.sent = first + 50

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(WAIT)


class Hooks:
    def __init__(self) -> None:
        self.connected = 0
        self.reconnected = 0
        self.disconnected = 0

    @hookimpl
    def listener_connected(self) -> None:
        self.connected += 1

    @hookimpl
    def listener_reconnected(self) -> None:
        self.reconnected += 1

    @hookimpl
    def listener_disconnected(self) -> None:
        self.disconnected += 1


@pytest.mark.parametrize("max_workers", [0, 1])
def test_rotate_under_traffic_loses_and_doubles_nothing(
    make_listener, dsn, conn, channel, max_workers
):
    hooks = Hooks()
    caught: list[str] = []
    listener = make_listener(max_workers=max_workers, plugins=[hooks])
    numbers = Numbers()
    listener.add_callback(numbers, channel, catch_up=caught.append)
    listener.start()
    wait_until(lambda: listener.stats().connected, "the connection")
    pids = {listener.backend_pid}
    with Sender(dsn, channel) as sender:
        for _ in range(10):
            assert listener.rotate().result(WAIT) is None
            pids.add(listener.backend_pid)
    numbers.wait_for(sender.sent)
    # One worker, or inline: the server's order is kept, so the list is
    # exactly 0..sent-1: nothing lost, nothing twice, nothing reordered.
    assert numbers.got == list(range(sender.sent))
    assert len(pids) == 11, "each rotation brings a new backend"
    # Not a reconnection: no catch-up, no hook, no count.
    assert listener.reconnects == 0
    assert caught == [channel]
    assert (hooks.connected, hooks.reconnected, hooks.disconnected) == (1, 0, 0)

    # The old sessions are gone from the server (each ends as its connection
    # closes, which the server notices a moment later).
    def alive() -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
        ).fetchone()
        assert row is not None
        return int(row[0])

    wait_until(lambda: alive() == 1, "the old sessions to end")


def test_failed_rotation_leaves_the_old_connection_serving(
    make_listener, dsn, conn, channel
):
    attempts = 0

    def factory() -> psycopg.Connection[Any]:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            raise psycopg.OperationalError("no second connection today")
        return psycopg.connect(dsn, autocommit=True)

    listener = make_listener(factory, max_workers=0)
    numbers = Numbers()
    listener.add_callback(numbers, channel)
    listener.start()
    wait_until(lambda: listener.stats().connected, "the connection")
    pid = listener.backend_pid
    with pytest.raises(psycopg.OperationalError, match="no second connection"):
        listener.rotate().result(WAIT)
    assert listener.backend_pid == pid
    notify(conn, channel, "1", "2")
    numbers.wait_for(2)
    assert numbers.got == [1, 2]


def test_max_connection_age_rotates_by_itself(make_listener, dsn, channel):
    listener = make_listener(max_workers=0, max_connection_age=0.3)
    numbers = Numbers()
    listener.add_callback(numbers, channel)
    listener.start()
    wait_until(lambda: listener.stats().connected, "the connection")
    first = listener.backend_pid
    with Sender(dsn, channel) as sender:
        wait_until(
            lambda: listener.backend_pid not in (None, first), "an automatic rotation"
        )
    numbers.wait_for(sender.sent)
    assert numbers.got == list(range(sender.sent))
    assert listener.reconnects == 0


def test_rotate_is_refused_once_stopped(make_listener):
    listener = make_listener()
    listener.start()
    listener.stop()
    listener.join(WAIT)
    with pytest.raises(Exception, match="stopped"):
        listener.rotate().result(WAIT)


def test_bad_max_connection_age_is_refused(make_listener):
    with pytest.raises(ValueError, match="max_connection_age"):
        make_listener(max_connection_age=0)

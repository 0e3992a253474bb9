"""Faults injected for real: killed backends, a restarted server, a network
that refuses or swallows everything, a factory that fails; hostile input and
concurrent callers.

Every fault test measures how long the listener took to notice and to recover
and records it in ``MEASURED``, printed at the end of the module (``-s``
shows it): it is the fault matrix of the resilience issue.
"""

from __future__ import annotations

import queue
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener import (
    Listener,
    ListenerStopped,
    ReconnectFailed,
    hookimpl,
)
from classic.pg.listener.testing import WAIT, notify, wait_until
from fix_proxy import Proxy
from fix_server import ThrowawayServer

MEASURED: dict[str, float] = {}
"""Fault -> seconds, filled by the tests, printed at the end of the module."""

FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
"""Backoff small enough for tests; the defaults are asserted in the unit tests."""


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    yield
    if MEASURED:
        print("\nfault matrix (seconds):")
        for what, seconds in MEASURED.items():
            print(f"  {what:<60} {seconds:7.3f}")


class Inbox:
    """A callback that queues what it receives, for the test thread to wait on."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Notify] = queue.Queue()

    def __call__(self, notify: Notify) -> None:
        self.queue.put(notify)

    def get(self) -> Notify:
        return self.queue.get(timeout=WAIT)

    def payloads(self, count: int) -> list[str]:
        return [self.get().payload for _ in range(count)]

    def empty(self) -> bool:
        return self.queue.empty()


class Signals:
    """A plugin recording the connection lifecycle, with the time of each event."""

    def __init__(self) -> None:
        self.disconnected = threading.Event()
        self.reconnected = threading.Event()
        self.on_reconnect = threading.Event()
        self.times: dict[str, float] = {}
        self.errors: list[BaseException] = []

    @hookimpl
    def listener_disconnected(self, listener: Listener, error: BaseException) -> None:
        self.errors.append(error)
        self.times.setdefault("disconnected", time.monotonic())
        self.disconnected.set()

    @hookimpl
    def listener_reconnected(self, listener: Listener, connection: Any) -> None:
        self.times.setdefault("reconnected", time.monotonic())
        self.reconnected.set()

    def reconnect_callback(self) -> None:
        self.times.setdefault("on_reconnect", time.monotonic())
        self.on_reconnect.set()

    def reset(self) -> None:
        for event in (self.disconnected, self.reconnected, self.on_reconnect):
            event.clear()
        self.times.clear()


class Factory:
    """Wraps a connection factory: counts and times calls, fails on demand."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], failures: int = 0
    ):
        self._connect = connect
        self.failures = failures
        self.calls: list[float] = []
        self._changed = threading.Condition()

    def __call__(self) -> psycopg.Connection[Any]:
        with self._changed:
            self.calls.append(time.monotonic())
            self._changed.notify_all()
            failing = self.failures != 0
            if self.failures > 0:
                self.failures -= 1
        if failing:
            raise psycopg.OperationalError("injected: the database is down")
        return self._connect()

    def wait_calls(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, WAIT), (
                f"{len(self.calls)} connection attempts, expected {count}"
            )


def started(listener: Listener, inbox: Inbox, channel: str, conn: Any) -> None:
    """Start ``listener`` with ``inbox`` on ``channel`` and prove delivery."""
    future = listener.add_callback(inbox, channel)
    listener.start()
    future.result(WAIT)
    notify(conn, channel, "hello")
    assert inbox.get().payload == "hello"


# -- the relay itself -----------------------------------------------------------


def test_proxy_blackhole_swallows_and_restores(proxy, proxy_dsn):
    """The fixture proved stop/start; this proves the half-open mode."""
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        proxy.blackhole()
        conn.pgconn.send_query(b"SELECT 42")
        conn.pgconn.flush()
        wait_until(lambda: proxy.held() > 0, "the query to be held")
        assert proxy.connections == 1  # the socket stays open
        proxy.restore()
        with selectors.DefaultSelector() as selector:
            selector.register(conn.pgconn.socket, selectors.EVENT_READ)
            while conn.pgconn.is_busy():
                assert selector.select(WAIT)
                conn.pgconn.consume_input()
        result = conn.pgconn.get_result()
        assert result is not None
        assert result.get_value(0, 0) == b"42"
        assert conn.pgconn.get_result() is None


# -- connection loss ------------------------------------------------------------


def test_terminated_backend_reconnects_and_signals(make_listener, conn, channel, dsn):
    signals = Signals()
    inbox = Inbox()
    sent_at_signal = threading.Event()

    def on_reconnect() -> None:
        signals.reconnect_callback()
        # Sent while the application would start its catch-up: must arrive.
        with psycopg.connect(dsn, autocommit=True) as other:
            notify(other, channel, "at-signal")
        sent_at_signal.set()

    # Inline, so that the order of arrival is the order of the callbacks.
    listener = make_listener(
        max_workers=0, on_reconnect=on_reconnect, plugins=[signals], **FAST
    )
    started(listener, inbox, channel, conn)
    pid = listener.backend_pid
    assert pid is not None

    killed = time.monotonic()
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert signals.on_reconnect.wait(WAIT)
    assert sent_at_signal.wait(WAIT)
    assert signals.reconnected.is_set()
    assert signals.disconnected.is_set()
    assert listener.reconnects == 1
    assert listener.backend_pid not in (None, pid)
    MEASURED["pg_terminate_backend: detected"] = signals.times["disconnected"] - killed
    MEASURED["pg_terminate_backend: reconnected"] = (
        signals.times["on_reconnect"] - killed
    )

    notify(conn, channel, *map(str, range(100)))
    assert inbox.payloads(101) == ["at-signal", *map(str, range(100))]
    assert inbox.empty()


def test_server_restart(throwaway: ThrowawayServer, make_listener):
    signals = Signals()
    factory = Factory(
        lambda: psycopg.connect(throwaway.dsn, autocommit=True, connect_timeout=2)
    )
    channels = ["restart_a", "Restart B", 'restart "c"']
    inboxes = {c: Inbox() for c in channels}
    listener = make_listener(
        factory, plugins=[signals], on_reconnect=signals.reconnect_callback, **FAST
    )
    futures = [listener.add_callback(inboxes[c], c) for c in channels]
    listener.start()
    for future in futures:
        future.result(WAIT)

    with psycopg.connect(throwaway.dsn, autocommit=True) as conn:
        for c in channels:
            notify(conn, c, "before")
    assert all(inboxes[c].get().payload == "before" for c in channels)

    stopping = time.monotonic()
    throwaway.stop()
    assert signals.disconnected.wait(WAIT)
    detected = signals.times["disconnected"] - stopping
    # It keeps trying while the server is down, and does not end.
    attempts = len(factory.calls)
    factory.wait_calls(attempts + 3)
    assert listener.is_alive()
    assert listener.backend_pid is None

    starting = time.monotonic()
    throwaway.start()
    up = time.monotonic()
    assert signals.on_reconnect.wait(WAIT)
    assert listener.reconnects == 1
    assert set(listener.channels) == set(channels)
    with psycopg.connect(throwaway.dsn, autocommit=True) as conn:
        # Every channel is listened to again, on the new backend.
        for c in channels:
            notify(conn, c, "after")
    assert all(inboxes[c].get().payload == "after" for c in channels)
    MEASURED["server restart (pg_ctl stop -m fast): detected"] = detected
    MEASURED["server restart: pg_ctl start took"] = up - starting
    MEASURED["server restart: reconnected after server up"] = (
        signals.times["on_reconnect"] - up
    )


def test_started_while_database_down(
    proxy: Proxy, proxy_factory, make_listener, conn, channel
):
    proxy.stop()
    factory = Factory(proxy_factory)
    early, late = Inbox(), Inbox()
    listener = make_listener(factory, **FAST)
    before = listener.add_callback(early, f"{channel}_early")
    listener.start()
    factory.wait_calls(3)  # refused, refused, refused...
    during = listener.add_callback(late, f"{channel}_late")
    assert listener.is_alive()
    assert not before.done()
    assert not during.done()
    assert listener.backend_pid is None

    up = time.monotonic()
    proxy.start()
    before.result(WAIT)
    during.result(WAIT)
    MEASURED["database down at start: connected after it came up"] = (
        time.monotonic() - up
    )
    assert listener.reconnects == 0  # nothing was listened to, nothing missed
    notify(conn, f"{channel}_early", "e")
    notify(conn, f"{channel}_late", "l")
    assert early.get().payload == "e"
    assert late.get().payload == "l"


def test_blackhole_detected_by_ping_and_recovered(
    proxy: Proxy, proxy_factory, make_listener, conn, channel
):
    signals = Signals()
    inbox = Inbox()
    period, timeout = 0.5, 0.5
    listener = make_listener(
        Factory(proxy_factory),
        ping_period=period,
        ping_timeout=timeout,
        plugins=[signals],
        on_reconnect=signals.reconnect_callback,
        **FAST,
    )
    started(listener, inbox, channel, conn)

    cut = time.monotonic()
    proxy.blackhole()
    assert signals.disconnected.wait(WAIT)
    detected = signals.times["disconnected"] - cut
    assert detected <= period + timeout + 0.25, detected
    assert "did not answer" in str(signals.errors[0].__cause__ or signals.errors[0])
    notify(conn, channel, "lost")  # sent while disconnected: PostgreSQL drops it

    restored = time.monotonic()
    proxy.restore()
    assert signals.on_reconnect.wait(WAIT)
    MEASURED["blackhole (ping 0.5 s + timeout 0.5 s): detected"] = detected
    MEASURED["blackhole: reconnected after forwarding resumed"] = (
        signals.times["on_reconnect"] - restored
    )
    notify(conn, channel, "back")
    assert inbox.get().payload == "back"
    assert listener.reconnects == 1


# -- a failing factory ----------------------------------------------------------


def test_factory_fails_then_succeeds_with_growing_delays(
    factory, make_listener, conn, channel
):
    flaky = Factory(factory, failures=4)
    inbox = Inbox()
    listener = make_listener(flaky, reconnect_delay=0.05, max_reconnect_delay=1.0)
    first = time.monotonic()
    started(listener, inbox, channel, conn)
    MEASURED["factory raising 4 times: connected after"] = time.monotonic() - first
    assert len(flaky.calls) == 5
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert expected * 0.85 <= gap <= expected * 1.1 + 0.1, gaps
    assert listener.reconnects == 0


def test_factory_failing_is_no_tight_loop(factory, make_listener):
    failing = Factory(factory, failures=-1)
    listener = make_listener(failing, reconnect_delay=0.05, max_reconnect_delay=0.2)
    listener.start()
    failing.wait_calls(1)
    window_start = len(failing.calls)
    failing.wait_calls(window_start + 5)
    # 0.05, 0.1, 0.2, 0.2, 0.2 s (+-10%) between them: at least ~0.67 s.
    assert failing.calls[-1] - failing.calls[window_start - 1] >= 0.6
    assert listener.is_alive()


def test_max_reconnect_attempts_ends_run(factory, make_listener):
    failing = Factory(factory, failures=-1)
    listener = make_listener(failing, max_reconnect_attempts=3, reconnect_delay=0.01)
    pending = listener.add_callback(Inbox(), "never")
    with pytest.raises(ReconnectFailed) as info:
        listener.run()
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert len(failing.calls) == 3
    assert listener.exception is info.value
    assert isinstance(pending.exception(WAIT), ReconnectFailed)
    late = listener.add_callback(Inbox(), "never")
    assert isinstance(late.exception(0), ListenerStopped)


def test_max_reconnect_attempts_ends_background_thread(factory, make_listener):
    failing = Factory(factory, failures=-1)
    listener = make_listener(failing, max_reconnect_attempts=2, reconnect_delay=0.01)
    pending = listener.add_callback(Inbox(), "never")
    listener.start()
    listener.join(WAIT)
    assert not listener.is_alive()
    assert isinstance(listener.exception, ReconnectFailed)
    assert isinstance(pending.exception(WAIT), ReconnectFailed)


def test_attempt_limit_counts_failed_attempts_after_a_loss(
    factory, make_listener, conn, channel
):
    """``max_reconnect_attempts=2`` survives one failed attempt after a loss."""
    signals = Signals()
    flaky = Factory(factory)
    inbox = Inbox()
    listener = make_listener(
        flaky,
        max_reconnect_attempts=2,
        plugins=[signals],
        on_reconnect=signals.reconnect_callback,
        **FAST,
    )
    started(listener, inbox, channel, conn)
    flaky.failures = 1
    conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    assert signals.on_reconnect.wait(WAIT), listener.exception
    assert listener.is_alive()
    assert len(flaky.calls) == 3  # first connection, one failure, reconnection


# -- stop() stays prompt ----------------------------------------------------------

PROMPT = 0.5


def assert_stops_promptly(listener: Listener) -> float:
    stopping = time.monotonic()
    listener.stop()
    listener.join(WAIT)
    took = time.monotonic() - stopping
    assert not listener.is_alive()
    assert took < PROMPT, f"join took {took:.3f} s"
    return took


def test_stop_while_backing_off(factory, make_listener):
    failing = Factory(factory, failures=-1)
    listener = make_listener(failing, reconnect_delay=30, max_reconnect_delay=30)
    listener.start()
    failing.wait_calls(1)
    MEASURED["stop() while backing off (30 s delay)"] = assert_stops_promptly(listener)
    assert len(failing.calls) == 1


def test_stop_while_connecting_to_blackhole(proxy: Proxy, proxy_factory, make_listener):
    """The factory runs in the serving thread (the specification says so) and
    psycopg.connect() cannot be interrupted: stop() waits for the factory, as
    long as the DSN's connect_timeout (2 s here) at most, then tries no more."""
    proxy.blackhole()
    connecting = Factory(proxy_factory)
    listener = make_listener(connecting, **FAST)
    listener.start()
    connecting.wait_calls(1)
    wait_until(lambda: proxy.held() > 0, "the startup packet to be held")
    stopping = time.monotonic()
    listener.stop()
    listener.join(WAIT)
    took = time.monotonic() - stopping
    MEASURED["stop() while connecting through a blackhole (connect_timeout 2)"] = took
    assert not listener.is_alive()
    assert took < 2 + PROMPT, f"join took {took:.3f} s"
    assert len(connecting.calls) == 1
    assert listener.exception is None


def test_stop_while_pinging_blackhole(
    proxy: Proxy, proxy_factory, make_listener, conn, channel
):
    signals = Signals()
    listener = make_listener(
        proxy_factory, ping_period=0.1, ping_timeout=5, plugins=[signals]
    )
    started(listener, Inbox(), channel, conn)
    proxy.blackhole()
    wait_until(lambda: proxy.held() > 0, "the ping to be held")
    pending = listener.add_callback(Inbox(), "never_applied")
    MEASURED["stop() while a ping hangs on a blackhole"] = assert_stops_promptly(
        listener
    )
    assert listener.exception is None
    assert not signals.disconnected.is_set()  # stopping is no connection loss
    assert isinstance(pending.exception(WAIT), ListenerStopped)


def test_stop_while_listen_hangs_on_blackhole(
    proxy: Proxy, proxy_factory, make_listener, conn, channel
):
    listener = make_listener(proxy_factory, ping_timeout=5)
    started(listener, Inbox(), channel, conn)
    proxy.blackhole()
    pending = listener.add_callback(Inbox(), "hanging_listen")
    wait_until(lambda: proxy.held() > 0, "the LISTEN to be held")
    MEASURED["stop() while a LISTEN hangs on a blackhole"] = assert_stops_promptly(
        listener
    )
    assert listener.exception is None
    assert isinstance(pending.exception(WAIT), ListenerStopped)


def test_stop_while_backlog_full(make_listener, conn, channel):
    gate = threading.Event()
    entered = threading.Event()

    def stuck(notify: Notify) -> None:
        entered.set()
        gate.wait(WAIT)

    listener = make_listener(max_workers=1, max_backlog=10)
    future = listener.add_callback(stuck, channel)
    listener.start()
    future.result(WAIT)
    notify(conn, channel, *map(str, range(1000)))
    assert entered.wait(WAIT)
    wait_until(lambda: listener.backlog >= 10, "a full backlog")

    stopping = time.monotonic()
    listener.stop()
    # The serving thread lets go of the connection at once, callbacks stuck...
    wait_until(lambda: listener.backend_pid is None, "the connection to close", PROMPT)
    closed = time.monotonic() - stopping
    # ... and join() returns once the accepted callbacks have run.
    gate.set()
    listener.join(WAIT)
    assert time.monotonic() - stopping < PROMPT
    MEASURED["stop() with a full backlog: connection closed"] = closed
    assert listener.backlog == 0


# -- hostile input ------------------------------------------------------------------

HOSTILE_CHANNELS = [
    'say "hi"',
    "with space",
    "MixedCase",
    "ünïcødé ✓ 日本",
    "x" * 63,
    "é" * 31 + "x",  # 63 bytes, 32 characters
    "semi;colon--DROP TABLE x",
]


def test_hostile_channel_names_and_payloads(make_listener, conn):
    inboxes = {c: Inbox() for c in HOSTILE_CHANNELS}
    listener = make_listener(max_workers=0)
    futures = [listener.add_callback(inboxes[c], c) for c in HOSTILE_CHANNELS]
    listener.start()
    for future in futures:
        future.result(WAIT)
    assert set(listener.channels) == set(HOSTILE_CHANNELS)

    payloads = ["", "x" * 7999, "é" * 3999 + "x", "héllo ✓ 日本\n\t\"quoted\" \\ 'q'"]
    for c in HOSTILE_CHANNELS:
        notify(conn, c, *payloads)
    for c in HOSTILE_CHANNELS:
        got = [inboxes[c].get() for _ in payloads]
        assert [n.channel for n in got] == [c] * len(payloads)
        assert [n.payload for n in got] == payloads
    # 8,000 bytes is PostgreSQL's limit, refused when sent, not by the listener.
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        notify(conn, HOSTILE_CHANNELS[0], "x" * 8000)


@pytest.mark.parametrize(
    ("callback", "name", "error"),
    [
        (None, "ok", TypeError),
        ("not callable", "ok", TypeError),
        (print, 123, TypeError),
        (print, b"bytes", TypeError),
        (print, None, TypeError),
        (print, "", ValueError),
        (print, "nul\0inside", ValueError),
        (print, "x" * 64, ValueError),
        (print, "é" * 32, ValueError),  # 32 characters, 64 bytes
    ],
)
def test_invalid_arguments_leave_registrations_working(
    make_listener, conn, channel, callback, name, error
):
    inbox = Inbox()
    listener = make_listener()
    started(listener, inbox, channel, conn)
    with pytest.raises(error):
        listener.add_callback(callback, name)
    with pytest.raises(error):
        listener.remove_callback(callback, name)
    assert list(listener.channels) == [channel]
    notify(conn, channel, "still")
    assert inbox.get().payload == "still"


# -- concurrency and scale ---------------------------------------------------------


def test_concurrent_add_remove_while_notifications_flow(make_listener, dsn, channel):
    threads, per_thread = 16, 1000
    channels = [f"{channel}_{i}" for i in range(20)]
    emptied = set(channels[:4])  # every callback removed: UNLISTENed
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def make_callback(key: int) -> Callable[[Notify], None]:
        def callback(notify: Notify) -> None:
            if notify.payload == "final":
                with lock:
                    calls[key] = calls.get(key, 0) + 1

        return callback

    listener = make_listener(max_workers=4)
    listener.start()
    expected: dict[str, set[Callable[[Notify], None]]] = {c: set() for c in channels}
    keys: dict[Callable[[Notify], None], int] = {}
    futures: list[Future[None]] = []
    flowing = threading.Event()
    done = threading.Event()
    # Paced by the listener, not by the clock: the server answers each LISTEN
    # only after the notifications queued before it, and each noise
    # notification here runs hundreds of callbacks. A sender faster than
    # they run (under coverage's tracer, or on a slow machine) would hold
    # the changes and the final notifications back behind an unbounded
    # queue. A round ends on the pace channel, so at most one is pending.
    pace, paced = f"{channel}_pace", threading.Event()
    listener.add_callback(lambda notify: paced.set(), pace).result(WAIT)

    def sender() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not done.is_set():
                paced.clear()
                conn.execute(
                    "SELECT pg_notify(c, 'noise') FROM unnest(%s::text[]) c",
                    ([*channels, pace],),
                )
                flowing.set()
                paced.wait(WAIT)

    def worker(t: int) -> None:
        mine: list[tuple[Callable[[Notify], None], str]] = []
        local: list[Future[None]] = []
        for i in range(per_thread):
            key = t * per_thread + i
            callback = make_callback(key)
            c = channels[key % len(channels)]
            keys[callback] = key
            mine.append((callback, c))
            local.append(listener.add_callback(callback, c))
        for i, (callback, c) in enumerate(mine):
            if c in emptied or (i // len(channels)) % 2 == 0:
                local.append(listener.remove_callback(callback, c))
            else:
                with lock:
                    expected[c].add(callback)
        with lock:
            futures.extend(local)

    noise = threading.Thread(target=sender, name="noise")
    noise.start()
    try:
        assert flowing.wait(WAIT)
        started_at = time.monotonic()
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(WAIT * 3)
        for future in futures:
            future.result(WAIT)  # every future resolves, and successfully
        MEASURED["16 threads x 1,000 adds + removes applied (not a fault)"] = (
            time.monotonic() - started_at
        )
    finally:
        done.set()
        noise.join(WAIT)
    assert len(futures) > threads * per_thread  # adds, and most removes

    state = listener.channels
    assert set(state) == {c for c in channels if c not in emptied} | {pace}
    del state[pace]
    for c, callbacks in state.items():
        assert len(callbacks) == len(set(callbacks))
        assert set(callbacks) == expected[c]

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_notify(c, 'final') FROM unnest(%s::text[]) c", (channels,)
        )
    remaining = {keys[cb] for cbs in expected.values() for cb in cbs}
    wait_until(lambda: len(calls) >= len(remaining), "the final notifications")
    listener.stop()
    listener.join(WAIT)
    assert set(calls) == remaining
    assert set(calls.values()) == {1}


def test_five_thousand_channels(make_listener, conn, channel):
    channels = [f"{channel}_{i}" for i in range(5000)]
    received: set[str] = set()
    all_in = threading.Event()

    def callback(notify: Notify) -> None:
        received.add(notify.channel)
        if len(received) == len(channels):
            all_in.set()

    listener = make_listener(max_workers=0)
    listener.start()
    began = time.monotonic()
    futures = [listener.add_callback(callback, c) for c in channels]
    for future in futures:
        future.result(WAIT)
    MEASURED["5,000 channels LISTENed (not a fault)"] = time.monotonic() - began
    conn.execute("SELECT pg_notify(c, c) FROM unnest(%s::text[]) c", (channels,))
    assert all_in.wait(WAIT)
    assert len(listener.channels) == 5000

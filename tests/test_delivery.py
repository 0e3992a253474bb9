"""What ``add_callback(catch_up=...)`` promises, proved against the real server.

A catch-up runs once its channel's ``LISTEN`` is acknowledged: at the first
registration, after every reconnection and after every re-``LISTEN``. No
notification of that channel read after that ``LISTEN`` reaches the callback
before the catch-up has returned; other channels, and other catch-ups, do not
wait for it (in the pool); a catch-up that raises costs nothing but a log
line and a hook call. Sessions are verified, not assumed: a session that
stopped listening is listened to again, and a pooler that hands over another
server session ends ``run()`` with ``SessionNotKept``.

The catch-ups here block on an event while notifications are sent, so that
"held until it returned" is observed, not inferred from timing: each test
records catch-ups and deliveries in one ``Journal``, in the order they happened.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener import AsyncListener, Listener, SessionNotKept, hookimpl
from classic.pg.listener.testing import WAIT, HookWaiter, notify, wait_until
from fix_pgbouncer import PgBouncer

FAST: dict[str, Any] = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
"""Backoff small enough for tests; the defaults are asserted in the unit tests."""

ORDERED: dict[str, Any] = (
    {"order_by": "channel"}
    if "order_by" in inspect.signature(Listener).parameters
    else {}
)
"""The pool keeps a channel's order only with ``order_by="channel"`` (when the
listener has it); without it, the pool's assertions are order-free."""

MODES = [
    pytest.param({"max_workers": 0}, id="inline"),
    pytest.param({"max_workers": 4, **ORDERED}, id="pool"),
]


def in_order(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("max_workers") == 0 or "order_by" in kwargs


class Journal:
    """Catch-ups and deliveries, in the order they happened, from every thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.threads: dict[str, set[str]] = {"catch_up": set(), "callback": set()}
        self._changed = threading.Condition()

    def record(self, kind: str, channel: str, what: str = "") -> None:
        with self._changed:
            self.events.append((kind, channel, what))
            self.threads.setdefault(kind, set()).add(threading.current_thread().name)
            self._changed.notify_all()

    def callback(self, notify: Notify) -> None:
        self.record("callback", notify.channel, notify.payload)

    def payloads(self, channel: str) -> list[str]:
        with self._changed:
            return [
                what
                for kind, ch, what in self.events
                if kind == "callback" and ch == channel
            ]

    def count(self, kind: str, channel: str) -> int:
        with self._changed:
            return sum(1 for k, ch, _ in self.events if k == kind and ch == channel)

    def wait(self, kind: str, channel: str, count: int, timeout: float = WAIT) -> None:
        with self._changed:
            assert self._changed.wait_for(
                lambda: (
                    sum(1 for k, ch, _ in self.events if k == kind and ch == channel)
                    >= count
                ),
                timeout,
            ), f"{kind} on {channel}: fewer than {count}: {self.events[-5:]}"

    def after_catch_up(self, channel: str, number: int) -> list[str]:
        """The payloads of ``channel`` delivered after its ``number``-th catch-up
        returned (1-based), in order."""
        with self._changed:
            seen = 0
            out: list[str] = []
            for kind, ch, what in self.events:
                if ch != channel:
                    continue
                if kind == "returned":
                    seen += 1
                elif kind == "callback" and seen >= number:
                    out.append(what)
            return out


class Gate:
    """A catch-up that blocks until ``release()``, recording when it runs."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.started = threading.Semaphore(0)
        self._released = threading.Event()

    def __call__(self, channel: str) -> None:
        self.journal.record("catch_up", channel)
        self.started.release()
        assert self._released.wait(WAIT), "the test never released the catch-up"
        self.journal.record("returned", channel)

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=WAIT), "the catch-up did not start"

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.clear()


class CatchUpHook:
    """A plugin recording ``listener_catch_up_done`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, BaseException | None, str]] = []
        self._changed = threading.Condition()

    @hookimpl
    def listener_catch_up_done(
        self, channel: str, catch_up: object, error: BaseException | None
    ) -> None:
        with self._changed:
            self.calls.append(
                (channel, catch_up, error, threading.current_thread().name)
            )
            self._changed.notify_all()

    def wait(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, WAIT), (
                f"{len(self.calls)} catch-ups done, expected {count}"
            )


def payloads(count: int, start: int = 0) -> list[str]:
    return [str(n) for n in range(start, start + count)]


def terminate(conn: psycopg.Connection[Any], pid: int | None) -> None:
    assert pid is not None
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- the channel waits for its catch-up ------------------------------------------------


@pytest.mark.parametrize("kwargs", MODES)
def test_notifications_wait_for_the_catch_up(make_listener, conn, channel, kwargs):
    """First registration, then after a reconnection: nothing of the channel is
    delivered before the catch-up returned; then everything, in order."""
    journal = Journal()
    gate = Gate(journal)
    waiter = HookWaiter()
    listener = make_listener(plugins=[waiter], **FAST, **kwargs)
    listener.start()
    future = listener.add_callback(journal.callback, channel, catch_up=gate)
    gate.wait_started()
    # The future does not wait for the catch-up.
    assert future.result(WAIT) is None

    def received(count: int) -> bool:
        return bool(listener.stats().received.get(channel, 0) >= count)

    for connection in (1, 2):
        notify(conn, channel, *payloads(50, 100 * connection))
        if kwargs["max_workers"]:
            # Read by the serving thread, held back from the callback.
            wait_until(partial(received, 50 * connection), "the notifications read")
        assert journal.count("callback", channel) == 50 * (connection - 1)
        gate.release()
        journal.wait("callback", channel, 50 * connection)
        delivered = journal.after_catch_up(channel, connection)
        expected = payloads(50, 100 * connection)
        assert sorted(delivered) == sorted(expected)
        if in_order(kwargs):
            assert delivered == expected
        if connection == 1:
            gate.close()
            terminate(conn, listener.backend_pid)
            waiter.wait("listener_reconnected")
            gate.wait_started()

    if kwargs["max_workers"] == 0:
        assert journal.threads["catch_up"] == {listener.name}
        assert journal.threads["callback"] == {listener.name}
    else:
        assert listener.name not in journal.threads["catch_up"]
        assert listener.name not in journal.threads["callback"]


def test_pool_catch_ups_run_side_by_side_and_other_channels_flow(
    make_listener, conn, channel
):
    """Two channels catching up at once, a third delivering meanwhile."""
    journal = Journal()
    gates = {name: Gate(journal) for name in ("a", "b")}
    channels = {name: f"{channel}_{name}" for name in ("a", "b", "c")}
    listener = make_listener(max_workers=4, **ORDERED)
    for name, gate in gates.items():
        listener.add_callback(journal.callback, channels[name], catch_up=gate)
    ready = listener.add_callback(journal.callback, channels["c"])
    listener.start()
    ready.result(WAIT)
    # Both are running now: neither waits for the other.
    gates["a"].wait_started()
    gates["b"].wait_started()

    for ch in channels.values():
        notify(conn, ch, *payloads(20))
    journal.wait("callback", channels["c"], 20)
    assert journal.count("callback", channels["a"]) == 0
    assert journal.count("callback", channels["b"]) == 0

    gates["b"].release()
    journal.wait("callback", channels["b"], 20)
    assert journal.count("callback", channels["a"]) == 0
    gates["a"].release()
    journal.wait("callback", channels["a"], 20)
    for ch in channels.values():
        assert sorted(journal.payloads(ch)) == sorted(payloads(20))


@pytest.mark.parametrize("kwargs", MODES)
def test_raising_catch_up_is_logged_reported_and_delivery_goes_on(
    make_listener, conn, channel, kwargs, caplog
):
    journal = Journal()
    hook = CatchUpHook()
    waiter = HookWaiter()
    raised = itertools.count(1)

    def catch_up(name: str) -> None:
        journal.record("catch_up", name, str(next(raised)))
        raise RuntimeError(f"catch-up of {name} failed")

    listener = make_listener(plugins=[hook, waiter], **FAST, **kwargs)
    listener.add_callback(journal.callback, channel, catch_up=catch_up)
    listener.start()
    hook.wait(1)
    notify(conn, channel, *payloads(10))
    journal.wait("callback", channel, 10)

    terminate(conn, listener.backend_pid)
    waiter.wait("listener_reconnected")
    hook.wait(2)
    notify(conn, channel, *payloads(10, 10))
    journal.wait("callback", channel, 20)

    assert sorted(journal.payloads(channel), key=int) == payloads(20)
    for name, reported, error, _ in hook.calls:
        assert name == channel
        assert reported is catch_up
        assert isinstance(error, RuntimeError)
    logged = [
        r
        for r in caplog.records
        if r.name == "classic.pg.listener" and "catch-up" in r.getMessage()
    ]
    assert len(logged) >= 2
    assert all(r.levelno == logging.ERROR and r.exc_info for r in logged)
    assert channel in logged[0].getMessage()


@pytest.mark.parametrize("kwargs", MODES)
def test_catch_ups_run_again_after_each_terminated_backend(
    make_listener, conn, channel, kwargs
):
    hook = CatchUpHook()
    waiter = HookWaiter()
    journal = Journal()
    listener = make_listener(plugins=[hook, waiter], **FAST, **kwargs)
    listener.add_callback(
        journal.callback, channel, catch_up=lambda ch: journal.record("catch_up", ch)
    )
    listener.start()
    hook.wait(1)
    for kill in range(1, 4):
        terminate(conn, listener.backend_pid)
        waiter.wait("listener_reconnected", kill)
        hook.wait(1 + kill)
        notify(conn, channel, str(kill))
        journal.wait("callback", channel, kill)
    assert listener.reconnects == 3
    assert [call[0] for call in hook.calls] == [channel] * 4
    assert journal.payloads(channel) == ["1", "2", "3"]


# -- AsyncListener -----------------------------------------------------------------


@pytest.mark.parametrize("max_concurrency", [None, 0], ids=["tasks", "inline"])
def test_async_notifications_wait_for_the_catch_up(dsn, conn, channel, max_concurrency):
    """The same guarantee with coroutine catch-ups, in worker tasks or inline."""
    journal = Journal()
    hook = CatchUpHook()
    waiter = HookWaiter()

    async def main() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def catch_up(name: str) -> None:
            journal.record("catch_up", name)
            started.set()
            await asyncio.wait_for(release.wait(), WAIT)
            journal.record("returned", name)

        async def callback(notify: Notify) -> None:
            await asyncio.sleep(0)
            journal.callback(notify)

        async def send(*values: str) -> None:
            await asyncio.to_thread(notify, conn, channel, *values)

        listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
            max_concurrency,
            plugins=[hook, waiter],
            **FAST,
        )
        async with listener:
            future = listener.add_callback(callback, channel, catch_up=catch_up)
            await asyncio.wait_for(started.wait(), WAIT)
            await asyncio.wait_for(future, WAIT)
            for connection in (1, 2):
                await send(*payloads(30, 100 * connection))
                if max_concurrency is None:
                    while listener.stats().received.get(channel, 0) < 30 * connection:
                        await asyncio.sleep(0.005)
                assert journal.count("callback", channel) == 30 * (connection - 1)
                release.set()
                await asyncio.to_thread(
                    journal.wait, "callback", channel, 30 * connection
                )
                delivered = journal.after_catch_up(channel, connection)
                assert sorted(delivered) == payloads(30, 100 * connection)
                if max_concurrency == 0:
                    assert delivered == payloads(30, 100 * connection)
                if connection == 1:
                    release.clear()
                    started.clear()
                    await asyncio.to_thread(terminate, conn, listener.backend_pid)
                    await asyncio.to_thread(waiter.wait, "listener_reconnected")
                    await asyncio.wait_for(started.wait(), WAIT)

    asyncio.run(main())
    assert [call[0] for call in hook.calls] == [channel, channel]
    assert all(call[2] is None for call in hook.calls)


@pytest.mark.parametrize("max_concurrency", [None, 0], ids=["tasks", "inline"])
def test_async_raising_catch_up_is_reported_and_delivery_goes_on(
    dsn, conn, channel, max_concurrency, caplog
):
    hook = CatchUpHook()
    journal = Journal()

    async def catch_up(name: str) -> None:
        await asyncio.sleep(0)
        raise RuntimeError(f"catch-up of {name} failed")

    async def main() -> None:
        listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
            max_concurrency,
            plugins=[hook],
        )
        async with listener:
            await listener.add_callback(journal.callback, channel, catch_up=catch_up)
            await asyncio.to_thread(hook.wait, 1)
            await asyncio.to_thread(notify, conn, channel, *payloads(10))
            await asyncio.to_thread(journal.wait, "callback", channel, 10)

    asyncio.run(main())
    assert sorted(journal.payloads(channel), key=int) == payloads(10)
    assert isinstance(hook.calls[0][2], RuntimeError)
    assert any(
        r.levelno == logging.ERROR and "catch-up" in r.getMessage()
        for r in caplog.records
    )


def test_async_inline_coroutine_callback_needs_no_other_wake_up(dsn, conn, channel):
    """Awaited before the loop waits again, not at the next notification or ping
    (found by these tests; fixed on main meanwhile)."""
    journal = Journal()

    async def callback(notify: Notify) -> None:
        journal.callback(notify)

    async def main() -> None:
        listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True), 0
        )
        async with listener:
            await listener.add_callback(callback, channel)
            await asyncio.to_thread(notify, conn, channel, *payloads(5))
            await asyncio.to_thread(journal.wait, "callback", channel, 5, 2.0)

    asyncio.run(main())
    assert journal.payloads(channel) == payloads(5)


# -- sessions verified -----------------------------------------------------------------


class Unlisten:
    """A plugin that runs ``UNLISTEN *`` on the first connection, as an
    application (or a pooler) might: the session no longer listens."""

    def __init__(self) -> None:
        self.done = threading.Event()

    @hookimpl
    def listener_connected(self, connection: psycopg.Connection[Any]) -> None:
        if not self.done.is_set():
            connection.execute("UNLISTEN *")
            self.done.set()


@pytest.mark.parametrize("kwargs", MODES)
def test_session_that_stopped_listening_is_listened_to_again(
    make_listener, conn, channel, kwargs, caplog
):
    journal = Journal()
    hook = CatchUpHook()
    unlisten = Unlisten()
    others = [f"{channel}_{n}" for n in range(3)]
    listener = make_listener(
        ping_period=0.1, plugins=[unlisten, hook], **FAST, **kwargs
    )
    for ch in [channel, *others]:
        listener.add_callback(
            journal.callback, ch, catch_up=lambda ch: journal.record("returned", ch)
        )
    listener.start()
    assert unlisten.done.wait(WAIT)
    # The first catch-ups, then those of the re-LISTEN found by a ping.
    hook.wait(8)
    for ch in [channel, *others]:
        notify(conn, ch, *payloads(20))
    for ch in [channel, *others]:
        journal.wait("callback", ch, 20)
        assert journal.count("returned", ch) == 2
        assert sorted(journal.payloads(ch), key=int) == payloads(20)
    assert listener.reconnects == 0
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "no longer listened" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert channel in warnings[0]
    assert "4 channels" in warnings[0]
    listened = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
        (listener.backend_pid,),
    ).fetchone()
    assert listened == (1,)


@pytest.mark.parametrize("kwargs", MODES)
def test_relisten_holds_the_channel_until_its_catch_up_returned(
    make_listener, dsn, channel, kwargs
):
    """Notifications keep coming while the session is listened to again: none
    read after the re-LISTEN reaches the callback before the catch-up returned."""
    journal = Journal()
    unlisten = Unlisten()
    hook = CatchUpHook()
    stop = threading.Event()
    sent = itertools.count()

    def sender() -> None:
        with psycopg.connect(dsn, autocommit=True) as other:
            while not stop.is_set():
                notify(other, channel, *(str(next(sent)) for _ in range(20)))

    listener = make_listener(
        ping_period=0.05, plugins=[unlisten, hook], **FAST, **kwargs
    )
    listener.add_callback(
        journal.callback, channel, catch_up=lambda ch: journal.record("returned", ch)
    )
    thread = threading.Thread(target=sender, name="test-sender")
    thread.start()
    try:
        listener.start()
        hook.wait(2)
        journal.wait("callback", channel, journal.count("callback", channel) + 100)
    finally:
        stop.set()
        thread.join(WAIT)
    # Before the re-LISTEN: the numbers read in the connection phase, before
    # the UNLISTEN took effect. After it: none before the second catch-up.
    events = [(k, int(w) if w else -1) for k, ch, w in journal.events]
    second = [i for i, (k, _) in enumerate(events) if k == "returned"][1]
    before = [n for k, n in events[:second] if k == "callback"]
    after = [n for k, n in events[second:] if k == "callback"]
    assert after, "nothing delivered after the re-LISTEN"
    assert not before or max(before) < min(after), (
        f"delivered before the second catch-up returned: {before[-5:]},"
        f" after it: {after[:5]}"
    )


# -- behind PgBouncer -----------------------------------------------------------------


@pytest.fixture
def pgbouncer_load() -> Iterator[Callable[[PgBouncer], None]]:
    """Clients running short transactions through a pooler, until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def client(bouncer: PgBouncer) -> None:
        # No prepared statements: a transaction pooler would hand them to
        # another server session (PgBouncer before 1.21 does not track them).
        with psycopg.connect(
            bouncer.dsn, autocommit=True, prepare_threshold=None
        ) as load:
            while not stop.is_set():
                load.execute("SELECT pg_sleep(0.01)")

    def start(bouncer: PgBouncer) -> None:
        for n in range(4):
            thread = threading.Thread(
                target=client, args=(bouncer,), name=f"test-load-{n}"
            )
            thread.start()
            threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(WAIT)


def test_transaction_pooling_ends_run_with_session_not_kept(
    make_pgbouncer, dsn, pgbouncer_load, make_listener, channel
):
    bouncer = make_pgbouncer(dsn, "transaction")
    pgbouncer_load(bouncer)
    attempts: list[int] = []

    def connect() -> psycopg.Connection[Any]:
        attempts.append(1)
        return psycopg.connect(bouncer.dsn, autocommit=True)

    listener = make_listener(connect, ping_period=0.05, **FAST)
    listener.add_callback(print, channel)
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            listener.run()
        except BaseException as ex:
            errors.append(ex)
        done.set()

    thread = threading.Thread(target=run, name="test-run")
    thread.start()
    assert done.wait(WAIT), "run() did not end behind a transaction pooler"
    thread.join(WAIT)
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, SessionNotKept)
    message = str(error)
    assert "transaction or statement mode" in message
    assert "pool_mode = session" in message
    assert "directly" in message
    assert len(attempts) == 1, "a configuration error is not retried"


def test_session_pooling_works(
    make_pgbouncer, dsn, pgbouncer_load, make_listener, conn, channel
):
    bouncer = make_pgbouncer(dsn, "session")
    pgbouncer_load(bouncer)
    journal = Journal()
    waiter = HookWaiter()
    listener = make_listener(
        lambda: psycopg.connect(bouncer.dsn, autocommit=True),
        ping_period=0.05,
        plugins=[waiter],
    )
    listener.add_callback(journal.callback, channel)
    listener.start()
    waiter.wait("listener_connected")
    waiter.wait("listener_ping", 5)  # each checks the session again
    notify(conn, channel, *payloads(20))
    journal.wait("callback", channel, 20)
    assert sorted(journal.payloads(channel), key=int) == payloads(20)
    assert listener.is_alive()
    assert listener.exception is None

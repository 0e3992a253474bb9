"""AsyncListener against the real server: the specification's tests in async
form, the resilience tests (killed backend, blackhole, restarted server,
failing factory, cancellation), no thread of its own, and a loop that never
stalls.

Every test runs in pytest-asyncio's loop. Notifications are sent from an
``AsyncConnection`` (``anotify``) so that the test never blocks the loop it
observes; the loop-gap test sends its 100,000 from another thread.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
import uvicorn
from psycopg import Notify

from classic.pg.listener import (
    AsyncListener,
    BufferOverflow,
    CallbackNotRegistered,
    ListenerStopped,
    ReconnectFailed,
    hookimpl,
)
from classic.pg.listener._dispatch_async import TaskDispatcher
from classic.pg.listener._sequencing import Delivery, OneChannel
from classic.pg.listener.testing import WAIT
from fix_descriptors import descriptors_above_1024
from fix_proxy import Proxy
from fix_server import ThrowawayServer

pytestmark = pytest.mark.asyncio

FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.2}
"""Backoff small enough for tests (as in test_resilience)."""

MEASURED: dict[str, float] = {}
"""Figures the tests measured, printed at the end of the module (``-s``)."""


@pytest.fixture(scope="module", autouse=True)
def _print_measured() -> Iterator[None]:
    yield
    if MEASURED:
        print("\nAsyncListener measurements:")
        for what, value in MEASURED.items():
            print(f"  {what:<64} {value:9.4f}")


AsyncFactory = Callable[[], Awaitable["psycopg.AsyncConnection[Any]"]]


def async_factory(dsn: str, **kwargs: Any) -> AsyncFactory:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs)

    return connect


@pytest.fixture
def afactory(dsn: str) -> AsyncFactory:
    """A coroutine-function factory, as issue 11 allows."""
    return async_factory(dsn)


@pytest_asyncio.fixture
async def aconn(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A second connection, to send notifications without blocking the loop."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        yield conn


async def anotify(
    conn: psycopg.AsyncConnection[Any], channel: str, *payloads: str
) -> None:
    """Send notifications in one statement, as ``testing.notify`` does."""
    await conn.execute(
        "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
        (channel, list(payloads) or [""]),
    )


@pytest_asyncio.fixture
async def make_listener(
    afactory: AsyncFactory,
) -> AsyncIterator[Callable[..., AsyncListener]]:
    """Build AsyncListeners that are stopped, and must stop promptly, after the test."""
    made: list[AsyncListener] = []

    def make(*args: Any, **kwargs: Any) -> AsyncListener:
        listener = AsyncListener(*(args or (afactory,)), **kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop()
    for listener in made:
        if listener.is_alive():
            await asyncio.wait_for(listener.join(), WAIT)


async def within(awaitable: Awaitable[Any], timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """For state no event reports: look again every few milliseconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def listening(listener: AsyncListener, channel: str) -> None:
    """Wait until ``channel``'s LISTEN, asked by someone else (an iterator, a
    plugin), is acknowledged.

    ``listener.channels`` shows a channel as soon as its registration is
    applied, before the server acknowledged the LISTEN; requests are applied
    in order and one statement at a time, so once a later LISTEN (of a
    channel of its own) is acknowledged, that one is too.
    """
    await wait_for(lambda: channel in listener.channels, f"{channel} registered")
    await within(listener.add_callback(_barrier, f"{channel}_barrier"))


def _barrier(notify: Notify) -> None:
    pass


class Inbox:
    """A plain callback queueing what it receives, for the test to await."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notify] = asyncio.Queue()
        self.threads: set[int] = set()

    def __call__(self, notify: Notify) -> None:
        self.threads.add(threading.get_ident())
        self.queue.put_nowait(notify)

    async def get(self) -> Notify:
        notify: Notify = await within(self.queue.get())
        return notify

    async def payloads(self, count: int) -> list[str]:
        return [(await self.get()).payload for _ in range(count)]


class Signals:
    """A plugin recording the connection lifecycle, awaitable from the loop."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.reconnected = asyncio.Event()
        self.on_reconnect = asyncio.Event()
        self.times: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self.threads: set[int] = set()

    def _note(self, what: str, event: asyncio.Event) -> None:
        self.threads.add(threading.get_ident())
        self.times.setdefault(what, time.monotonic())
        event.set()

    @hookimpl
    def listener_connected(self, listener: Any, connection: Any) -> None:
        self._note("connected", self.connected)

    @hookimpl
    def listener_disconnected(self, listener: Any, error: BaseException) -> None:
        self.errors.append(error)
        self._note("disconnected", self.disconnected)

    @hookimpl
    def listener_reconnected(self, listener: Any, connection: Any) -> None:
        self._note("reconnected", self.reconnected)

    def reconnect_callback(self) -> None:
        self._note("on_reconnect", self.on_reconnect)


class Factory:
    """Wraps an async factory: counts and times calls, fails on demand."""

    def __init__(self, connect: AsyncFactory, failures: int = 0):
        self._connect = connect
        self.failures = failures
        self.calls: list[float] = []

    async def __call__(self) -> psycopg.AsyncConnection[Any]:
        self.calls.append(time.monotonic())
        failing = self.failures != 0
        if self.failures > 0:
            self.failures -= 1
        if failing:
            raise psycopg.OperationalError("injected: the database is down")
        return await self._connect()

    async def wait_calls(self, count: int) -> None:
        await wait_for(lambda: len(self.calls) >= count, f"{count} attempts")


async def started(
    listener: AsyncListener, inbox: Inbox, channel: str, conn: Any
) -> None:
    """Start ``listener`` with ``inbox`` on ``channel`` and prove delivery."""
    future = listener.add_callback(inbox, channel)
    listener.start()
    await within(future)
    await anotify(conn, channel, "hello")
    assert (await inbox.get()).payload == "hello"


async def backend_alive(conn: psycopg.AsyncConnection[Any], pid: int) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
    return await cur.fetchone() is not None


# -- add_callback / remove_callback and their futures ---------------------------


async def test_callback_gets_the_notification(make_listener, aconn, channel):
    listener = make_listener()
    inbox = Inbox()
    future = listener.add_callback(inbox, channel)
    assert isinstance(future, asyncio.Future)
    assert future.get_loop() is asyncio.get_running_loop()
    listener.start()
    assert await within(future) is None
    await anotify(aconn, channel, "hello")
    got = await inbox.get()
    assert isinstance(got, Notify)
    assert (got.channel, got.payload, got.pid) == (
        channel,
        "hello",
        aconn.info.backend_pid,
    )
    # A plain callback runs in the loop's thread.
    assert inbox.threads == {threading.get_ident()}


async def test_futures_need_not_be_awaited(make_listener, aconn, channel):
    listener = make_listener()
    inbox = Inbox()
    listener.add_callback(inbox, channel)  # fire and forget
    signals = Signals()
    listener.register_plugin(signals)
    listener.start()
    await within(signals.connected.wait())
    await anotify(aconn, channel, "x")
    assert (await inbox.get()).payload == "x"


async def test_coroutine_and_plain_callbacks(make_listener, aconn, channel):
    listener = make_listener()
    plain = Inbox()
    got: asyncio.Queue[tuple[str, int, bool]] = asyncio.Queue()

    async def coroutine(notify: Notify) -> None:
        await asyncio.sleep(0)
        # In the loop's thread, as a task of its own (not the serving task).
        current = asyncio.current_task()
        await got.put((notify.payload, threading.get_ident(), current is not serving))

    listener.add_callback(plain, channel)
    future = listener.add_callback(coroutine, channel)
    serving = asyncio.ensure_future(listener.run())
    await within(future)
    await anotify(aconn, channel, "both")
    assert (await plain.get()).payload == "both"
    assert await within(got.get()) == ("both", threading.get_ident(), True)
    listener.stop()
    await within(serving)


async def test_add_callback_while_running(make_listener, aconn, channel):
    listener = make_listener()
    listener.start()
    inbox = Inbox()
    await within(listener.add_callback(inbox, channel))
    await anotify(aconn, channel, "late")
    assert (await inbox.get()).payload == "late"


async def test_several_callbacks_once_each_and_one_on_several_channels(
    make_listener, aconn, channel
):
    listener = make_listener()
    first, second, shared = Inbox(), Inbox(), Inbox()
    other = f"{channel}_other"
    futures = [
        listener.add_callback(first, channel),
        listener.add_callback(second, channel),
        listener.add_callback(shared, channel),
        listener.add_callback(shared, other),
        listener.add_callback(first, channel),  # twice: called once
    ]
    listener.start()
    await within(asyncio.gather(*futures))
    assert listener.channels[channel] == (first, second, shared)
    await anotify(aconn, channel, "a")
    await anotify(aconn, other, "b")
    assert await first.payloads(1) == ["a"]
    assert await second.payloads(1) == ["a"]
    assert sorted(await shared.payloads(2)) == ["a", "b"]
    await asyncio.sleep(0.05)  # nothing more is coming: look after a while
    assert first.queue.empty()
    assert second.queue.empty()
    assert shared.queue.empty()


async def test_remove_callback_unlistens_with_the_last(make_listener, aconn, channel):
    listener = make_listener()
    one, two = Inbox(), Inbox()
    listener.start()
    await within(listener.add_callback(one, channel))
    await within(listener.add_callback(two, channel))
    await within(listener.remove_callback(one, channel))
    await anotify(aconn, channel, "only two")
    assert (await two.get()).payload == "only two"
    await within(listener.remove_callback(two, channel))
    assert channel not in listener.channels
    cur = await aconn.execute(
        "SELECT query FROM pg_stat_activity WHERE pid = %s", (listener.backend_pid,)
    )
    row = await cur.fetchone()
    assert row is not None
    assert row[0].startswith("UNLISTEN")
    assert one.queue.empty()


async def test_remove_unregistered_callback_future_raises(make_listener, channel):
    listener = make_listener()
    listener.start()
    with pytest.raises(CallbackNotRegistered, match=channel):
        await within(listener.remove_callback(print, channel))


async def test_failed_listen_future_raises_and_nothing_is_lost(
    make_listener, dsn, aconn, channel
):
    # LATIN1 cannot encode this channel: the LISTEN cannot even be built.
    listener = make_listener(async_factory(dsn, client_encoding="LATIN1"))
    kept = Inbox()
    listener.add_callback(kept, channel)
    listener.start()
    with pytest.raises(UnicodeEncodeError):
        await within(listener.add_callback(print, "канал"))
    assert "канал" not in listener.channels
    await anotify(aconn, channel, "still here")
    assert (await kept.get()).payload == "still here"


@pytest.mark.parametrize(
    "name",
    ["MixedCase", "with space", 'quote"inside', "it's", "ünïcødé_канал", "a" * 63],
)
async def test_channel_names_are_quoted_identifiers(make_listener, aconn, name):
    listener = make_listener()
    inbox = Inbox()
    listener.start()
    await within(listener.add_callback(inbox, name))
    await anotify(aconn, name, "x")
    assert (await inbox.get()).channel == name


@pytest.mark.parametrize("method", ["add_callback", "remove_callback"])
async def test_bad_arguments_are_refused_at_the_call(make_listener, method, channel):
    listener = make_listener()
    call = getattr(listener, method)
    with pytest.raises(TypeError, match="callable"):
        call("not callable", channel)
    with pytest.raises(ValueError, match="non-empty"):
        call(print, "")
    with pytest.raises(TypeError, match="str"):
        call(print, 42)
    with pytest.raises(ValueError, match="63"):
        call(print, "a" * 64)
    with pytest.raises(ValueError, match="NUL"):
        call(print, "a\0b")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": -1}, "max_concurrency"),
        ({"ping_period": -1}, "ping_period"),
        ({"ping_timeout": 0}, "ping_timeout"),
        ({"max_backlog": 0}, "max_backlog"),
        ({"reconnect_delay": 0}, "reconnect delay"),
        ({"max_reconnect_attempts": 0}, "max_reconnect_attempts"),
    ],
)
async def test_bad_settings_are_refused(afactory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncListener(afactory, **kwargs)


async def test_factory_must_be_callable():
    with pytest.raises(TypeError, match="connection_factory"):
        AsyncListener("host=localhost")  # type: ignore[arg-type]


async def test_connection_without_autocommit_is_refused(make_listener, dsn, channel):
    async def no_autocommit() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(dsn)

    listener = make_listener(no_autocommit)
    future = listener.add_callback(print, channel)
    with pytest.raises(ValueError, match="autocommit"):
        await within(listener.run())
    with pytest.raises(ValueError, match="autocommit"):
        await within(future)


async def test_factory_returning_a_sync_connection_is_refused(make_listener, dsn):
    conn = psycopg.connect(dsn, autocommit=True)
    listener = make_listener(lambda: conn)  # a plain function may be the factory
    with pytest.raises(TypeError, match="AsyncConnection"):
        await within(listener.run())
    assert conn.closed  # closed, not leaked


async def test_plain_function_factory(make_listener, dsn, aconn, channel):
    loop_connect = async_factory(dsn)
    listener = make_listener(lambda: loop_connect())  # returns an awaitable
    inbox = Inbox()
    await started(listener, inbox, channel, aconn)


# -- calls from other threads ----------------------------------------------------


async def test_calls_from_another_thread_resolve_in_the_loop(
    make_listener, aconn, channel
):
    listener = make_listener()
    listener.start()
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    resolved_in: list[int] = []

    def from_thread() -> asyncio.Future[None]:
        future: asyncio.Future[None] = listener.add_callback(inbox, channel)
        future.add_done_callback(lambda f: resolved_in.append(threading.get_ident()))
        return future

    future = await loop.run_in_executor(None, from_thread)
    assert future.get_loop() is loop
    await within(future)
    assert resolved_in == [threading.get_ident()]
    await anotify(aconn, channel, "via thread")
    assert (await inbox.get()).payload == "via thread"

    # Bad arguments raise in the calling thread, at the call.
    def bad() -> None:
        listener.add_callback(print, "")

    with pytest.raises(ValueError, match="non-empty"):
        await loop.run_in_executor(None, bad)

    removed = await loop.run_in_executor(
        None, lambda: listener.remove_callback(inbox, channel)
    )
    await within(removed)
    assert channel not in listener.channels
    # stop() from another thread too.
    await loop.run_in_executor(None, listener.stop)
    await within(listener.join())


# -- max_concurrency -------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
async def test_max_concurrency_bounds_coroutine_callbacks(
    make_listener, aconn, channel, limit
):
    listener = make_listener(max_concurrency=limit)
    running = peak = done = 0
    gate = asyncio.Event()
    all_done = asyncio.Event()

    async def slow(notify: Notify) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1
        if done == 10:
            all_done.set()

    listener.start()
    await within(listener.add_callback(slow, channel))
    await anotify(aconn, channel, *map(str, range(10)))
    await wait_for(lambda: running == limit, f"{limit} callbacks running")
    await asyncio.sleep(0.05)  # would more start? look after a while
    assert running == limit
    gate.set()
    await within(all_done.wait())
    assert peak == limit


async def test_max_concurrency_zero_awaits_in_order(make_listener, aconn, channel):
    listener = make_listener(max_concurrency=0)
    seen: list[str] = []
    overlapping = False
    busy = False
    finished = asyncio.Event()

    async def one_at_a_time(notify: Notify) -> None:
        nonlocal busy, overlapping
        overlapping |= busy
        busy = True
        await asyncio.sleep(0.001)
        seen.append(notify.payload)
        busy = False
        if len(seen) == 50:
            finished.set()

    listener.start()
    await within(listener.add_callback(one_at_a_time, channel))
    await anotify(aconn, channel, *map(str, range(50)))
    await within(finished.wait())
    assert seen == [str(i) for i in range(50)]
    assert not overlapping


@pytest.mark.parametrize("max_concurrency", [0, 1])
async def test_one_at_a_time_keeps_order_across_plain_and_coroutine_callbacks(
    make_listener, aconn, channel, max_concurrency
):
    listener = make_listener(max_concurrency=max_concurrency)
    events: list[str] = []
    finished, release = asyncio.Event(), asyncio.Event()

    def first(notify: Notify) -> None:
        events.append(f"first {notify.payload}")

    async def second(notify: Notify) -> None:
        events.append(f"second {notify.payload} starts")
        await release.wait()
        events.append(f"second {notify.payload} ends")

    def third(notify: Notify) -> None:
        events.append(f"third {notify.payload}")
        if notify.payload == "2":
            raise ValueError("logged, and the rest still runs")
        if notify.payload == "3":
            finished.set()

    for callback in (first, second, third):
        listener.add_callback(callback, channel)
    listener.start()
    await within(listener.add_callback(third, channel))  # already there: a no-op
    await anotify(aconn, channel, "1")
    await wait_for(lambda: "second 1 starts" in events, "the first coroutine")
    await anotify(aconn, channel, "2", "3")
    if max_concurrency:  # read meanwhile: they wait for the busy worker
        await wait_for(
            lambda: listener.stats().received.get(channel) == 3, "2 and 3 read"
        )
    release.set()
    await within(finished.wait())
    assert events == [
        f"{name} {n}{suffix}"
        for n in "123"
        for name, suffix in (
            ("first", ""),
            ("second", " starts"),
            ("second", " ends"),
            ("third", ""),
        )
    ]
    stats = listener.stats()
    assert stats.delivered[channel] == 3
    assert stats.callback_errors[channel] == 1


async def test_backlog_is_bounded(make_listener, aconn, channel):
    listener = make_listener(max_concurrency=2, max_backlog=10)
    seen: list[int] = []
    finished = asyncio.Event()

    async def slow(notify: Notify) -> None:
        seen.append(listener.backlog)
        await asyncio.sleep(0.001)
        if len(seen) == 500:
            finished.set()

    listener.start()
    await within(listener.add_callback(slow, channel))
    await anotify(aconn, channel, *map(str, range(500)))
    await within(finished.wait())
    # Reading pauses while 10 wait: the server keeps the rest meanwhile.
    assert max(seen) <= 10
    assert len(seen) == 500


async def test_raising_callbacks_are_logged_and_others_still_run(
    make_listener, aconn, channel, caplog
):
    listener = make_listener()
    inbox = Inbox()

    def plain_raises(notify: Notify) -> None:
        raise RuntimeError("plain boom")

    async def coroutine_raises(notify: Notify) -> None:
        raise RuntimeError("coroutine boom")

    for callback in (plain_raises, coroutine_raises, inbox):
        listener.add_callback(callback, channel)
    listener.start()
    await within(listener.add_callback(inbox, channel))
    await anotify(aconn, channel, "1", "2")
    assert await inbox.payloads(2) == ["1", "2"]
    await wait_for(lambda: "coroutine boom" in caplog.text, "the coroutine's error")
    assert "plain boom" in caplog.text
    assert listener.is_alive()


# -- run / start / stop / join ---------------------------------------------------


async def test_run_serves_until_stop(make_listener, aconn, channel):
    listener = make_listener()
    inbox = Inbox()

    def stop_on_second(notify: Notify) -> None:
        inbox(notify)
        if notify.payload == "stop":
            listener.stop()

    listener.add_callback(stop_on_second, channel)
    signals = Signals()
    listener.register_plugin(signals)
    running = asyncio.ensure_future(listener.run())
    await within(signals.connected.wait())
    assert listener.is_alive()
    await anotify(aconn, channel, "go", "stop")
    assert await within(running) is None
    assert await inbox.payloads(2) == ["go", "stop"]
    assert not listener.is_alive()
    assert listener.backend_pid is None
    assert listener.exception is None


async def test_start_twice_join_before_start_and_stop_before_run(make_listener):
    listener = make_listener()
    with pytest.raises(RuntimeError):
        await listener.join()
    listener.start()
    with pytest.raises(RuntimeError):
        listener.start()
    with pytest.raises(RuntimeError):
        await listener.run()

    stopped = make_listener()
    stopped.stop()
    await within(stopped.run(), 1.0)  # stopped before run(): returns at once


async def test_stop_is_idempotent_prompt_and_callable_from_a_callback(
    make_listener, aconn, channel
):
    listener = make_listener()
    listener.start()

    def stop(notify: Notify) -> None:
        listener.stop()
        listener.stop()

    await within(listener.add_callback(stop, channel))
    await anotify(aconn, channel)
    await within(listener.join())
    assert not listener.is_alive()
    listener.stop()


async def test_idle_listener_stops_promptly(make_listener, channel):
    latencies = []
    for _ in range(5):
        listener = make_listener()
        listener.start()
        await within(listener.add_callback(print, channel))
        stopping = time.perf_counter()
        listener.stop()
        await within(listener.join())
        latencies.append(time.perf_counter() - stopping)
    MEASURED["stop() of an idle listener, median (s)"] = sorted(latencies)[2]
    assert sorted(latencies)[2] < 0.1, latencies


async def test_async_with_starts_and_stops(afactory, aconn, channel):
    inbox = Inbox()
    async with AsyncListener(afactory) as listener:
        await within(listener.add_callback(inbox, channel))
        assert listener.is_alive()
        await anotify(aconn, channel, "inside")
        assert (await inbox.get()).payload == "inside"
    assert not listener.is_alive()
    assert listener.backend_pid is None


async def test_join_waits_for_running_coroutine_callbacks(
    make_listener, aconn, channel
):
    listener = make_listener(max_concurrency=4)
    gate = asyncio.Event()
    finished: list[str] = []

    async def slow(notify: Notify) -> None:
        await gate.wait()
        finished.append(notify.payload)

    listener.start()
    await within(listener.add_callback(slow, channel))
    await anotify(aconn, channel, *map(str, range(8)))
    await wait_for(lambda: listener.backlog > 0, "callbacks running")
    listener.stop()
    joining = asyncio.ensure_future(listener.join())
    await asyncio.sleep(0.05)
    assert not joining.done()  # accepted callbacks are waited for
    gate.set()
    await within(joining)
    assert sorted(finished) == [str(i) for i in range(8)]


async def test_pending_futures_resolve_at_stop(afactory, make_listener):
    failing = Factory(afactory, failures=-1)
    listener = make_listener(failing, reconnect_delay=30, max_reconnect_delay=30)
    pending = listener.add_callback(print, "never_applied")
    listener.start()
    await failing.wait_calls(1)  # now backing off for 30 s
    listener.stop()
    await within(listener.join(), 0.5)
    with pytest.raises(ListenerStopped):
        await within(pending)
    with pytest.raises(ListenerStopped):
        await within(listener.add_callback(print, "after_stop"))


async def test_stop_while_connecting_to_blackhole(
    proxy: Proxy, proxy_dsn, make_listener
):
    """As for Listener: stop() waits for the factory, up to the DSN's
    connect_timeout (2 s here), then tries no more."""
    proxy.blackhole()
    connecting = Factory(async_factory(proxy_dsn, connect_timeout=2))
    listener = make_listener(connecting, **FAST)
    listener.start()
    await connecting.wait_calls(1)
    await wait_for(lambda: proxy.held() > 0, "the startup packet to be held")
    stopping = time.monotonic()
    listener.stop()
    await within(listener.join())
    took = time.monotonic() - stopping
    MEASURED["stop() while connecting through a blackhole (connect_timeout 2)"] = took
    assert took < 2.5
    assert len(connecting.calls) == 1
    assert listener.exception is None


# -- catch-ups, hooks, plugins, rotation -----------------------------------------------


@pytest.mark.parametrize("max_concurrency", [0, None])
async def test_catch_up_runs_before_the_channels_notifications(
    make_listener, aconn, channel, max_concurrency
):
    events: list[str] = []
    gate = asyncio.Event()
    caught_up = asyncio.Event()
    done_hooks: list[tuple[str, BaseException | None]] = []

    class CatchUpDone:
        @hookimpl
        def listener_catch_up_done(self, listener, channel, catch_up, duration, error):
            done_hooks.append((catch_up.__name__, error))

    async def catch_up(name: str) -> None:
        events.append(f"catch-up {name}")
        await gate.wait()
        events.append("caught up")
        caught_up.set()

    async def failing(name: str) -> None:
        raise ValueError(name)

    inbox = Inbox()
    listener = make_listener(
        max_concurrency=max_concurrency, plugins=[CatchUpDone()], **FAST
    )
    listener.add_callback(inbox, channel, catch_up=catch_up)
    listener.add_callback(print, f"{channel}_other", catch_up=failing)
    listener.start()
    await wait_for(lambda: events == [f"catch-up {channel}"], "the catch-up")
    # Sent while the catch-up runs: held back until it returns.
    await anotify(aconn, channel, "during")
    await asyncio.sleep(0.05)
    assert inbox.queue.empty()
    gate.set()
    assert (await inbox.get()).payload == "during"
    assert events == [f"catch-up {channel}", "caught up"]
    await wait_for(lambda: len(done_hooks) == 2, "both listener_catch_up_done")
    errors = dict(done_hooks)
    assert errors.keys() == {"catch_up", "failing"}
    assert errors["catch_up"] is None
    assert isinstance(errors["failing"], ValueError)

    # And again after a reconnection.
    caught_up.clear()
    await aconn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await within(caught_up.wait())
    assert events.count("caught up") == 2


@pytest.mark.parametrize("max_concurrency", [0, 2])
async def test_hook_callback_done_for_coroutines(
    make_listener, aconn, channel, max_concurrency
):
    done: list[tuple[Any, float, BaseException | None]] = []

    class Done:
        @hookimpl
        def listener_callback_done(self, listener, callback, notify, duration, error):
            done.append((callback, duration, error))

    async def slow(notify: Notify) -> None:
        await asyncio.sleep(0.02)

    async def raising(notify: Notify) -> None:
        raise ValueError(notify.payload)

    listener = make_listener(max_concurrency=max_concurrency, plugins=[Done()])
    listener.add_callback(slow, channel)
    listener.add_callback(raising, channel)
    listener.start()
    await within(listener.add_callback(raising, channel))
    await anotify(aconn, channel, "boom")
    await wait_for(lambda: len(done) == 2, "two listener_callback_done")
    by_callback = {callback: (duration, error) for callback, duration, error in done}
    assert by_callback[slow][0] >= 0.02
    assert by_callback[slow][1] is None
    assert isinstance(by_callback[raising][1], ValueError)


async def test_decode_turns_payloads_and_skips_poison(
    make_listener, aconn, channel, caplog
):
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def on_order(notify: Notify) -> None:
        await got.put(notify.payload)

    listener = make_listener()
    listener.start()
    await within(listener.add_callback(on_order, channel, decode=json.loads))
    await anotify(aconn, channel, '{"id": 1}', "not json", '{"id": 2}')
    assert [await within(got.get()) for _ in range(2)] == [{"id": 1}, {"id": 2}]
    assert "poison message" in caplog.text
    assert got.empty()
    with pytest.raises(TypeError, match="decode"):
        listener.add_callback(on_order, channel, decode="json")


async def test_unregister_plugin_returns_an_asyncio_future(
    make_listener, aconn, channel
):
    inbox = Inbox()

    class Contributes:
        @hookimpl
        def listener_register_callbacks(self, listener, register):
            register(inbox, channel)

    listener = make_listener()
    name = listener.register_plugin(Contributes(), "contributes")
    assert name == "contributes"
    listener.start()
    await listening(listener, channel)
    await anotify(aconn, channel, "to the plugin")
    assert (await inbox.get()).payload == "to the plugin"
    removed = listener.unregister_plugin(name)
    assert isinstance(removed, asyncio.Future)
    await within(removed)
    assert channel not in listener.channels
    assert [info.name for info in listener.plugins] == []


async def test_rotate_loses_and_doubles_nothing(make_listener, aconn, channel):
    listener = make_listener(max_concurrency=0)
    inbox = Inbox()
    await started(listener, inbox, channel, aconn)
    old = listener.backend_pid
    await anotify(aconn, channel, *map(str, range(500)))
    rotating = listener.rotate()
    assert isinstance(rotating, asyncio.Future)
    await anotify(aconn, channel, *map(str, range(500, 1000)))
    await within(rotating)
    await anotify(aconn, channel, *map(str, range(1000, 1500)))
    assert await inbox.payloads(1500) == [str(i) for i in range(1500)]
    assert listener.backend_pid not in (None, old)
    assert listener.reconnects == 0
    await asyncio.sleep(0.05)
    assert inbox.queue.empty()


async def test_made_outside_the_loop(afactory, aconn, channel):
    loop = asyncio.get_running_loop()
    # Made in a thread with no event loop: the loop is known at start().
    listener = await loop.run_in_executor(None, lambda: AsyncListener(afactory))
    assert "initial" in repr(listener)

    def too_early() -> None:
        listener.add_callback(print, channel)

    with pytest.raises(RuntimeError, match="event loop"):
        await loop.run_in_executor(None, too_early)
    inbox = Inbox()
    try:
        await started(listener, inbox, channel, aconn)
        assert "connected" in repr(listener)
    finally:
        listener.stop()
        await within(listener.join())
    assert "stopped" in repr(listener)


# -- cancellation --------------------------------------------------------------------


async def test_cancelling_run_closes_resolves_and_reraises(
    make_listener, aconn, channel
):
    listener = make_listener(max_concurrency=0)
    signals = Signals()
    listener.register_plugin(signals)
    listener.add_callback(Inbox(), channel)
    task = asyncio.ensure_future(listener.run())
    await within(signals.connected.wait())
    pid = listener.backend_pid
    assert pid is not None
    # A change that cannot be applied before the cancellation lands.
    pending = listener.add_callback(print, f"{channel}_pending")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert task.cancelled()
    assert pending.done()
    assert isinstance(pending.exception(), ListenerStopped)
    assert listener.backend_pid is None
    assert not listener.is_alive()

    async def gone() -> bool:
        return not await backend_alive(aconn, pid)

    deadline = time.monotonic() + WAIT
    while not await gone():
        assert time.monotonic() < deadline, "the backend still runs"
        await asyncio.sleep(0.01)


async def test_a_socket_numbered_above_1024_is_served(
    make_listener, afactory, aconn, channel
):
    made: list[Any] = []
    inbox = Inbox()
    with descriptors_above_1024() as take_low:

        async def factory() -> Any:
            take_low()
            made.append(await afactory())
            return made[-1]

        await started(make_listener(factory), inbox, channel, aconn)
    assert made[-1].pgconn.socket > 1024
    await anotify(aconn, channel, "again", "and again")
    assert await inbox.payloads(2) == ["again", "and again"]


async def test_worker_tasks_count_a_batch_cut_by_coroutine_callbacks():
    """Plain callbacks run at once, coroutine ones in workers, and the
    batch's parts are counted per channel as each part ends."""
    ran: list[str] = []

    def plain(notify: Notify) -> None:
        ran.append(notify.payload)

    async def coroutine(notify: Notify) -> None:
        await asyncio.sleep(0)
        ran.append(f"{notify.payload} awaited")

    dispatcher = TaskDispatcher(None, 100, lambda: None, lambda: None, "test")
    batch: list[Delivery] = [((plain,), Notify("a", str(i), 1)) for i in range(5)]
    batch[2] = ((plain, coroutine), Notify("a", "2", 1))
    dispatcher.dispatch(OneChannel("a", batch))
    assert ran == ["0", "1", "2"]  # at once, until the coroutine
    assert dispatcher.delivered() == {"a": 2}
    await dispatcher.shutdown()
    assert sorted(ran) == sorted(["0", "1", "2", "2 awaited", "3", "4"])
    assert dispatcher.delivered() == {"a": 5}
    assert dispatcher.backlog == 0


async def test_cancel_drops_coroutine_callbacks_no_worker_started():
    """Cancelled between a coroutine callback's call (plain callbacks run at
    once, and this one was next) and the first step of the worker that
    would await it: the coroutine is closed, never run, and not reported as
    never awaited (which filterwarnings = error would catch)."""
    ran: list[str] = []

    async def callback(notify: Notify) -> None:
        ran.append(notify.payload)

    dispatcher = TaskDispatcher(None, 100, lambda: None, lambda: None, "test")
    dispatcher.dispatch([((callback,), Notify("channel", "1", 1))])
    assert dispatcher.backlog == 1  # called, waiting for its worker
    dispatcher.cancel()
    await asyncio.sleep(0)
    gc.collect()
    assert ran == []


async def test_cancelling_while_connecting(make_listener):
    release = asyncio.Event()

    async def hangs() -> psycopg.AsyncConnection[Any]:
        await release.wait()
        raise AssertionError("not reached")

    listener = make_listener(hangs)
    pending = listener.add_callback(print, "never")
    task = asyncio.ensure_future(listener.run())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert isinstance(pending.exception(), ListenerStopped)


async def test_cancelling_the_started_task_via_join(make_listener, aconn, channel):
    listener = make_listener()
    inbox = Inbox()
    await started(listener, inbox, channel, aconn)
    joining = asyncio.ensure_future(listener.join())
    await asyncio.sleep(0)
    joining.cancel()  # cancelling a waiter does not stop the listener
    with pytest.raises(asyncio.CancelledError):
        await joining
    assert listener.is_alive()
    await anotify(aconn, channel, "still")
    assert (await inbox.get()).payload == "still"


# -- notifications() -----------------------------------------------------------------


async def test_notifications_iterator_and_removal_on_exit(
    make_listener, aconn, channel
):
    listener = make_listener()
    listener.start()
    received: list[str] = []

    async def consume() -> None:
        async for notify in listener.notifications(channel):
            received.append(notify.payload)
            if len(received) == 3:
                break

    consumer = asyncio.ensure_future(consume())
    await listening(listener, channel)
    await anotify(aconn, channel, "a", "b", "c", "d")
    await within(consumer)
    assert received == ["a", "b", "c"]
    await wait_for(lambda: channel not in listener.channels, "removal on exit")


async def test_notifications_iterator_removed_when_cancelled(
    make_listener, aconn, channel
):
    listener = make_listener()
    listener.start()
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in listener.notifications(channel):
            first.set()

    consumer = asyncio.ensure_future(consume())
    await listening(listener, channel)
    await anotify(aconn, channel, "one")
    await within(first.wait())  # the consumer now waits for the next one
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await wait_for(lambda: channel not in listener.channels, "removal on cancel")


async def test_notifications_iterator_cancelled_before_the_listen(
    make_listener, channel
):
    listener = make_listener()
    listener.start()

    async def consume() -> None:
        async for _ in listener.notifications(channel):
            pass

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0)  # the first __anext__() has sent its add_callback
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # The add was on its way: it is applied all the same, and must be undone.
    # Requests are applied in order: once a later one is, both were.
    await within(listener.add_callback(print, f"{channel}_later"))
    assert channel not in listener.channels


async def test_notifications_buffer_is_bounded(make_listener, aconn, channel):
    listener = make_listener()
    counted = Inbox()  # a second callback on the channel: it sees everything
    listener.start()
    await within(listener.add_callback(counted, channel))
    stream = listener.notifications(channel, max_buffer=10)
    first = asyncio.ensure_future(stream.__anext__())
    await wait_for(lambda: len(listener.channels[channel]) == 2, "the iterator")
    await anotify(aconn, channel, "first")
    assert (await within(first)).payload == "first"
    # Nobody reads while 1000 arrive: 10 are kept, then the consumer is told.
    await anotify(aconn, channel, *map(str, range(1000)))
    await counted.payloads(1001)
    kept = [(await within(stream.__anext__())).payload for _ in range(10)]
    assert kept == [str(i) for i in range(10)]
    with pytest.raises(BufferOverflow, match="10 notifications behind"):
        await within(stream.__anext__())
    await wait_for(
        lambda: listener.channels[channel] == (counted,), "the iterator's removal"
    )


async def test_notifications_bad_arguments_raise_at_the_call(make_listener):
    listener = make_listener()
    with pytest.raises(ValueError, match="63"):
        listener.notifications("x" * 64)
    with pytest.raises(ValueError, match="max_buffer"):
        listener.notifications("fine", max_buffer=0)


async def test_notifications_end_when_the_listener_stops(make_listener, aconn, channel):
    listener = make_listener()
    listener.start()
    received: list[str] = []

    async def consume() -> None:
        async for notify in listener.notifications(channel):
            received.append(notify.payload)

    consumer = asyncio.ensure_future(consume())
    try:
        await listening(listener, channel)
        await anotify(aconn, channel, "x")
        await wait_for(lambda: received == ["x"], "the notification")
        listener.stop()
        await within(listener.join())
        await within(consumer, 1.0)  # ends (or raises ListenerStopped): no hang
    finally:
        consumer.cancel()


# -- plugins and hooks in the loop ----------------------------------------------------


async def test_hooks_are_called_in_the_loop(make_listener, aconn, channel):
    signals = Signals()
    listener = make_listener(plugins=[signals])
    inbox = Inbox()
    await started(listener, inbox, channel, aconn)
    assert signals.threads == {threading.get_ident()}


# -- resilience ----------------------------------------------------------------------


async def test_terminated_backend_reconnects_and_signals(
    make_listener, aconn, channel, dsn
):
    signals = Signals()
    inbox = Inbox()
    listener = make_listener(
        max_concurrency=0,
        on_reconnect=signals.reconnect_callback,
        plugins=[signals],
        **FAST,
    )
    await started(listener, inbox, channel, aconn)
    pid = listener.backend_pid
    assert pid is not None

    killed = time.monotonic()
    await aconn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await within(signals.on_reconnect.wait())
    assert signals.reconnected.is_set()
    assert signals.disconnected.is_set()
    assert listener.reconnects == 1
    assert listener.backend_pid not in (None, pid)
    MEASURED["pg_terminate_backend: reconnected after (s)"] = (
        signals.times["on_reconnect"] - killed
    )
    await anotify(aconn, channel, *map(str, range(100)))
    assert await inbox.payloads(100) == [str(i) for i in range(100)]


async def test_blackhole_detected_by_ping_and_recovered(
    proxy: Proxy, proxy_dsn, make_listener, aconn, channel
):
    signals = Signals()
    inbox = Inbox()
    period, timeout = 0.5, 0.5
    listener = make_listener(
        async_factory(proxy_dsn, connect_timeout=2),
        ping_period=period,
        ping_timeout=timeout,
        plugins=[signals],
        on_reconnect=signals.reconnect_callback,
        **FAST,
    )
    await started(listener, inbox, channel, aconn)

    cut = time.monotonic()
    proxy.blackhole()
    await within(signals.disconnected.wait())
    detected = signals.times["disconnected"] - cut
    assert detected <= period + timeout + 0.25, detected
    restored = time.monotonic()
    proxy.restore()
    await within(signals.on_reconnect.wait())
    MEASURED["blackhole (ping 0.5 + timeout 0.5): detected after (s)"] = detected
    MEASURED["blackhole: reconnected after restore (s)"] = (
        signals.times["on_reconnect"] - restored
    )
    await anotify(aconn, channel, "back")
    assert (await inbox.get()).payload == "back"
    assert listener.reconnects == 1


async def test_stop_while_listen_hangs_on_blackhole(
    proxy: Proxy, proxy_dsn, make_listener, aconn, channel
):
    listener = make_listener(
        async_factory(proxy_dsn, connect_timeout=2), ping_timeout=5
    )
    await started(listener, Inbox(), channel, aconn)
    proxy.blackhole()
    pending = listener.add_callback(Inbox(), "hanging_listen")
    await wait_for(lambda: proxy.held() > 0, "the LISTEN to be held")
    stopping = time.monotonic()
    listener.stop()
    await within(listener.join())
    assert time.monotonic() - stopping < 0.5
    assert listener.exception is None
    with pytest.raises(ListenerStopped):
        await within(pending)


async def test_server_restart(throwaway: ThrowawayServer, make_listener):
    signals = Signals()
    factory = Factory(async_factory(throwaway.dsn, connect_timeout=2))
    channels = ["restart_a", "Restart B", 'restart "c"']
    inboxes = {c: Inbox() for c in channels}
    listener = make_listener(
        factory, plugins=[signals], on_reconnect=signals.reconnect_callback, **FAST
    )
    futures = [listener.add_callback(inboxes[c], c) for c in channels]
    listener.start()
    await within(asyncio.gather(*futures))
    async with await psycopg.AsyncConnection.connect(
        throwaway.dsn, autocommit=True
    ) as conn:
        for c in channels:
            await anotify(conn, c, "before")
    assert [(await inboxes[c].get()).payload for c in channels] == ["before"] * 3

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, throwaway.stop)  # pg_ctl: not in the loop
    await within(signals.disconnected.wait())
    attempts = len(factory.calls)
    await factory.wait_calls(attempts + 3)
    assert listener.is_alive()
    assert listener.backend_pid is None

    await loop.run_in_executor(None, throwaway.start)
    up = time.monotonic()
    await within(signals.on_reconnect.wait())
    MEASURED["server restart: reconnected after server up (s)"] = (
        signals.times["on_reconnect"] - up
    )
    assert listener.reconnects == 1
    assert set(listener.channels) == set(channels)
    async with await psycopg.AsyncConnection.connect(
        throwaway.dsn, autocommit=True
    ) as conn:
        for c in channels:
            await anotify(conn, c, "after")
    assert [(await inboxes[c].get()).payload for c in channels] == ["after"] * 3


async def test_factory_fails_then_works_with_growing_delays(
    afactory, make_listener, aconn, channel
):
    flaky = Factory(afactory, failures=4)
    inbox = Inbox()
    listener = make_listener(flaky, reconnect_delay=0.05, max_reconnect_delay=1.0)
    await started(listener, inbox, channel, aconn)
    assert len(flaky.calls) == 5
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert expected * 0.85 <= gap <= expected * 1.1 + 0.1, gaps
    assert listener.reconnects == 0


async def test_max_reconnect_attempts_ends_run(afactory, make_listener):
    failing = Factory(afactory, failures=-1)
    listener = make_listener(failing, max_reconnect_attempts=3, reconnect_delay=0.01)
    pending = listener.add_callback(Inbox(), "never")
    with pytest.raises(ReconnectFailed) as info:
        await within(listener.run())
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert len(failing.calls) == 3
    assert listener.exception is info.value
    with pytest.raises(ReconnectFailed):
        await within(pending)
    with pytest.raises(ListenerStopped):
        await within(listener.add_callback(Inbox(), "never"))


async def test_stop_while_backing_off(afactory, make_listener):
    failing = Factory(afactory, failures=-1)
    listener = make_listener(failing, reconnect_delay=30, max_reconnect_delay=30)
    listener.start()
    await failing.wait_calls(1)
    stopping = time.monotonic()
    listener.stop()
    await within(listener.join())
    assert time.monotonic() - stopping < 0.5
    assert len(failing.calls) == 1


# -- no thread, no stall -------------------------------------------------------------


async def test_starts_no_thread(make_listener, aconn, channel, dsn):
    # A numeric host: psycopg resolves a host name in the loop's default
    # executor (a thread that is the loop's, not the listener's).
    assert "127.0.0.1" in dsn
    before = {t.ident for t in threading.enumerate()}
    signals = Signals()
    inbox = Inbox()

    async def coroutine(notify: Notify) -> None:
        await asyncio.sleep(0)

    listener = make_listener(
        plugins=[signals], on_reconnect=signals.reconnect_callback, ping_period=0.05
    )
    listener.add_callback(coroutine, channel)
    await started(listener, inbox, channel, aconn)
    await aconn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await within(signals.on_reconnect.wait())
    await anotify(aconn, channel, *map(str, range(1000)))
    await inbox.payloads(1000)
    during = {t.ident for t in threading.enumerate()}
    listener.stop()
    await within(listener.join())
    MEASURED["threads started by AsyncListener"] = len(during - before)
    assert during == before


class Ticker:
    """A task ticking every 5 ms: how late each tick came is how long the
    loop could not run it.

    Each gap is measured twice: in wall-clock time, and in the CPU time the
    loop's thread used meanwhile. On a machine shared by several processes a
    wall-clock gap may be the scheduler's (the process was not running);
    the CPU time is the loop's own work, that is what the listener held it
    for.

    The objects alive before it starts are frozen (``gc.freeze()``): a full
    collection walks the whole heap, and the heap of a test process that ran
    hundreds of tests before this one would measure the size of the suite,
    not the listener. Collections of what the listener allocates still count.
    """

    PERIOD = 0.005

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.busy: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(self.PERIOD)
            now, cpu = time.perf_counter(), time.thread_time()
            self.gaps.append(now - last - self.PERIOD)
            self.busy.append(cpu - last_cpu)
            last, last_cpu = now, cpu

    def __enter__(self) -> Ticker:
        gc.collect()
        gc.freeze()
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        gc.unfreeze()

    def figures(self, prefix: str) -> dict[str, float]:
        gaps, busy = sorted(self.gaps), sorted(self.busy)
        p99 = int(len(gaps) * 0.99)
        return {
            f"{prefix}: ticks of 5 ms": len(gaps),
            f"{prefix}: lateness median (ms)": gaps[len(gaps) // 2] * 1e3,
            f"{prefix}: lateness p99 (ms)": gaps[p99] * 1e3,
            f"{prefix}: lateness worst (ms)": gaps[-1] * 1e3,
            f"{prefix}: loop CPU between ticks p99 (ms)": busy[p99] * 1e3,
            f"{prefix}: loop CPU between ticks worst (ms)": busy[-1] * 1e3,
        }


SENDER = """
import sys
import psycopg

dsn, channel, count, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), 10_000
with psycopg.connect(dsn, autocommit=True) as conn:
    for start in range(0, count, batch):
        conn.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
            (channel, [str(i) for i in range(start, min(start + batch, count))]),
        )
"""


async def send_batched(dsn: str, channel: str, count: int) -> None:
    """``count`` notifications, 10,000 per statement, from another process: a
    sender thread would share the GIL with the loop and add its own gaps."""
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, dsn, channel, str(count)
    )
    assert await within(sender.wait(), 60) == 0


@pytest.mark.slow
async def test_loop_never_blocked_over_50_ms(
    make_listener, afactory, aconn, dsn, channel
):
    flaky = Factory(afactory, failures=2)
    signals = Signals()
    total = 100_000
    received = 0
    drained = asyncio.Event()

    def count(notify: Notify) -> None:
        nonlocal received
        received += 1
        if received == total:
            drained.set()

    pinged = asyncio.Event()

    class Pings:
        @hookimpl
        def listener_ping(self, listener: Any, duration: float, error: Any) -> None:
            pinged.set()

    listener = make_listener(
        flaky,
        ping_period=0.1,
        plugins=[signals, Pings()],
        on_reconnect=signals.reconnect_callback,
        reconnect_delay=0.05,
        max_reconnect_delay=0.2,
    )
    with Ticker() as ticker:
        # connects (after two failures and their backoff)
        listening = listener.add_callback(count, channel)
        listener.start()
        await within(listening)
        # pings
        await within(pinged.wait())
        # reconnects
        await aconn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        await within(signals.on_reconnect.wait())
        # applies a burst of 10,000 callbacks (every SSE client reconnecting)
        idle = [lambda notify: None for _ in range(10_000)]
        burst = await asyncio.to_thread(
            lambda: [listener.add_callback(cb, channel + "_burst") for cb in idle]
        )
        await within(asyncio.gather(*burst))
        # drains 100,000
        draining = time.perf_counter()
        sender = asyncio.ensure_future(send_batched(dsn, channel, total))
        await within(drained.wait(), 60)
        drain = time.perf_counter() - draining
        await within(sender)
    MEASURED.update(ticker.figures("loop gap"))
    MEASURED["drain of 100,000 with the ticker running (s)"] = drain
    assert len(flaky.calls) >= 3
    # The loop's own work between two ticks: never 50 ms. (The wall-clock
    # lateness is reported too; on a loaded machine it includes the time the
    # scheduler gave to other processes.)
    worst = max(ticker.busy)
    assert worst < 0.050, f"the loop was busy {worst * 1000:.1f} ms without a tick"


# -- the FastAPI example of docs/fastapi.md -----------------------------------------

FASTAPI_PAGE = Path(__file__).parent.parent / "docs" / "fastapi.md"


def fastapi_example(dsn: str) -> dict[str, Any]:
    """The page's example, run as written but for its DSN."""
    text = FASTAPI_PAGE.read_text("utf-8")
    code: str = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    placeholder = 'DSN = "host=127.0.0.1 dbname=app"'
    assert placeholder in code
    namespace: dict[str, Any] = {"__name__": "fastapi_example"}
    exec(
        compile(code.replace(placeholder, f"DSN = {dsn!r}"), "app.py", "exec"),
        namespace,
    )
    return namespace


async def test_fastapi_example_streams_notifications(dsn, aconn, channel):
    app = fastapi_example(dsn)["app"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started, "uvicorn to start")
        listener: AsyncListener = app.state.listener
        assert listener.is_alive()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            async with client.stream("GET", f"/events/{channel}") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                await listening(listener, channel)
                await anotify(aconn, channel, "one", 'two "quoted"')
                lines = response.aiter_lines()
                events: list[dict[str, Any]] = []
                while len(events) < 2:
                    line = await within(lines.__anext__())
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: ") :]))
                    elif line:
                        assert line == f"event: {channel}"
            assert [e["payload"] for e in events] == ["one", 'two "quoted"']
            assert {e["pid"] for e in events} == {aconn.info.backend_pid}
            # The client went away: its callback is removed, and the channel
            # with it.
            await wait_for(lambda: channel not in listener.channels, "the removal")
    finally:
        server.should_exit = True
        await within(serving)
    assert not listener.is_alive()
    assert listener.backend_pid is None


async def test_fastapi_example_refuses_a_bad_channel(dsn):
    app = fastapi_example(dsn)["app"]
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=transport, base_url="http://app"
        ) as client:
            refused = await within(client.get("/events/" + "x" * 64))
    assert refused.status_code == 400
    assert "63" in refused.json()["detail"]


# -- order_by ------------------------------------------------------------------------


def _entity(notify: Notify) -> str:
    return notify.payload.split(":")[0]


@pytest.mark.parametrize("max_concurrency", [None, 0])
async def test_order_by_key_runs_a_key_in_order_and_keys_side_by_side(
    make_listener, aconn, channel, max_concurrency
):
    """A then B of one key: A's coroutine has finished before B's starts."""
    running: dict[str, int] = {}
    seen: dict[str, list[int]] = {}
    overlaps: list[int] = []
    total = 16
    done = asyncio.Event()

    async def callback(notify: Notify) -> None:
        key, number = notify.payload.split(":")
        assert not running.get(key), f"two callbacks of key {key} at once"
        running[key] = 1
        overlaps.append(sum(running.values()))
        # Early ones sleep longest: without the order, later ones would overtake.
        await asyncio.sleep(0.002 * (8 - int(number)))
        seen.setdefault(key, []).append(int(number))
        running[key] = 0
        if sum(map(len, seen.values())) == total:
            done.set()

    listener = make_listener(max_concurrency=max_concurrency, order_by=_entity)
    listener.start()
    await within(listener.add_callback(callback, channel))
    await anotify(aconn, channel, *(f"{k}:{i}" for i in range(8) for k in "ab"))
    await within(done.wait())
    assert seen == {"a": list(range(8)), "b": list(range(8))}
    if max_concurrency is None:
        assert max(overlaps) == 2  # the two keys ran side by side
    else:
        assert max(overlaps) == 1


async def test_order_by_channel_keeps_each_channels_order(
    make_listener, aconn, channel
):
    seen: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def callback(notify: Notify) -> None:
        await asyncio.sleep(0.001 * (5 - int(notify.payload)))
        seen.append((notify.channel, int(notify.payload)))
        if len(seen) == 10:
            done.set()

    listener = make_listener(order_by="channel")
    listener.start()
    await within(listener.add_callback(callback, channel))
    await within(listener.add_callback(callback, f"{channel}_2"))
    await anotify(aconn, channel, *map(str, range(5)))
    await anotify(aconn, f"{channel}_2", *map(str, range(5)))
    await within(done.wait())
    for name in (channel, f"{channel}_2"):
        assert [n for c, n in seen if c == name] == list(range(5))


async def test_order_by_key_that_raises_is_logged_and_delivered(
    make_listener, aconn, channel, caplog
):
    def key(notify: Notify) -> str:
        if notify.payload == "bad":
            raise ValueError("no key")
        return notify.payload

    inbox = Inbox()
    listener = make_listener(order_by=key)
    listener.start()
    await within(listener.add_callback(inbox, channel))
    await anotify(aconn, channel, "one", "bad", "two")
    payloads = [(await within(inbox.get())).payload for _ in range(3)]
    assert sorted(payloads) == ["bad", "one", "two"]
    assert "order_by key" in caplog.text


@pytest.mark.parametrize("order_by", ["entity", 42, ("channel",)])
async def test_bad_order_by_is_refused_by_the_constructor(afactory, order_by):
    with pytest.raises((ValueError, TypeError), match="order_by"):
        AsyncListener(afactory, order_by=order_by, autoload_plugins=False)


async def test_catch_up_holds_its_channel_with_order_by_channel(
    make_listener, aconn, channel
):
    """Other channels flow while one channel's catch-up runs; its own wait."""
    gate = asyncio.Event()
    started = asyncio.Event()

    async def catch_up(name: str) -> None:
        started.set()
        await gate.wait()

    held, other = Inbox(), Inbox()
    listener = make_listener(order_by="channel", **FAST)
    listener.add_callback(held, channel, catch_up=catch_up)
    listener.add_callback(other, f"{channel}_other")
    listener.start()
    await within(started.wait())
    await anotify(aconn, channel, "1", "2")
    await anotify(aconn, f"{channel}_other", "x")
    assert (await within(other.get())).payload == "x"
    assert held.queue.empty()
    gate.set()
    assert [(await within(held.get())).payload for _ in range(2)] == ["1", "2"]

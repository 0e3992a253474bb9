"""The specification, sentence by sentence, against the real server."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener import (
    CallbackNotRegistered,
    Listener,
    ListenerStopped,
    hookimpl,
)
from classic.pg.listener.testing import WAIT, notify, wait_until
from fix_descriptors import descriptors_above_1024


class Recorder:
    """A callback that remembers what it got and lets tests wait for it."""

    def __init__(self, expected: int = 1):
        self.expected = expected
        self.calls: list[tuple[Notify, str]] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, notify: Notify) -> None:
        with self._lock:
            self.calls.append((notify, threading.current_thread().name))
            if len(self.calls) >= self.expected:
                self.done.set()

    @property
    def payloads(self) -> list[str]:
        return [n.payload for n, _ in self.calls]

    def wait(self) -> None:
        assert self.done.wait(WAIT), f"got {len(self.calls)} of {self.expected}"


def backend_query(conn: psycopg.Connection[Any], pid: int | None) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT query, state_change FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    assert row is not None
    return tuple(row)


# -- add_callback / remove_callback and their futures ---------------------------


def test_callback_gets_the_notification(make_listener, conn, channel):
    listener = make_listener()
    got = Recorder()
    future = listener.add_callback(got, channel)
    assert isinstance(future, Future)
    listener.start()
    assert future.result(WAIT) is None
    notify(conn, channel, "hello")
    got.wait()
    notification = got.calls[0][0]
    assert isinstance(notification, Notify)
    assert (notification.channel, notification.payload) == (channel, "hello")
    assert notification.pid == conn.info.backend_pid


def test_add_callback_while_running(make_listener, conn, channel):
    listener = make_listener()
    listener.start()
    got = Recorder()
    assert listener.add_callback(got, channel).result(WAIT) is None
    notify(conn, channel, "late")
    got.wait()
    assert got.payloads == ["late"]


def test_several_callbacks_on_one_channel_each_called_once(
    make_listener, conn, channel
):
    listener = make_listener()
    first, second = Recorder(2), Recorder(2)
    listener.add_callback(first, channel)  # before start: applied on connect
    listener.start()
    listener.add_callback(second, channel).result(WAIT)
    notify(conn, channel, "a", "b")
    first.wait()
    second.wait()
    # The pool keeps no order between notifications: compare as sets.
    assert sorted(first.payloads) == sorted(second.payloads) == ["a", "b"]


def test_callbacks_changed_on_a_busy_channel_apply_after_their_future(
    make_listener, conn, channel
):
    listener = make_listener(max_workers=0)  # inline: one order for both
    first, second = Recorder(), Recorder()
    listening = listener.add_callback(first, channel)
    listener.start()
    listening.result(WAIT)
    notify(conn, channel, "first only")
    first.wait()
    listener.add_callback(second, channel).result(WAIT)
    notify(conn, channel, "both")
    wait_until(lambda: len(second.calls) == 1, "the added callback's first call")
    listener.remove_callback(first, channel).result(WAIT)
    notify(conn, channel, "second only")
    wait_until(lambda: len(second.calls) == 2, "the remaining callback's call")
    assert first.payloads == ["first only", "both"]
    assert second.payloads == ["both", "second only"]


def test_a_burst_of_callbacks_on_one_channel_keeps_the_connection(
    make_listener, conn, channel
):
    """Every SSE client of a channel reconnecting at once: thousands of
    add_callback() in one burst. Each costs the same however many the
    channel has, and the loop reads between shares of them, so the statement
    queued behind the burst is not timed out for want of reading."""
    n = 10_000
    listener = make_listener(max_workers=0, ping_timeout=0.5)
    listener.start()
    got: list[int] = []

    def make_callback(i: int) -> Any:
        return lambda notify: got.append(i)

    callbacks = [make_callback(i) for i in range(n)]
    added = [listener.add_callback(callback, channel) for callback in callbacks]
    behind = listener.add_callback(Recorder(), channel + "_behind")  # a LISTEN
    for future in [*added, behind]:
        future.result(WAIT)
    notify(conn, channel, "to all")
    wait_until(lambda: len(got) == n, "every callback's call")
    assert sorted(got) == list(range(n))
    removed = [listener.remove_callback(callback, channel) for callback in callbacks]
    for future in removed:
        future.result(WAIT)
    assert set(listener.channels) == {channel + "_behind"}
    assert listener.reconnects == 0


def test_an_unhashable_callback_is_refused_at_the_call(listener, channel):
    @dataclass
    class Callback:  # eq=True without frozen=True: no __hash__
        name: str

        def __call__(self, notify: Notify) -> None:
            pass

    kept = Recorder()
    listener.add_callback(kept, channel).result(WAIT)
    with pytest.raises(TypeError, match="must be hashable"):
        listener.add_callback(Callback("x"), channel, catch_up=lambda: None)
    assert listener.channels == {channel: (kept,)}
    assert listener.responsive(WAIT)  # the loop goes on


def test_a_socket_numbered_above_1024_is_served(make_listener, dsn, conn, channel):
    made: list[psycopg.Connection[Any]] = []
    got = Recorder(2)
    with descriptors_above_1024() as take_low:

        def factory() -> psycopg.Connection[Any]:
            take_low()
            made.append(psycopg.connect(dsn, autocommit=True))
            return made[-1]

        listener = make_listener(factory)
        listening = listener.add_callback(got, channel)
        listener.start()
        listening.result(WAIT)
    assert made[-1].pgconn.socket > 1024
    notify(conn, channel, "high", "and high")
    got.wait()
    assert got.payloads == ["high", "and high"]


def test_channels_interleaved_in_one_transaction_keep_commit_order(
    make_listener, conn, channel
):
    listener = make_listener(max_workers=0)
    got = Recorder(400)
    channels = [channel + suffix for suffix in "abc"]
    futures = [listener.add_callback(got, name) for name in channels[:2]]
    listener.start()
    for future in futures:
        future.result(WAIT)
    sent = [(channels[i % 3], str(i)) for i in range(600)]
    conn.execute(
        "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
        ([c for c, _ in sent], [p for _, p in sent]),
    )
    got.wait()
    assert [(n.channel, n.payload) for n, _ in got.calls] == [
        (c, p) for c, p in sent if c != channels[2]
    ]


def test_one_callback_on_several_channels(make_listener, conn, channel):
    listener = make_listener(max_workers=0)
    got = Recorder(2)
    futures = [listener.add_callback(got, channel + suffix) for suffix in "xy"]
    listener.start()
    for future in futures:
        future.result(WAIT)
    notify(conn, channel + "x", "1")
    notify(conn, channel + "y", "2")
    got.wait()
    assert [(n.channel, n.payload) for n, _ in got.calls] == [
        (channel + "x", "1"),
        (channel + "y", "2"),
    ]


def test_adding_a_callback_twice_calls_it_once(make_listener, conn, channel):
    listener = make_listener(max_workers=0)
    got = Recorder()
    listener.start()
    listener.add_callback(got, channel).result(WAIT)
    listener.add_callback(got, channel).result(WAIT)
    notify(conn, channel, "once")
    got.wait()
    listener.stop()
    listener.join(WAIT)
    assert got.payloads == ["once"]
    assert listener.channels == {channel: (got,)}


def test_listen_once_per_channel_unlisten_with_the_last(make_listener, conn, channel):
    listener = make_listener()
    first, second = Recorder(), Recorder()
    listener.start()
    wait_until(lambda: listener.stats().connected, "the connection")
    listener.add_callback(first, channel).result(WAIT)
    pid = listener.backend_pid
    query, changed = backend_query(conn, pid)
    assert query == f'LISTEN "{channel}"'

    listener.add_callback(second, channel).result(WAIT)
    listener.remove_callback(first, channel).result(WAIT)
    assert backend_query(conn, pid) == (query, changed), "a second LISTEN was sent"

    listener.remove_callback(second, channel).result(WAIT)
    assert backend_query(conn, pid)[0] == f'UNLISTEN "{channel}"'
    assert listener.channels == {}


def test_remove_callback_stops_delivery(make_listener, conn, channel):
    listener = make_listener(max_workers=0)
    removed, kept = Recorder(), Recorder(2)
    listener.start()
    listener.add_callback(removed, channel).result(WAIT)
    listener.add_callback(kept, channel).result(WAIT)
    notify(conn, channel, "both")
    removed.wait()
    assert listener.remove_callback(removed, channel).result(WAIT) is None
    notify(conn, channel, "kept only")
    kept.wait()
    assert removed.payloads == ["both"]
    assert kept.payloads == ["both", "kept only"]


def test_remove_unregistered_callback_future_raises(make_listener, channel):
    listener = make_listener()
    listener.start()
    future = listener.remove_callback(print, channel)
    with pytest.raises(CallbackNotRegistered, match=channel):
        future.result(WAIT)


def test_failed_listen_future_raises_and_nothing_is_lost(
    make_listener, dsn, conn, channel
):
    # LATIN1 cannot encode this channel: the serving thread fails to build the
    # LISTEN, and the future must carry that error back.
    listener = make_listener(
        lambda: psycopg.connect(dsn, autocommit=True, client_encoding="LATIN1"),
        max_workers=0,
    )
    kept = Recorder()
    listener.add_callback(kept, channel)
    listener.start()
    future = listener.add_callback(print, "канал")
    with pytest.raises(UnicodeEncodeError):
        future.result(WAIT)
    assert "канал" not in listener.channels
    notify(conn, channel, "still here")
    kept.wait()


@pytest.mark.parametrize(
    "name",
    ["MixedCase", "with space", 'quote"inside', "it's", "ünïcødé_канал", "a" * 63],
)
def test_channel_names_are_quoted_identifiers(make_listener, conn, name):
    listener = make_listener(max_workers=0)
    got = Recorder()
    listener.start()
    listener.add_callback(got, name).result(WAIT)
    notify(conn, name, "x")
    got.wait()
    assert got.calls[0][0].channel == name


def test_futures_resolve_while_notifications_flow(make_listener, dsn, channel):
    """add/remove must not wait for a quiet moment (a deadlock of older listeners)."""
    listener = make_listener()
    flood = Recorder(10**9)
    listener.start()
    listener.add_callback(flood, channel).result(WAIT)
    stop_flood = threading.Event()

    def send() -> None:
        # About 25k/s, which a listener keeps up with: the server answers a
        # statement only after the notifications queued before it, so a
        # flood faster than the reader would delay any answer without bound
        # (unless the reader buffered it all in memory, which it must not).
        with psycopg.connect(dsn, autocommit=True) as sender:
            batch = 0
            while not stop_flood.wait(0.02):
                notify(sender, channel, *(f"{batch}-{i}" for i in range(500)))
                batch += 1

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_until(lambda: bool(flood.calls), "the flood")
        for i in range(50):
            other = f"{channel}_{i}"
            listener.add_callback(print, other).result(WAIT)
            listener.remove_callback(print, other).result(WAIT)
    finally:
        stop_flood.set()
        sender.join(WAIT)
    assert flood.calls


# -- bad input --------------------------------------------------------------


@pytest.mark.parametrize("method", ["add_callback", "remove_callback"])
def test_bad_arguments_are_refused_at_the_call(make_listener, method, channel):
    listener = make_listener()
    listener.start()
    # Once connected, the database's encoding is known: channel lengths are
    # measured in its bytes, at the call.
    wait_until(lambda: listener.stats().connected, "the connection")
    call = getattr(listener, method)
    with pytest.raises(TypeError, match="callable"):
        call("not callable", channel)
    with pytest.raises(ValueError, match="non-empty"):
        call(print, "")
    with pytest.raises(TypeError, match="str"):
        call(print, 42)
    with pytest.raises(ValueError, match="str"):
        call(print, None)
    with pytest.raises(ValueError, match="63"):
        call(print, "a" * 64)
    with pytest.raises(ValueError, match="63"):
        call(print, "é" * 32)  # 64 bytes in UTF-8, the test database's encoding
    with pytest.raises(ValueError, match="NUL"):
        call(print, "a\0b")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": -1}, "max_workers"),
        ({"ping_period": -1}, "ping_period"),
        ({"ping_timeout": 0}, "ping_timeout"),
        ({"max_backlog": 0}, "max_backlog"),
        ({"reconnect_delay": 0}, "reconnect delay"),
        ({"max_reconnect_attempts": 0}, "max_reconnect_attempts"),
    ],
)
def test_bad_settings_are_refused(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Listener(factory, **kwargs)


def test_factory_must_be_callable():
    with pytest.raises(TypeError, match="connection_factory"):
        Listener("host=localhost")  # type: ignore[arg-type]


def test_connection_without_autocommit_is_refused(make_listener, dsn, channel):
    listener = make_listener(lambda: psycopg.connect(dsn))
    future = listener.add_callback(print, channel)
    with pytest.raises(ValueError, match="autocommit"):
        listener.run()
    with pytest.raises(ValueError, match="autocommit"):
        future.result(0)


def test_factory_returning_something_else_is_refused(make_listener):
    listener = make_listener(lambda: "host=localhost")
    listener.start()
    listener.join(WAIT)
    assert isinstance(listener.exception, TypeError)
    assert "psycopg.Connection, got str" in str(listener.exception)


# -- run / start / stop / join ------------------------------------------------


def test_run_with_no_workers_is_single_threaded(make_listener, conn, channel):
    """With run() and max_workers=0, everything happens in the caller's thread."""
    listener = make_listener(max_workers=0)
    threads: list[int] = []

    def callback(notification: Notify) -> None:
        threads.append(threading.get_ident())
        listener.stop()

    future = listener.add_callback(callback, channel)
    future.add_done_callback(lambda _: threads.append(threading.get_ident()))

    def send_once_listening() -> None:
        future.result(WAIT)
        notify(conn, channel)

    sender = threading.Thread(target=send_once_listening)
    sender.start()
    listener.run()
    sender.join(WAIT)
    assert threads == [threading.get_ident()] * 2


def test_pool_runs_callbacks_in_named_worker_threads(make_listener, conn, channel):
    listener = make_listener(name="orders")
    got = Recorder()
    listener.add_callback(got, channel)
    listener.start()
    listener.add_callback(got, channel).result(WAIT)
    notify(conn, channel)
    got.wait()
    assert got.calls[0][1].startswith("orders-callback")


def test_default_pool_runs_callbacks_concurrently(make_listener, conn, channel):
    listener = make_listener()
    barrier = threading.Barrier(2, timeout=WAIT)
    passed = Recorder(2)

    def callback(notification: Notify) -> None:
        barrier.wait()  # breaks unless two callbacks run at once
        passed(notification)

    listener.start()
    listener.add_callback(callback, channel).result(WAIT)
    listener.add_callback(callback, channel + "2").result(WAIT)
    notify(conn, channel, "1")
    notify(conn, channel + "2", "2")
    passed.wait()


def test_inline_mode_with_start_runs_in_the_listener_thread(
    make_listener, conn, channel
):
    listener = make_listener(max_workers=0, name="inline")
    got = Recorder()
    listener.start()
    listener.add_callback(got, channel).result(WAIT)
    notify(conn, channel)
    got.wait()
    assert got.calls[0][1] == "inline"


def test_raising_callback_is_logged_and_others_still_run(
    make_listener, conn, channel, caplog
):
    listener = make_listener(max_workers=0)
    got = Recorder(2)

    def broken(notification: Notify) -> None:
        raise RuntimeError("boom")

    listener.start()
    listener.add_callback(broken, channel).result(WAIT)
    listener.add_callback(got, channel).result(WAIT)
    with caplog.at_level(logging.ERROR, logger="classic.pg.listener"):
        notify(conn, channel, "1", "2")
        got.wait()
    assert got.payloads == ["1", "2"]
    failures = [r for r in caplog.records if "boom" in str(r.exc_info)]
    assert len(failures) == 2
    assert channel in failures[0].getMessage()


def test_start_twice_and_join_before_start(make_listener):
    listener = make_listener()
    with pytest.raises(RuntimeError, match="not started"):
        listener.join()
    listener.start()
    with pytest.raises(RuntimeError, match="once"):
        listener.start()
    with pytest.raises(RuntimeError, match="once"):
        listener.run()


def test_stop_is_idempotent_prompt_and_callable_from_a_callback(
    make_listener, conn, channel
):
    listener = make_listener()
    listener.start()
    listener.add_callback(lambda n: listener.stop(), channel).result(WAIT)
    notify(conn, channel)
    listener.join(WAIT)
    assert not listener.is_alive()
    listener.stop()
    listener.stop()
    assert listener.exception is None


def test_stop_before_run_makes_run_return(make_listener, channel):
    listener = make_listener()
    future = listener.add_callback(print, channel)
    listener.stop()
    listener.run()
    with pytest.raises(ListenerStopped):
        future.result(0)
    late = listener.add_callback(print, channel)
    with pytest.raises(ListenerStopped):
        late.result(0)


def test_idle_listener_stops_within_100_ms(make_listener, channel):
    latencies = []
    for _ in range(5):
        listener = make_listener()
        listener.start()
        listener.add_callback(print, channel).result(WAIT)
        started = time.perf_counter()
        listener.stop()
        listener.join(WAIT)
        latencies.append(time.perf_counter() - started)
        assert not listener.is_alive()
    assert sorted(latencies)[2] < 0.1, latencies


def test_idle_listener_does_not_wake_up(make_listener, channel):
    """No polling loop: the serving thread sleeps until something happens."""
    listener = make_listener(name="idle")
    listener.start()
    listener.add_callback(print, channel).result(WAIT)
    (thread,) = [t for t in threading.enumerate() if t.name == "idle"]

    def switches() -> int:
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches")

    before = switches()
    threading.Event().wait(1.0)  # the idle second being observed, not a sync
    assert switches() - before <= 1


def test_context_manager_starts_and_stops(factory, conn, channel):
    got = Recorder()
    with Listener(factory) as listener:
        listener.add_callback(got, channel).result(WAIT)
        assert listener.is_alive()
        notify(conn, channel)
        got.wait()
    assert not listener.is_alive()


def test_join_waits_for_callbacks_already_accepted(make_listener, conn, channel):
    listener = make_listener(max_workers=2)
    gate = threading.Event()
    finished = Recorder(50)

    def slow(notification: Notify) -> None:
        gate.wait(WAIT)
        finished(notification)

    listener.start()
    listener.add_callback(slow, channel).result(WAIT)
    notify(conn, channel, *map(str, range(50)))
    wait_until(lambda: listener.backlog == 50, "50 callbacks in the backlog")
    listener.stop()
    threading.Timer(0.2, gate.set).start()
    listener.join(WAIT)
    assert not listener.is_alive()
    assert sorted(finished.payloads, key=int) == [str(i) for i in range(50)]


# -- callbacks changing the listener -------------------------------------------


def test_inline_callback_can_add_and_remove_without_deadlock(
    make_listener, conn, channel
):
    listener = make_listener(max_workers=0)
    later = Recorder()
    futures: list[Future[None]] = []
    added = threading.Event()

    def first(notification: Notify) -> None:
        futures.append(listener.add_callback(later, channel + "_next"))
        futures.append(listener.remove_callback(first, channel))
        added.set()

    listener.start()
    listener.add_callback(first, channel).result(WAIT)
    notify(conn, channel)
    assert added.wait(WAIT)
    for future in futures:
        assert future.result(WAIT) is None
    notify(conn, channel + "_next", "next")
    later.wait()
    assert list(listener.channels) == [channel + "_next"]


def test_waiting_on_a_future_inside_an_inline_callback_raises(
    make_listener, conn, channel
):
    listener = make_listener(max_workers=0)
    errors: list[BaseException] = []
    done = threading.Event()

    def callback(notification: Notify) -> None:
        try:
            listener.add_callback(print, channel + "_x").result(WAIT)
        except RuntimeError as ex:
            errors.append(ex)
        done.set()

    listener.start()
    listener.add_callback(callback, channel).result(WAIT)
    notify(conn, channel)
    assert done.wait(WAIT)
    assert "deadlock" in str(errors[0])


# -- ping -----------------------------------------------------------------------


class PingWatcher:
    """A plugin telling the test when a ping was answered."""

    def __init__(self) -> None:
        self.pinged = threading.Event()

    @hookimpl
    def listener_ping(self, error: BaseException | None) -> None:
        if error is None:
            self.pinged.set()


def test_ping_after_ping_period_of_silence(make_listener, conn, channel):
    watcher = PingWatcher()
    listener = make_listener(ping_period=0.3, plugins=[watcher])
    listener.start()
    wait_until(lambda: listener.stats().connected, "the connection")
    listener.add_callback(print, channel).result(WAIT)
    pid = listener.backend_pid
    assert backend_query(conn, pid)[0] == f'LISTEN "{channel}"'
    assert watcher.pinged.wait(WAIT)
    # Seen from the server: the listener's session ran the ping query.
    assert "pg_notification_queue_usage()" in backend_query(conn, pid)[0]


def test_no_ping_with_ping_period_zero(make_listener, conn, channel):
    watcher = PingWatcher()
    listener = make_listener(ping_period=0, plugins=[watcher])
    listener.start()
    listener.add_callback(print, channel).result(WAIT)
    pid = listener.backend_pid
    # The server marks the session idle a moment after its answer arrived.
    wait_until(
        lambda: (
            conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            == ("idle",)
        ),
        "the session to be idle",
    )
    before = backend_query(conn, pid)
    assert not watcher.pinged.wait(1.0)
    assert backend_query(conn, pid) == before


def test_ping_defaults_to_a_minute(factory):
    import inspect

    assert inspect.signature(Listener).parameters["ping_period"].default == 60

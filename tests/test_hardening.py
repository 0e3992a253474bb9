"""Regression tests of the hardening issue (#10): one per defect, real server.

Each test is named after the item it covers (``test_item_N_...``) and asserts
what a user relies on, not how the serving loop achieves it. Those that need
a database of another encoding, a backend held or stopped, or a server that
must not be the shared one use the throwaway server (``fix_server``).
"""

from __future__ import annotations

import array
import concurrent.futures
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from psycopg import Notify, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from classic.pg.listener import InvalidChannel, Listener, ListenerStopped, hookimpl
from classic.pg.listener.testing import WAIT, HookWaiter, notify, wait_until
from fix_proxy import Proxy
from fix_server import ThrowawayServer
from test_resilience import Inbox


class Connected:
    """A plugin keeping the listener's connections and the ping errors."""

    def __init__(self) -> None:
        self.connections: list[psycopg.Connection[Any]] = []
        self.ping_errors: list[BaseException | None] = []
        self.connected = threading.Event()

    @hookimpl
    def listener_connected(self, connection: psycopg.Connection[Any]) -> None:
        self.connections.append(connection)
        self.connected.set()

    @hookimpl
    def listener_ping(self, error: BaseException | None) -> None:
        self.ping_errors.append(error)


def database(server: ThrowawayServer, name: str, encoding: str) -> str:
    """The DSN of a database of ``encoding`` on the throwaway server, made once."""
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone():
            conn.execute(
                sql.SQL(
                    "CREATE DATABASE {} TEMPLATE template0 ENCODING {}"
                    " LC_COLLATE 'C' LC_CTYPE 'C'"
                ).format(sql.Identifier(name), sql.Literal(encoding))
            )
    return make_conninfo(server.dsn, dbname=name)


@pytest.fixture
def stop_listeners() -> Iterator[list[Listener]]:
    """Listeners not made by ``make_listener`` (another server): stopped after."""
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.stop()
    for listener in made:
        if listener.is_alive():
            listener.join(WAIT)


# -- 1. stop()+join() while a pool callback waits on a request future ------------------


def test_item_1_join_returns_while_a_pool_callback_waits_on_a_request(
    make_listener, conn, channel
):
    entered = threading.Event()
    stop_called = threading.Event()
    outcome: list[BaseException | None] = []

    def waits_on_a_request(notify: Notify) -> None:
        entered.set()
        stop_called.wait(WAIT)
        future = listener.add_callback(print, channel + "_late")
        try:
            # No timeout would hang the old listener for good; this one
            # outlasts the join below.
            future.result(WAIT)
            outcome.append(None)
        except BaseException as ex:
            outcome.append(ex)

    listener = make_listener(max_workers=2)
    listener.start()
    listener.add_callback(waits_on_a_request, channel).result(WAIT)
    notify(conn, channel, "go")
    assert entered.wait(WAIT)

    listener.stop()
    stop_called.set()
    listener.join(WAIT / 2)

    assert not listener.is_alive(), "join() did not return while the callback waited"
    assert len(outcome) == 1
    assert isinstance(outcome[0], ListenerStopped), outcome
    assert listener.exception is None


# -- 2. stop() from a signal handler ---------------------------------------------------

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, random, signal, sys
    import psycopg
    from classic.pg.listener import Listener

    dsn, rounds = sys.argv[1], int(sys.argv[2])
    random.seed(rounds)
    for round in range(rounds):
        listener = Listener(lambda: psycopg.connect(dsn, autocommit=True))
        fired = []

        def handler(signum, frame):
            listener.stop()
            fired.append(signum)

        signal.signal(signal.SIGALRM, handler)
        listener.start()
        channel = f"signal_{os.getpid()}_{round}"
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.001, 0.02))
        while not fired:
            listener.add_callback(print, channel)
            listener.remove_callback(print, channel)
        listener.join(10)
        if listener.is_alive():
            sys.exit(f"round {round}: the listener did not stop")
    print("stopped", rounds, "times")
    """
)


def test_item_2_stop_from_a_signal_handler_never_deadlocks(dsn, tmp_path):
    script = tmp_path / "signal_stop.py"
    script.write_text(_SIGNAL_SCRIPT)
    rounds = 40
    try:
        result = subprocess.run(
            [sys.executable, str(script), dsn, str(rounds)],
            capture_output=True,
            text=True,
            timeout=2 * WAIT,
        )
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"stop() from a signal handler hung: {ex.stdout!r} {ex.stderr!r}")
    assert result.returncode == 0, result.stderr
    assert f"stopped {rounds} times" in result.stdout


# -- 3. an undecodable payload ---------------------------------------------------------


def test_item_3_an_undecodable_payload_is_delivered_losslessly(
    throwaway, stop_listeners, channel
):
    dsn = database(throwaway, "hardening_sql_ascii", "SQL_ASCII")
    inbox = Inbox()
    listener = Listener(lambda: psycopg.connect(dsn, autocommit=True), max_workers=0)
    stop_listeners.append(listener)
    listener.start()
    listener.add_callback(inbox, channel).result(WAIT)

    # A UTF-8 client sends bytes the SQL_ASCII database stores unconverted:
    # the listener's connection reports the encoding as ascii.
    with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as sender:
        with sender.transaction():
            for payload in ("before", "café", "after"):
                sender.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        assert inbox.payloads(3)[::2] == ["before", "after"]

        notify(sender, channel, "later")
        assert inbox.get().payload == "later"

    assert listener.is_alive()
    listener.stop()
    listener.join(WAIT)
    assert listener.exception is None


def test_item_3_the_undecodable_payload_gives_its_bytes_back(
    throwaway, stop_listeners, channel
):
    dsn = database(throwaway, "hardening_sql_ascii", "SQL_ASCII")
    inbox = Inbox()
    listener = Listener(lambda: psycopg.connect(dsn, autocommit=True), max_workers=0)
    stop_listeners.append(listener)
    listener.start()
    listener.add_callback(inbox, channel).result(WAIT)
    with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as sender:
        sender.execute("SELECT pg_notify(%s, 'café')", (channel,))
        payload = inbox.get().payload
    assert payload.encode("ascii", "surrogateescape") == "café".encode()


# -- 4. an error that is not the statement's own ---------------------------------------


def test_item_4_an_untranslatable_notification_after_the_ping_is_not_its_failure(
    throwaway, stop_listeners, channel, caplog
):
    """A notification the server cannot convert to the client encoding,
    signalled while the ping runs, is sent between the ping's CommandComplete
    and its ReadyForQuery. The ping is held deterministically: a SERIALIZABLE
    READ ONLY DEFERRABLE session waits for a safe snapshot while a
    serializable transaction is open.

    Since PostgreSQL's 2024 minor releases the server upgrades that error to
    FATAL and closes the session (asyncQueueReadAllNotifications sets
    ExitOnAnyError): the listener must then reconnect, its change must not
    fail and later notifications must arrive. Older servers send an ERROR and
    keep the session: the same assertions hold, with no reconnection.
    """
    dsn = throwaway.dsn
    options = (
        "-c default_transaction_isolation=serializable"
        " -c default_transaction_read_only=on -c default_transaction_deferrable=on"
    )
    plugin = Connected()
    inbox, later = Inbox(), Inbox()
    listener = Listener(
        lambda: psycopg.connect(
            dsn, autocommit=True, client_encoding="LATIN1", options=options
        ),
        max_workers=0,
        ping_period=0.1,
        ping_timeout=WAIT,
        reconnect_delay=0.05,
        plugins=[plugin],
    )
    stop_listeners.append(listener)
    listener.start()
    listener.add_callback(inbox, channel).result(WAIT)
    pid = listener.backend_pid
    caplog.set_level(logging.WARNING, logger="classic.pg.listener")

    with (
        psycopg.connect(dsn, autocommit=True) as sender,
        psycopg.connect(dsn) as holder,
    ):
        holder.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        holder.execute("SELECT 1")  # a serializable snapshot: pings now wait
        wait_until(
            lambda: (
                sender.execute(
                    "SELECT wait_event = 'SafeSnapshot' FROM pg_stat_activity"
                    " WHERE pid = %s",
                    (pid,),
                ).fetchone()
                == (True,)
            ),
            "the ping to wait for a safe snapshot",
        )
        added = listener.add_callback(later, channel + "_later")
        sender.execute("SELECT pg_notify(%s, '€ 中')", (channel,))
        holder.rollback()  # the ping completes, then the server sends the error

        assert added.result(WAIT) is None
        notify(sender, channel, "after")
        notify(sender, channel + "_later", "later")
        assert inbox.get().payload == "after"
        assert later.get().payload == "later"

    assert listener.is_alive()
    assert any(
        "has no equivalent in encoding" in record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
    ), [r.getMessage() for r in caplog.records]
    listener.stop()
    listener.join(WAIT)
    assert listener.exception is None


# -- 5. a cancelled request future and the shutdown ------------------------------------


def test_item_5_a_cancelled_future_does_not_break_the_shutdown(make_listener, channel):
    def unreachable() -> psycopg.Connection[Any]:
        raise psycopg.OperationalError("the database is down")

    waiter = HookWaiter()
    listener = make_listener(
        unreachable, reconnect_delay=0.01, max_reconnect_delay=0.05, plugins=[waiter]
    )
    listener.start()
    gave_up = listener.add_callback(print, channel)
    with pytest.raises(concurrent.futures.TimeoutError):
        gave_up.result(timeout=0.05)
    assert gave_up.cancel()
    other = listener.add_callback(print, channel + "_other")

    listener.stop()
    listener.join(WAIT)

    assert not listener.is_alive()
    assert listener.exception is None
    assert isinstance(other.exception(timeout=WAIT), ListenerStopped)
    waiter.wait("listener_stopped")


# -- 6. a change while the backlog is full ---------------------------------------------


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_item_6_a_change_while_the_backlog_is_full_keeps_memory_bounded(
    make_listener, conn, channel
):
    count, size = 20_000, 1000
    gate = threading.Event()
    received: list[str] = []
    lock = threading.Lock()
    all_in = threading.Event()

    def slow(notify: Notify) -> None:
        gate.wait(WAIT)
        with lock:
            received.append(notify.payload)
            if len(received) == count:
                all_in.set()

    waiter = HookWaiter()
    listener = make_listener(
        max_workers=2, max_backlog=5, ping_period=0.2, ping_timeout=1.0
    )
    listener.register_plugin(waiter)
    listener.start()
    listener.add_callback(slow, channel).result(WAIT)

    # Sent by the server itself, so that the test process holds none of it.
    conn.execute(
        "SELECT pg_notify(%s, lpad(i::text, %s, '.')) FROM generate_series(1, %s) AS i",
        (channel, size, count),
    )
    try:
        wait_until(lambda: listener.backlog >= 5, "the backlog to fill")
        before = _rss_kb()
        later = Inbox()
        added = listener.add_callback(later, channel + "_later")
        # Longer than ping_timeout: silence while reading is paused is no loss.
        concurrent.futures.wait([added], timeout=1.5)
        grown_mb = (_rss_kb() - before) / 1024
    finally:
        gate.set()
    # The queue is 20 MB; libpq's read buffer and a few batches are not.
    assert grown_mb < 8, f"RSS grew by {grown_mb:.1f} MB while the backlog was full"

    assert added.result(WAIT) is None
    assert all_in.wait(WAIT), f"{len(received)} of {count} delivered"
    assert sorted(received) == sorted(
        str(i).rjust(size, ".") for i in range(1, count + 1)
    )
    notify(conn, channel + "_later", "later")
    assert later.get().payload == "later"
    assert waiter.counts.get("listener_disconnected", 0) == 0
    assert listener.reconnects == 0


# -- 7. every blocking wait on a request future from the serving thread ----------------


def test_item_7_every_blocking_wait_from_the_serving_thread_raises(
    make_listener, conn, channel
):
    outcomes: dict[str, str] = {}
    done = threading.Event()

    class Contributes:
        @hookimpl
        def listener_register_callbacks(self, register):
            register(print, channel + "_plugin")

    def outcome(what: str, wait: Callable[[], object]) -> None:
        started = time.monotonic()
        try:
            wait()
            outcomes[what] = "returned"
        except RuntimeError:
            outcomes[what] = "RuntimeError"
        except BaseException as ex:
            waited = time.monotonic() - started
            outcomes[what] = f"{type(ex).__name__} after {waited:.1f} s"

    def inline(notify: Notify) -> None:
        future = listener.add_callback(print, channel + "_pending")
        outcome("exception()", lambda: future.exception(timeout=1))
        outcome("wait()", lambda: concurrent.futures.wait([future], timeout=1))
        outcome(
            "as_completed()",
            lambda: next(concurrent.futures.as_completed([future], timeout=1)),
        )
        removal = listener.unregister_plugin("contributes")
        outcome("unregister_plugin().result()", lambda: removal.result(timeout=1))
        done.set()

    listener = make_listener(max_workers=0)
    listener.register_plugin(Contributes(), "contributes")
    listener.start()
    listener.add_callback(inline, channel).result(WAIT)
    notify(conn, channel, "go")
    assert done.wait(WAIT)
    assert outcomes == dict.fromkeys(outcomes, "RuntimeError"), outcomes
    assert len(outcomes) == 4


# -- 9. a KeyboardInterrupt in run() ---------------------------------------------------


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_item_9_a_keyboard_interrupt_in_run_leaves_no_future_running(
    throwaway, channel
):
    """The LISTEN is held in flight for good by stopping its backend (SIGSTOP),
    then SIGINT reaches the thread in run(), as Ctrl-C would."""
    dsn = throwaway.dsn
    plugin = Connected()
    listener = Listener(
        lambda: psycopg.connect(dsn, autocommit=True),
        max_workers=0,
        ping_timeout=WAIT,
        plugins=[plugin],
    )
    main = threading.get_ident()
    futures: list[Future[None]] = []
    stopped: list[int] = []
    failures: list[BaseException] = []

    def interrupt() -> None:
        try:
            assert plugin.connected.wait(WAIT)
            pid = plugin.connections[0].info.backend_pid
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            wait_until(lambda: _state(pid) == "T", "the backend to stop")
            in_flight = listener.add_callback(print, channel)
            futures.append(in_flight)
            wait_until(in_flight.running, "the LISTEN to be sent")
            futures.append(listener.add_callback(print, channel + "_queued"))
        except BaseException as ex:
            failures.append(ex)
        finally:
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    helper = threading.Thread(target=interrupt)
    try:
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            listener.run()
    finally:
        helper.join(WAIT)
        signal.signal(signal.SIGINT, previous)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert not failures, failures
    assert len(futures) == 2
    for future in futures:
        assert future.done(), "a future was left running"
        assert isinstance(future.exception(), ListenerStopped)
    assert isinstance(listener.exception, KeyboardInterrupt)


def _unread(connection: psycopg.Connection[Any]) -> int:
    """Bytes the server sent that the connection has not read yet."""
    buf = array.array("i", [0])
    fcntl.ioctl(connection.pgconn.socket, termios.FIONREAD, buf)
    return buf[0]


def test_item_9_a_keyboard_interrupt_from_an_inline_callback_settles_the_listen(
    dsn, conn, channel
):
    """The second notification is in the socket before the LISTEN is sent, so
    the callback that raises runs while the LISTEN waits for its answer (the
    serving loop dispatches around a statement in flight)."""
    plugin = Connected()
    listener = Listener(
        lambda: psycopg.connect(dsn, autocommit=True), max_workers=0, plugins=[plugin]
    )
    futures: list[Future[None]] = []

    def inline(notify: Notify) -> None:
        if notify.payload == "interrupt":
            raise KeyboardInterrupt
        futures.append(listener.add_callback(print, channel + "_in_flight"))
        notify_conn = plugin.connections[-1]
        conn.execute("SELECT pg_notify(%s, 'interrupt')", (channel,))
        wait_until(lambda: _unread(notify_conn) > 0, "the notification to be sent")

    listener.add_callback(inline, channel)

    def first() -> None:
        plugin.connected.wait(WAIT)
        notify(conn, channel, "first")

    threading.Thread(target=first).start()
    with pytest.raises(KeyboardInterrupt):
        listener.run()
    assert len(futures) == 1
    assert futures[0].done(), "the LISTEN's future was left running"
    error = futures[0].exception()
    assert error is None or isinstance(error, ListenerStopped), error


# -- 13. smaller ones ------------------------------------------------------------------


class RefusingProxy(Proxy):
    """A relay that turns one statement into one the server refuses (same length)."""

    def __init__(self, target: tuple[str, int], statement: bytes, refused: bytes):
        assert len(statement) == len(refused)
        self.statement, self.refused = statement, refused
        super().__init__(target)

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._peers[sock].sendall(data.replace(self.statement, self.refused))
                return
        except OSError:
            pass
        self._drop(sock)


def test_item_13_a_refused_unlisten_changes_nothing(make_listener, dsn, conn, channel):
    """No server refuses an UNLISTEN it accepted the LISTEN of (only a
    standby refuses both), so a relay makes the refusal: it rewrites the
    UNLISTEN into a statement of the same length the server rejects."""
    params = conninfo_to_dict(dsn)
    target = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    unlisten = f'UNLISTEN "{channel}"'.encode()
    proxy = RefusingProxy(target, unlisten, b"UNLISTEX" + unlisten[8:])
    try:
        via = make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
        inbox = Inbox()
        listener = make_listener(lambda: psycopg.connect(via, autocommit=True))
        listener.start()
        listener.add_callback(inbox, channel).result(WAIT)

        with pytest.raises(psycopg.errors.SyntaxError):
            listener.remove_callback(inbox, channel).result(WAIT)

        # The session still listens, and the listener still says so.
        assert listener.channels == {channel: (inbox,)}
        notify(conn, channel, "still listened to")
        assert inbox.get().payload == "still listened to"
    finally:
        proxy.close()


def test_item_13_channel_length_is_measured_in_the_database_encoding(
    throwaway, stop_listeners
):
    dsn = database(throwaway, "hardening_latin1", "LATIN1")
    inbox = Inbox()
    listener = Listener(lambda: psycopg.connect(dsn, autocommit=True), max_workers=0)
    stop_listeners.append(listener)
    listener.start()
    longest = "é" * 63  # 63 bytes in LATIN1, 126 in UTF-8
    listener.add_callback(inbox, longest).result(WAIT)
    with psycopg.connect(dsn, autocommit=True) as sender:
        notify(sender, longest, "accented")
        assert inbox.get() == Notify(longest, "accented", sender.info.backend_pid)

    with pytest.raises(InvalidChannel, match="64"):
        listener.add_callback(inbox, "é" * 64).result(WAIT)
    assert list(listener.channels) == [longest]


def test_item_13_a_connection_with_notify_handlers_is_refused(
    make_listener, dsn, channel
):
    made: list[psycopg.Connection[Any]] = []
    handled: list[Notify] = []

    def with_handler() -> psycopg.Connection[Any]:
        conn = psycopg.connect(dsn, autocommit=True)
        conn.add_notify_handler(handled.append)
        made.append(conn)
        return conn

    listener = make_listener(with_handler)
    pending = listener.add_callback(print, channel)
    listener.start()
    listener.join(WAIT)
    try:
        assert not listener.is_alive(), "the listener bypassed the notify handler"
        assert isinstance(listener.exception, ValueError)
        assert "add_notify_handler" in str(listener.exception)
        assert made
        assert made[0].closed
        assert pending.exception(WAIT) is listener.exception
    finally:
        for conn in made:
            conn.close()


def test_item_13_a_connection_of_the_wrong_type_is_closed(make_listener, dsn):
    import asyncio

    made: list[psycopg.AsyncConnection[Any]] = []

    def wrong_type() -> Any:
        conn = asyncio.run(psycopg.AsyncConnection.connect(dsn, autocommit=True))
        made.append(conn)
        return conn

    listener = make_listener(wrong_type)
    listener.start()
    listener.join(WAIT)
    try:
        assert isinstance(listener.exception, TypeError)
        assert made
        assert made[0].closed, "the refused connection was left open"
        assert "AsyncListener" in str(listener.exception)
    finally:
        for conn in made:
            conn.pgconn.finish()


# -- core bugs these items revealed, fixed since ---------------------------------


def test_item_7_waiting_on_rotate_from_the_serving_thread_raises(
    make_listener, conn, channel
):
    outcome: list[str] = []
    done = threading.Event()

    def inline(notify: Notify) -> None:
        started = time.monotonic()
        try:
            listener.rotate().result(timeout=1)
            outcome.append("returned")
        except RuntimeError:
            outcome.append("RuntimeError")
        except BaseException as ex:
            waited = time.monotonic() - started
            outcome.append(f"{type(ex).__name__} after {waited:.1f} s")
        done.set()

    listener = make_listener(max_workers=0)
    listener.start()
    listener.add_callback(inline, channel).result(WAIT)
    notify(conn, channel, "go")
    assert done.wait(WAIT)
    assert outcome == ["RuntimeError"]


def test_item_5_a_cancelled_unregister_plugin_future_is_skipped(
    make_listener, channel, caplog
):
    class Contributes:
        @hookimpl
        def listener_register_callbacks(self, register):
            register(print, channel)

    def unreachable() -> psycopg.Connection[Any]:
        raise psycopg.OperationalError("the database is down")

    waiter = HookWaiter()
    listener = make_listener(unreachable, reconnect_delay=0.01, plugins=[waiter])
    listener.register_plugin(Contributes(), "contributes")
    listener.start()
    removal = listener.unregister_plugin("contributes")
    assert removal.cancel()
    caplog.set_level(logging.ERROR)

    listener.stop()
    listener.join(WAIT)

    assert listener.exception is None
    waiter.wait("listener_stopped")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_item_9_stop_during_a_rotation_resolves_its_future(make_listener, dsn, channel):
    made: list[psycopg.Connection[Any]] = []
    in_factory = threading.Event()
    release = threading.Event()

    def factory() -> psycopg.Connection[Any]:
        if made:  # the rotation's connection
            in_factory.set()
            release.wait(WAIT)
        conn = psycopg.connect(dsn, autocommit=True)
        made.append(conn)
        return conn

    listener = make_listener(factory)
    listener.start()
    listener.add_callback(print, channel).result(WAIT)
    rotation = listener.rotate()
    assert in_factory.wait(WAIT)
    listener.stop()
    release.set()
    listener.join(WAIT)

    assert not listener.is_alive()
    try:
        assert rotation.done(), "the rotation's future was left pending"
        assert isinstance(rotation.exception(), ListenerStopped)
        assert all(conn.closed for conn in made)
    finally:
        for conn in made:
            conn.close()

"""The outbox in one process, against a real server: install, send, handle, fail."""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from classic_pg_listener_outbox import (
    DEFAULT_TABLE,
    Message,
    Outbox,
    install,
    send,
    send_many,
)
from psycopg import sql
from psycopg_pool import ConnectionPool

from classic.pg.listener import InvalidChannel
from classic.pg.listener.testing import WAIT, notify, wait_until


def rows(
    conn, table: str, columns: str = "id, channel, payload"
) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT " + columns + " FROM {} ORDER BY id").format(
        sql.Identifier(table)
    )
    return conn.execute(query).fetchall()


class Recorder:
    """A handler that records what it was given, and can be told to fail."""

    def __init__(self, fail: Any = None):
        self.seen: queue.Queue[Message] = queue.Queue()
        self.fail = fail or (lambda message: False)

    def __call__(self, message: Message, conn: psycopg.Connection[Any]) -> None:
        self.seen.put(message)
        if self.fail(message):
            raise RuntimeError(f"cannot handle {message.payload}")

    def next(self) -> Message:
        return self.seen.get(timeout=WAIT)


# -- install -------------------------------------------------------------------


def test_install_is_idempotent_and_quotes_the_name(conn):
    name = 'Out "box" of MixedCase'
    try:
        install(conn, name)
        install(conn, name)
        send(conn, "ch", "x", table=name)
        assert rows(conn, name, "channel, payload, attempts, last_error, dead_at") == [
            ("ch", "x", 0, None, None)
        ]
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY 1", (name,)
        ).fetchall()
        assert [i for (i,) in indexes] == [f"{name}_pending", f"{name}_pkey"]
    finally:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def test_concurrent_installs_do_not_conflict(dsn, conn, table):
    name = f"{table}_c"
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with psycopg.connect(dsn) as c:
                install(c, name)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
    assert errors == []


@pytest.mark.parametrize("bad", ["", "x" * 56, "a\0b", None])
def test_bad_table_names_are_refused_at_the_call(conn, bad):
    with pytest.raises(ValueError, match="table"):
        install(conn, bad)


def test_install_from_the_command_line(dsn, conn, table):
    name = f"{table}_cli"
    command = [sys.executable, "-m", "classic_pg_listener_outbox", "install"]
    done = subprocess.run(
        [*command, "--dsn", dsn, "--table", name], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert name in done.stdout
    assert rows(conn, name) == []
    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))

    failed = subprocess.run(
        [*command, "--dsn", dsn, "--table", ""], capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: table must be")


def test_default_table_name():
    assert DEFAULT_TABLE == "listener_outbox"


# -- send ----------------------------------------------------------------------


def test_send_commits_and_rolls_back_with_the_callers_transaction(dsn, conn, table):
    with psycopg.connect(dsn) as c:
        with c.transaction():
            first = send(c, "ch", "kept", table=table)
        send(c, "ch", "rolled back", table=table)
        c.rollback()
        ids = send_many(c, "ch", ["a", "b", "c"], table=table)
        c.rollback()
        assert send_many(c, "ch", [], table=table) == []
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    assert rows(conn, table) == [(first, "ch", "kept")]


def test_many_sends_in_one_transaction_notify_once(dsn, conn, table, channel):
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    with psycopg.connect(dsn) as c, c.transaction():
        for i in range(100):
            send(c, channel, str(i), table=table)
        send_many(c, channel, ["x", "y"], table=table)
    notify(conn, channel, "sentinel")
    got = [n.payload for n in conn.notifies(timeout=WAIT, stop_after=2)]
    assert got == [table, "sentinel"]


def test_send_checks_its_arguments(conn, table):
    with pytest.raises(InvalidChannel):
        send(conn, "", "x", table=table)
    with pytest.raises(TypeError, match="payload must be a str"):
        send(conn, "ch", b"x", table=table)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload must be a str"):
        send_many(conn, "ch", ["x", 1], table=table)  # type: ignore[list-item]
    assert rows(conn, table) == []


# -- handling ------------------------------------------------------------------


def test_handler_writes_commit_with_the_message(
    make_outbox, conn, table, effects, channel
):
    insert = sql.SQL(
        "INSERT INTO {} (id, channel, payload, pid) VALUES (%s, %s, %s, 0)"
    )
    insert = insert.format(sql.Identifier(effects))
    threads: set[str] = set()

    def handler(message: Message, c: psycopg.Connection[Any]) -> None:
        threads.add(threading.current_thread().name)
        c.execute(insert, (message.id, message.channel, message.payload))

    listener, outbox = make_outbox()
    future = outbox.add_handler(handler, channel)
    listener.start()
    assert future.result(WAIT) is None
    ids = send_many(conn, channel, [f"m{i}" for i in range(120)], table=table)
    wait_until(lambda: len(rows(conn, effects)) == 120, "120 effects")
    wait_until(lambda: rows(conn, table) == [], "an empty outbox")
    assert [r[0] for r in rows(conn, effects)] == ids
    assert len(threads) == 1
    assert threads.pop().startswith(f"{listener.name}-outbox-")  # not the listener's


def test_rolled_back_send_calls_no_handler(make_outbox, dsn, conn, table, channel):
    handler = Recorder()
    listener, outbox = make_outbox()
    future = outbox.add_handler(handler, channel)
    listener.start()
    future.result(WAIT)
    with psycopg.connect(dsn) as c:
        send(c, channel, "never", table=table)
        c.rollback()
        with c.transaction():
            later = send(c, channel, "later", table=table)
    message = handler.next()
    assert (message.id, message.payload, message.attempts) == (later, "later", 0)
    assert message.channel == channel
    assert message.created_at.tzinfo is not None
    wait_until(lambda: rows(conn, table) == [], "an empty outbox")
    assert handler.seen.empty()


def test_pending_messages_are_handled_on_start(make_outbox, conn, table, channel):
    send_many(conn, channel, ["1", "2"], table=table)
    handler = Recorder()
    listener, outbox = make_outbox()
    outbox.add_handler(handler, channel)
    listener.start()
    assert [handler.next().payload, handler.next().payload] == ["1", "2"]


def raw_insert(conn, table: str, channel: str, payload: str) -> None:
    """A message without its NOTIFY: only a poll or a catch-up finds it."""
    conn.execute(
        sql.SQL("INSERT INTO {} (channel, payload) VALUES (%s, %s)").format(
            sql.Identifier(table)
        ),
        (channel, payload),
    )


def test_a_message_without_notification_is_found_by_the_poll(
    make_outbox, conn, table, channel
):
    handler = Recorder()
    listener, outbox = make_outbox(poll_interval=0.2)
    future = outbox.add_handler(handler, channel)
    listener.start()
    future.result(WAIT)
    raw_insert(conn, table, channel, "silent")
    assert handler.next().payload == "silent"


def test_reconnection_catches_up(make_outbox, conn, table, channel, hook_waiter):
    handler = Recorder()
    listener, outbox = make_outbox(
        poll_interval=3600,
        listener_kwargs={"plugins": [hook_waiter], "reconnect_delay": 0.01},
    )
    outbox.add_handler(handler, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    send(conn, channel, "first", table=table)
    assert handler.next().payload == "first"

    raw_insert(conn, table, channel, "while away")
    conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    hook_waiter.wait("listener_reconnected")
    assert handler.next().payload == "while away"


def test_failing_handler_is_retried_then_dead(
    make_outbox, conn, table, channel, caplog
):
    dead: Future[tuple[Message, str]] = Future()
    handler = Recorder(fail=lambda m: m.payload == "bad")
    listener, outbox = make_outbox(
        max_attempts=3,
        retry_delay=0.05,
        on_dead=lambda message, error: dead.set_result((message, error)),
    )
    outbox.add_handler(handler, channel)
    listener.start()
    bad = send(conn, channel, "bad", table=table)
    good = send(conn, channel, "good", table=table)

    message, error = dead.result(WAIT)
    assert (message.id, message.attempts) == (bad, 3)
    assert error == "RuntimeError: cannot handle bad"
    seen = [handler.next() for _ in range(4)]
    assert sorted((m.payload, m.attempts) for m in seen) == [
        ("bad", 0),
        ("bad", 1),
        ("bad", 2),
        ("good", 0),
    ]
    ((id_, attempts, last_error, is_dead),) = rows(
        conn, table, "id, attempts, last_error, dead_at IS NOT NULL"
    )
    assert (id_, attempts, last_error, is_dead) == (bad, 3, error, True)
    assert good != bad
    failures = [r for r in caplog.records if r.name == "classic.pg.listener"]
    assert [r.levelno for r in failures] == [logging.WARNING] * 2 + [logging.ERROR]
    assert "is dead after 3 attempts" in failures[-1].getMessage()


def test_failed_handler_writes_are_rolled_back(
    make_outbox, conn, table, effects, channel
):
    insert = sql.SQL(
        "INSERT INTO {} (id, channel, payload, pid) VALUES (%s, %s, %s, 0)"
    )
    insert = insert.format(sql.Identifier(effects))
    done = threading.Event()

    def handler(message: Message, c: psycopg.Connection[Any]) -> None:
        c.execute(insert, (message.id, message.channel, f"try {message.attempts}"))
        if message.attempts == 0:
            raise RuntimeError("first time")
        if message.attempts == 1:
            # A statement that fails, caught here: the transaction is failed
            # all the same, and the attempt counts as failed.
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute("SELECT 1 / 0")
            return
        done.set()

    listener, outbox = make_outbox(retry_delay=0.01)
    outbox.add_handler(handler, channel)
    listener.start()
    send_many(conn, channel, ["once"], table=table)
    assert done.wait(WAIT)
    wait_until(lambda: rows(conn, table) == [], "an empty outbox")
    assert [r[2] for r in rows(conn, effects)] == ["try 2"]


def test_ordered_channel_runs_one_message_at_a_time_in_id_order(
    make_outbox, conn, table, channel
):
    order: list[tuple[str, int]] = []
    in_flight = [0]
    most = [0]
    lock = threading.Lock()
    done = threading.Event()
    n = 200

    def handler(message: Message, c: psycopg.Connection[Any]) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            c.execute("SELECT pg_sleep(0.0005)")
            if message.payload == "3" and message.attempts == 0:
                raise RuntimeError("once")
        finally:
            with lock:
                in_flight[0] -= 1
                order.append((message.payload, message.attempts))
                if len(order) == n + 1:
                    done.set()

    # Two listeners and outboxes of two workers each, as two processes would.
    for _ in range(2):
        listener, outbox = make_outbox(workers=2, batch_size=7, retry_delay=0.05)
        outbox.add_handler(handler, channel, ordered=True)
        listener.start()
    send_many(conn, channel, [str(i) for i in range(n)], table=table)
    assert done.wait(WAIT)
    assert most[0] == 1
    assert order[:5] == [("0", 0), ("1", 0), ("2", 0), ("3", 0), ("3", 1)]
    assert [p for p, _ in order[4:]] == [str(i) for i in range(3, n)]


def test_outbox_stops_with_its_listener_and_leaves_a_pool_of_yours_open(
    make_outbox, dsn, table, channel
):
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        listener, outbox = make_outbox(pool=pool, workers=2)
        outbox.add_handler(Recorder(), channel)
        listener.start()
        names = f"{listener.name}-outbox-"
        wait_until(
            lambda: sum(t.name.startswith(names) for t in threading.enumerate()) == 2,
            "two workers",
        )
        listener.stop()
        listener.join(WAIT)
        assert not [t for t in threading.enumerate() if t.name.startswith(names)]
        assert not pool.closed
        outbox.close()  # idempotent


def test_outbox_added_to_a_running_listener_starts_at_once(
    make_listener, dsn, conn, table, channel
):
    listener = make_listener()
    listener.start()
    outbox = Outbox(listener, dsn, table=table)
    handler = Recorder()
    outbox.add_handler(handler, channel).result(WAIT)
    send(conn, channel, "hello", table=table)
    assert handler.next().payload == "hello"
    assert outbox.plugin_name in [p.name for p in listener.plugins]
    assert repr(outbox) == f"<Outbox {table} channels=[{channel!r}]>"


def test_outbox_never_started_closes_its_pool(make_listener, dsn, table):
    outbox = Outbox(make_listener(), dsn, table=table)
    outbox.close()
    outbox.start()  # closed: nothing starts


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"batch_size": 65}, "batch_size"),
        ({"workers": 0}, "workers"),
        ({"retry_delay": 0}, "retry_delay"),
        ({"retry_delay": 10, "max_retry_delay": 1}, "retry_delay"),
        ({"table": ""}, "table"),
    ],
)
def test_outbox_checks_its_arguments(make_listener, dsn, kwargs, error):
    with pytest.raises(ValueError, match=error):
        Outbox(make_listener(), dsn, **kwargs)


def test_outbox_refuses_wrong_types(make_listener, dsn, channel):
    with pytest.raises(TypeError, match="listener"):
        Outbox(object(), dsn)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="conninfo_or_pool"):
        Outbox(make_listener(), 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_dead"):
        Outbox(make_listener(), dsn, on_dead=42)  # type: ignore[arg-type]
    outbox = Outbox(make_listener(), dsn)
    with pytest.raises(TypeError, match="handler"):
        outbox.add_handler(42, channel)  # type: ignore[arg-type]
    with pytest.raises(InvalidChannel):
        outbox.add_handler(Recorder(), "")
    outbox.add_handler(Recorder(), channel)
    with pytest.raises(ValueError, match="already"):
        outbox.add_handler(Recorder(), channel)
    outbox.close()


def test_lost_worker_connection_is_replaced(make_outbox, dsn, conn, table, channel):
    app = f"outbox_{channel}"
    handler = Recorder()
    listener, outbox = make_outbox(pool=f"{dsn} application_name={app}")
    outbox.add_handler(handler, channel)
    listener.start()
    send(conn, channel, "before", table=table)
    assert handler.next().payload == "before"
    wait_until(lambda: rows(conn, table) == [], "the commit")  # the conn is idle
    terminated = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = %s",
        (app,),
    ).fetchone()
    assert terminated == (1,)
    send(conn, channel, "after", table=table)
    assert handler.next().payload == "after"


def test_missing_table_is_logged_and_retried(
    make_listener, dsn, conn, channel, caplog, monkeypatch
):
    import classic_pg_listener_outbox._outbox as outbox_module

    monkeypatch.setattr(outbox_module, "ERROR_DELAY", 0.01)
    name = f"missing_{channel}"
    listener = make_listener()
    outbox = Outbox(listener, dsn, table=name)
    handler = Recorder()
    outbox.add_handler(handler, channel)
    listener.start()
    wait_until(
        lambda: any("was install() run?" in r.getMessage() for r in caplog.records),
        "the error line",
    )
    try:
        install(conn, name)
        send(conn, channel, "at last", table=name)
        assert handler.next().payload == "at last"
    finally:
        listener.stop()
        listener.join(WAIT)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


def test_stop_is_prompt_while_the_workers_wait_for_a_connection(
    make_outbox, channel, caplog
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    nowhere = f"host=127.0.0.1 port={port} dbname=test user=postgres"
    listener, outbox = make_outbox(pool=nowhere)
    outbox.add_handler(Recorder(), channel)
    listener.start()
    wait_until(
        lambda: outbox._pool.get_stats().get("requests_waiting", 0) == 1,
        "a worker waiting for a connection",
    )
    started = time.monotonic()
    listener.stop()
    listener.join(WAIT)
    assert not listener.is_alive()
    assert time.monotonic() - started < 5  # not the pool's 30 s timeout
    assert not [r for r in caplog.records if "draining failed" in r.getMessage()]


def test_on_dead_that_raises_is_logged(make_outbox, conn, table, channel, caplog):
    def on_dead(message: Message, error: str) -> None:
        raise RuntimeError("on_dead broke")

    listener, outbox = make_outbox(max_attempts=1, on_dead=on_dead)
    outbox.add_handler(Recorder(fail=lambda m: True), channel)
    listener.start()
    send(conn, channel, "doomed", table=table)
    wait_until(
        lambda: any("on_dead" in r.getMessage() for r in caplog.records),
        "the on_dead error line",
    )
    ((attempts, is_dead),) = rows(conn, table, "attempts, dead_at IS NOT NULL")
    assert (attempts, is_dead) == (1, True)


def test_failures_in_one_batch_are_each_counted(make_outbox, conn, table, channel):
    dead: queue.Queue[Message] = queue.Queue()
    handler = Recorder(fail=lambda m: m.payload.startswith("bad"))
    listener, outbox = make_outbox(
        max_attempts=3, retry_delay=0.01, on_dead=lambda m, e: dead.put(m)
    )
    outbox.add_handler(handler, channel)
    listener.start()
    send_many(conn, channel, ["bad 1", "good", "bad 2", "bad 3"], table=table)
    buried = sorted(
        (m.payload, m.attempts) for m in (dead.get(timeout=WAIT) for _ in range(3))
    )
    assert buried == [("bad 1", 3), ("bad 2", 3), ("bad 3", 3)]
    seen = sorted(handler.seen.get_nowait().payload for _ in range(10))
    assert seen == [*["bad 1"] * 3, *["bad 2"] * 3, *["bad 3"] * 3, "good"]
    assert handler.seen.empty()


def test_channel_names_are_taken_as_given(make_outbox, conn, table, channel):
    mixed = f'Mixed "Case" {channel}'
    handler = Recorder()
    listener, outbox = make_outbox(poll_interval=3600)
    future = outbox.add_handler(handler, mixed)
    listener.start()
    future.result(WAIT)
    send(conn, mixed.lower(), "other channel", table=table)
    send(conn, mixed, "woken by its notification", table=table)
    message = handler.next()
    assert (message.channel, message.payload) == (mixed, "woken by its notification")

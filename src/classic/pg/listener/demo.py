"""``pg-listener demo``: the library at work in a few seconds, no set-up needed.

It shows, in order: a listener with callbacks (two on one channel, one
on two channels); notifications sent from a second connection, each in the
transaction that records an order (the channel has a catch-up, which reads
the table once the server listens); the listener's backend terminated with
``pg_terminate_backend()``, orders placed while it is away (their
notifications are lost, as PostgreSQL keeps nothing for a session that is not
connected), then the reconnection and the catch-up that finds them in the
table; the figures; a clean stop. Every order is handled exactly once, by its
notification or by the catch-up: the exit status says whether that held.

The server is ``--dsn`` or ``DATABASE_URL``; without either, an embedded
PostgreSQL started in a temporary directory and removed at the end. On a
server of yours the demo uses unique channel names and one table
(``pg_listener_demo_<hex>``), dropped at the end.

Part of the command line, so it writes to a stream it is given (the library
itself never prints).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import psycopg
from psycopg import Notify, sql

from ._embedded import LocalServer, ServerUnavailable
from ._notify import notify
from .listener import Listener

WAIT = 15.0
"""Seconds any step may take before the demo gives up (each takes milliseconds)."""


class Demo:
    """The shop: orders are rows of a table, and each insert notifies."""

    def __init__(self, dsn: str, out: TextIO, pause: float):
        self.dsn = dsn
        self.out = out
        self.pause = pause
        suffix = uuid.uuid4().hex[:6]
        self.orders = f"orders_{suffix}"
        self.alerts = f"alerts_{suffix}"
        self.table = sql.Identifier(f"pg_listener_demo_{suffix}")
        self.placed: list[int] = []
        self.handled: dict[int, str] = {}  # order id -> "notification" or "catch-up"
        self.audited = 0
        self.catch_ups = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._out_lock = threading.Lock()

    # -- output ------------------------------------------------------------------

    def say(self, line: str = "") -> None:
        with self._out_lock:
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except BrokenPipeError:
                # The reader went away (``| head``): finish quietly, and cleanly.
                self.out = open(os.devnull, "w")  # noqa: SIM115

    def step(self, title: str) -> None:
        time.sleep(self.pause)
        self.say()
        self.say(f"== {title}")

    # -- the callbacks -------------------------------------------------------------

    def ship(self, notify: Notify) -> None:
        """First callback on the orders channel: ship each order once."""
        self._handle(int(notify.payload), "notification", f"backend {notify.pid}")

    def audit(self, notify: Notify) -> None:
        """One callback on both channels: count what goes by."""
        with self._changed:
            self.audited += 1
            self._changed.notify_all()
        self.say(f"   audit: {notify.channel} {notify.payload!r}")

    def catch_up(self, channel: str) -> None:
        """The orders the notifications did not bring, read from the table.

        Called once the server acknowledged ``LISTEN``: at registration, then
        after each reconnection. No notification of the channel reaches
        ``ship`` before it returns; orders seen both ways are handled once.
        """
        with self._lock:
            seen = max(self.handled, default=0)
            first = self.catch_ups == 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                sql.SQL("SELECT id FROM {} WHERE id > %s ORDER BY id").format(
                    self.table
                ),
                (seen,),
            ).fetchall()
        when = "first LISTEN" if first else "reconnected"
        self.say(
            f"   catch-up on {channel} ({when}): {len(rows)} order(s) in the table"
        )
        for (order,) in rows:
            self._handle(order, "catch-up", "the table")
        with self._changed:
            self.catch_ups += 1
            self._changed.notify_all()

    def _handle(self, order: int, how: str, source: str) -> None:
        with self._changed:
            if order in self.handled:
                return
            self.handled[order] = how
            self._changed.notify_all()
        self.say(f"   ship: order {order} (by {how}, from {source})")

    # -- the story -------------------------------------------------------------------

    def place(self, conn: psycopg.Connection[Any], item: str) -> int:
        """Record an order and notify in one transaction: both or neither."""
        with conn.transaction():
            row = conn.execute(
                sql.SQL("INSERT INTO {} (item) VALUES (%s) RETURNING id").format(
                    self.table
                ),
                (item,),
            ).fetchone()
            assert row is not None
            order: int = row[0]
            notify(conn, self.orders, str(order))
        self.placed.append(order)
        return order

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, WAIT):
                raise TimeoutError(f"the demo waited {WAIT} s for {what}")

    def run(self, origin: str) -> bool:
        self.say(f"== A PostgreSQL server: {origin}")
        with psycopg.connect(self.dsn, autocommit=True) as sender:
            sender.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigserial PRIMARY KEY, item text NOT NULL)"
                ).format(self.table)
            )
            try:
                return self._story(sender)
            finally:
                sender.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self.table))

    def _story(self, sender: psycopg.Connection[Any]) -> bool:
        dsn = self.dsn
        listener = Listener(
            lambda: psycopg.connect(dsn, autocommit=True),
            max_workers=2,
            # A second before reconnecting, so that the orders placed meanwhile
            # are surely missed by the notifications: the catch-up finds them.
            reconnect_delay=1.0,
            autoload_plugins=False,
            name="demo",
        )
        self.step("A listener with callbacks")
        self.say(f"   ship  on {self.orders}, with a catch-up from the table")
        self.say(f"   audit on {self.orders} and {self.alerts}")
        listener.start()
        try:
            return self._scenes(listener, sender)
        finally:
            listener.stop()
            listener.join(WAIT)

    def _scenes(self, listener: Listener, sender: psycopg.Connection[Any]) -> bool:
        futures = [
            listener.add_callback(self.ship, self.orders, catch_up=self.catch_up),
            listener.add_callback(self.audit, self.orders),
            listener.add_callback(self.audit, self.alerts),
        ]
        for future in futures:
            future.result(WAIT)
        self.wait_for("the first catch-up", lambda: self.catch_ups == 1)
        self.say(
            f"   listening (backend pid {listener.backend_pid}), callbacks in a"
            " pool of 2 threads"
        )

        sender_pid = sender.info.backend_pid
        self.step(f"Notifications from a second connection (backend {sender_pid})")
        for item in ("tea", "scones", "jam"):
            self.place(sender, item)
        notify(sender, self.alerts, "stock low: scones")
        self.wait_for("3 orders", lambda: len(self.handled) == 3 and self.audited == 4)

        self.step("The listener's backend is terminated")
        victim = listener.backend_pid
        sender.execute("SELECT pg_terminate_backend(%s, 5000)", (victim,))
        self.say(f"   pg_terminate_backend({victim}): the connection is gone")
        for item in ("cream", "butter"):
            order = self.place(sender, item)
            self.say(
                f"   order {order} placed while disconnected: its notification is lost"
            )
        self.wait_for("the reconnection", lambda: self.catch_ups == 2)
        self.wait_for("the catch-up", lambda: len(self.handled) == 5)
        self.say(f"   listening again (backend pid {listener.backend_pid})")
        self.place(sender, "honey")
        self.wait_for("the last order", lambda: len(self.handled) == 6)

        self.step("The figures")
        by_notification = sum(
            1 for how in self.handled.values() if how == "notification"
        )
        self.say(
            f"   orders placed: {len(self.placed)}, shipped: {len(self.handled)}"
            f" ({by_notification} by notification,"
            f" {len(self.handled) - by_notification} by catch-up)"
        )
        self.say(f"   audited notifications: {self.audited}")
        stats = listener.stats()
        self.say(f"   stats().reconnects: {stats.reconnects}")
        self.say(f"   stats().received: {dict(stats.received)}")
        self.say(f"   stats().delivered: {dict(stats.delivered)}")
        self.say(f"   stats().callback_errors: {dict(stats.callback_errors)}")
        self.say(f"   stats().backlog: {stats.backlog}")

        self.step("A clean stop")
        listener.stop()
        listener.join(WAIT)
        stopped = not listener.is_alive() and listener.exception is None
        self.say(
            "   stopped: every callback returned, listener.exception is None"
            if stopped
            else f"   did not stop cleanly: {listener.exception!r}"
        )
        return stopped and sorted(self.handled) == sorted(self.placed)


@contextmanager
def server(dsn: str | None) -> Iterator[tuple[str, str]]:
    """The DSN to use and a line saying what it is; an embedded server when
    no DSN is given, removed on exit."""
    if dsn:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            info = conn.info
            origin = (
                f"PostgreSQL {info.parameter_status('server_version')} at"
                f" {info.host}:{info.port}, database {info.dbname}, user {info.user}"
            )
        yield dsn, origin
        return
    with LocalServer(prefix="pg-listener-demo-") as local:
        yield (
            local.dsn,
            (
                f"embedded PostgreSQL {local.version} (no --dsn given) on port"
                f" {local.port}, in {local.root}"
            ),
        )


def cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: the command line imports this module to build its parser.
    from .cli import EXIT_CONNECTION, EXIT_ERROR, EXIT_OK, connect, one_line, status

    dsn = args.dsn if args.dsn is not None else os.environ.get("DATABASE_URL")
    if dsn:
        connect(dsn).close()  # a bad DSN: one line and exit status 2
    out: TextIO = args.out
    try:
        with server(dsn) as (url, origin):
            shop = Demo(url, out, args.pause)
            ok = shop.run(origin)
    except ServerUnavailable as ex:
        status(f"no server for the demo: {one_line(ex)}")
        return EXIT_CONNECTION
    except (psycopg.Error, TimeoutError) as ex:
        status(f"error: {one_line(ex)}")
        return EXIT_ERROR
    shop.say("\n" + ("done" if ok else "failed: see above"))
    return EXIT_OK if ok else EXIT_ERROR


def add_parser(
    commands: Any, common: argparse.ArgumentParser, formatter: type[Any]
) -> None:
    """Add ``demo`` to the command line's subcommands."""
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="watch the library work, on an embedded server if no --dsn is given",
        description="\n\n".join(
            textwrap.fill(paragraph, width=78)
            for paragraph in (__doc__ or "").split("\n\n")[1:3]
        ),
        formatter_class=formatter,
    )
    demo.add_argument(
        "--pause",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="pause between the steps, to read them (default: 1)",
    )
    demo.set_defaults(func=cmd_demo, out=sys.stdout)

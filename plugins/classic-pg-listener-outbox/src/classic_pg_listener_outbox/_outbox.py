"""``Outbox``: worker threads that drain the outbox table, woken by a Listener.

The listener's part is small and never blocks its serving thread: a
notification on a handled channel, the acknowledgement of a channel's
``LISTEN`` and every reconnection only set the workers' wake-up events. The
workers do the rest on connections of a ``psycopg_pool.ConnectionPool``:
they drain every handled channel, batch after batch (``_batch.run_batch``),
until nothing due is left, then wait for the next wake-up, for the earliest
retry they scheduled, or ``poll_interval`` seconds, whichever comes first.
So nothing depends on a notification arriving: they are only there to make
a message's handling prompt.

Catching up is the listener's per-channel catch-up
(``add_callback(..., catch_up=...)``): called once ``LISTEN`` is
acknowledged, at the first registration and after every reconnection, it
wakes the workers, who find in the table whatever was sent meanwhile.

The outbox follows its listener's lifecycle through a plugin registered on
it (``_ListenerHooks``): workers start with the listener (or at once, if it
is running already) and stop as it stops.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from classic.pg.listener import Listener, hookimpl

from ._batch import DeadCallback, Handler, Message, Policy, Route, run_batch
from ._schema import DEFAULT_TABLE
from ._send import queries

logger = logging.getLogger("classic.pg.listener")

_counter = itertools.count(1)

ERROR_DELAY = 1.0
"""First pause of a worker after its drain failed (the server down, say);
doubled per consecutive failure, up to ``poll_interval``."""


class _ListenerHooks:
    """The outbox's plugin on its listener: its workers live as long as it does."""

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    @hookimpl
    def listener_started(self) -> None:
        self._outbox.start()

    @hookimpl
    def listener_stopped(self) -> None:
        self._outbox.close()


class _Worker:
    """One thread draining the table with one pooled connection at a time."""

    def __init__(self, outbox: Outbox, name: str):
        self._outbox = outbox
        self.wake = threading.Event()
        self.wake.set()  # pending messages are processed on start
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        outbox = self._outbox
        error_delay = ERROR_DELAY
        # When the retries this worker scheduled are due (monotonic clock).
        # Each is taken a little after the server's own next_attempt_at, so a
        # drain that starts after one handles its message.
        retries: list[float] = []
        while True:
            timeout = outbox.poll_interval
            if retries:
                timeout = max(0.0, min(timeout, retries[0] - time.monotonic()))
            self.wake.wait(timeout)
            if outbox.closing.is_set():
                return
            self.wake.clear()
            started = time.monotonic()
            try:
                due_in = outbox.drain()
            except Exception as ex:
                if outbox.closing.is_set():
                    return  # the pool was closed under a worker waiting for it
                _log_drain_error(outbox.table, ex, error_delay)
                # Pause even if woken: a broken server must not make a loop.
                if outbox.closing.wait(error_delay):
                    return
                error_delay = min(error_delay * 2, outbox.poll_interval)
                self.wake.set()
                continue
            error_delay = ERROR_DELAY
            # A drain woken early (by a notification) leaves the retries not
            # yet due for later; the others it has just handled.
            retries = [due for due in retries if due > started]
            if due_in is not None:
                retries.append(time.monotonic() + due_in)
            retries.sort()


def _log_drain_error(table: str, ex: Exception, delay: float) -> None:
    if isinstance(ex, psycopg.errors.UndefinedTable):
        first_line = str(ex).splitlines()[0]
        logger.error(
            "outbox %s: %s (was install() run?); trying again in %.1f s",
            table,
            first_line,
            delay,
        )
    else:
        logger.error(
            "outbox %s: draining failed; trying again in %.1f s",
            table,
            delay,
            exc_info=ex,
        )


class Outbox:
    """Handle the messages of an outbox table exactly once, in any number of processes.

    Every process that runs an ``Outbox`` on the same table with the same
    handlers shares the work: each message is claimed by one transaction at a
    time (``FOR UPDATE SKIP LOCKED``), and its handler's writes commit with
    its completion.

    :param listener: the listener whose notifications wake the workers; the
        outbox starts and stops with it.
    :param conninfo_or_pool: a libpq connection string, from which the outbox
        makes (and later closes) a ``psycopg_pool.ConnectionPool`` of
        ``workers`` connections; or a pool of yours, which you open before
        the listener starts and close after it stopped.
    :param table: the outbox table, as given to ``install()``.
    :param max_attempts: attempts after which a failing message is dead.
    :param poll_interval: seconds after which the workers look at the table
        without being woken (a missed notification costs at most this).
    :param batch_size: messages claimed per transaction (at most 64: see
        the docs on savepoints).
    :param workers: worker threads of this process.
    :param retry_delay: seconds before the first retry, doubled per failure.
    :param max_retry_delay: the longest delay between two attempts.
    :param on_dead: ``on_dead(message, error)``, called in a worker thread
        once a message was committed as dead; ``message.attempts`` counts
        every attempt and ``error`` is the last error's text. An exception
        it raises is logged.
    """

    def __init__(
        self,
        listener: Listener,
        conninfo_or_pool: str | ConnectionPool[Any],
        table: str = DEFAULT_TABLE,
        max_attempts: int = 5,
        poll_interval: float = 30.0,
        batch_size: int = 50,
        *,
        workers: int = 1,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        on_dead: DeadCallback | None = None,
    ):
        if not isinstance(listener, Listener):
            raise TypeError(f"listener must be a Listener, got {listener!r}")
        self._queries = queries(table)  # checks the name
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 64:
            raise ValueError(f"batch_size must be an int in 1..64, got {batch_size!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not 0 < retry_delay <= max_retry_delay:
            raise ValueError(
                "retry_delay must be > 0 and at most max_retry_delay, got"
                f" {retry_delay!r} and {max_retry_delay!r}"
            )
        if on_dead is not None and not callable(on_dead):
            raise TypeError(f"on_dead must be callable, got {on_dead!r}")

        self.table = table
        self.poll_interval = float(poll_interval)
        self.batch_size = batch_size
        self._policy = Policy(max_attempts, float(retry_delay), float(max_retry_delay))
        self._on_dead = on_dead
        self._listener = listener
        name = f"{listener.name}-outbox-{next(_counter)}"
        self._owns_pool = isinstance(conninfo_or_pool, str)
        if isinstance(conninfo_or_pool, str):
            self._pool: ConnectionPool[Any] = ConnectionPool(
                conninfo_or_pool,
                min_size=1,
                max_size=workers,
                open=False,
                name=name,
                check=ConnectionPool.check_connection,
            )
        elif isinstance(conninfo_or_pool, ConnectionPool):
            self._pool = conninfo_or_pool
        else:
            raise TypeError(
                "conninfo_or_pool must be a connection string or a"
                f" psycopg_pool.ConnectionPool, got {conninfo_or_pool!r}"
            )
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._started = False
        self.closing = threading.Event()
        """Set by ``close()``: the workers stop after their batch."""
        self._workers = [_Worker(self, f"{name}-{i}") for i in range(1, workers + 1)]
        plugin_name = listener.register_plugin(_ListenerHooks(self), name)
        if plugin_name is None:
            raise RuntimeError(f"the plugin name {name!r} is blocked on the listener")
        self.plugin_name = plugin_name
        if listener.is_alive():
            self.start()

    def __repr__(self) -> str:
        return f"<Outbox {self.table} channels={sorted(self._routes)}>"

    # -- handlers --------------------------------------------------------------

    def add_handler(
        self, handler: Handler, channel: str, *, ordered: bool = False
    ) -> Future[None]:
        """Call ``handler(message, conn)`` for each message sent on ``channel``.

        ``conn`` is the worker connection, inside the transaction that
        claimed the message: write there, and your writes commit together
        with the message's completion, or not at all. Do not commit or roll
        back yourself. If the handler raises, its writes are rolled back and
        the message is retried later, ``max_attempts`` times in all.

        Pending messages of the channel are handled at once, without waiting
        for the returned future, which resolves when the listener listens to
        the channel (raising what the listener's ``add_callback`` future
        raises).

        :param ordered: handle the channel's messages one at a time across
            every process, in id order (see the docs for what that costs).
            Every process must say the same for a channel.
        :raises ValueError: a handler was added for ``channel`` already.
        """
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        with self._lock:
            if channel in self._routes:
                raise ValueError(f"a handler was added for channel {channel!r} already")
            future = self._subscribe(channel)  # checks the channel
            self._routes[channel] = Route(handler, bool(ordered))
        self.wake()
        return future

    def _subscribe(self, channel: str) -> Future[None]:
        """Listen to ``channel``, and look at the table whenever ``LISTEN`` took effect.

        After a reconnection the notifications sent meanwhile are lost; at the
        first registration, a message committed after the workers' first
        drain and before ``LISTEN`` took effect was not notified to us. Both
        would wait for the poll without the catch-up.
        """
        return self._listener.add_callback(
            self._on_notify, channel, catch_up=self._catch_up
        )

    def _on_notify(self, notify: psycopg.Notify) -> None:
        """The listener's callback: only a wake-up, so it never blocks the listener."""
        self.wake()

    def _catch_up(self, channel: str) -> None:
        self.wake()

    # -- workers ---------------------------------------------------------------

    def wake(self) -> None:
        """Make the workers look at the table now."""
        for worker in self._workers:
            worker.wake.set()

    def start(self) -> None:
        """Start the workers; called by the listener's start, and idempotent."""
        with self._lock:
            if self._started or self.closing.is_set():
                return
            self._started = True
        if self._owns_pool:
            self._pool.open(wait=False)
        for worker in self._workers:
            worker.thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the workers once their current batch is done, and close our pool.

        Called as the listener stops; idempotent. Messages not handled yet
        stay in the table for the next start, or for other processes.
        """
        with self._lock:
            self.closing.set()
            started = self._started
        self.wake()
        if self._owns_pool:
            # First, so that a worker waiting for a connection (the server
            # down) gives up at once; a connection in use is closed when its
            # batch is done and it comes back.
            self._pool.close()
        if not started:
            return
        current = threading.current_thread()
        for worker in self._workers:
            if worker.thread is not current:
                worker.thread.join(timeout)

    def drain(self) -> float | None:
        """Handle every due message of every handled channel; one worker's loop.

        Returns the seconds until the earliest retry this drain scheduled, or
        ``None``.
        """
        due_in: float | None = None
        with self._lock:
            active = list(self._routes.items())
        if not active:
            return None
        with self._pool.connection() as conn:
            while active and not self.closing.is_set():
                more = []
                for channel, route in active:
                    outcome = run_batch(
                        conn,
                        self._queries,
                        channel,
                        route,
                        self.batch_size,
                        self._policy,
                    )
                    for message, error in outcome.dead:
                        self._report_dead(message, error)
                    if outcome.due_in is not None:
                        due_in = (
                            outcome.due_in
                            if due_in is None
                            else min(due_in, outcome.due_in)
                        )
                    if outcome.more:
                        more.append((channel, route))
                active = more
        return due_in

    def _report_dead(self, message: Message, error: str) -> None:
        logger.error(
            "outbox %s: message %d on channel %r is dead after %d attempts: %s",
            self.table,
            message.id,
            message.channel,
            message.attempts,
            error,
        )
        if self._on_dead is not None:
            try:
                self._on_dead(message, error)
            except Exception:
                logger.exception(
                    "outbox %s: on_dead %r raised", self.table, self._on_dead
                )

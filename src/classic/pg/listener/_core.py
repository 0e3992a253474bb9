"""The serving loop, written once for both listeners: it alone owns the connection.

Other threads never touch the connection. They queue requests (add or
remove a callback, each carrying its future) and wake the loop through a
self-pipe. The loop is a generator that yields what it waits for
(``_waiting``): ``Listener`` drives it with ``select()`` in a thread,
``AsyncListener`` with the event loop's readers. Everything that decides
(what to read, when to ping, which request to apply, when to reconnect, how
a statement's results are told from errors that are not its own) is here,
once.

Notifications are read at the libpq level (``consume_input()`` then
``notifies()``), about twice as fast as ``Connection.notifies()``. While
connected, at most one statement (a ``LISTEN``, an ``UNLISTEN``, a ping) is
in flight, and the loop goes on reading and dispatching notifications
around it: the server answers a statement only after sending every
notification queued before it, so a statement that waited for its answer
alone would read the whole queue into memory behind a full backlog. Its
deadline (``ping_timeout``) counts silence, not duration: a long queue on a
slow link is not a dead connection.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import psycopg
from psycopg import Notify, errors, pq, sql
from psycopg._encodings import pg2pyenc

from ._backoff import Backoff
from ._keepalive import configure_keepalive
from ._reading import Reader
from ._registry import Registry
from ._sequencing import Delivery
from ._stats import ListenerStats, count_channels
from ._waiting import CONNECT, READ, WRITE, Await, Close, Loop, Wait
from .errors import (
    CallbackNotRegistered,
    InvalidChannel,
    ListenerStopped,
    ReconnectFailed,
    SessionNotKept,
)
from .hookspecs import Callback, CatchUp
from .plugins import PluginHost

logger = logging.getLogger("classic.pg.listener")

MAX_CHANNEL_BYTES = 63
"""PostgreSQL truncates longer identifiers (NAMEDATALEN - 1), so a longer
channel would be listened to under another name and never match."""

REQUESTS_TURN = 0.002
"""Seconds of requests applied between two reads of the socket (or turns of
an event loop): a burst of thousands of ``add_callback()`` holds neither
for long, however slow each request (under a tracer, say)."""

_tuple_new = tuple.__new__
_FATAL = pq.ExecStatus.FATAL_ERROR
_OK = pq.ConnStatus.OK

PING = (
    b"SELECT pg_backend_pid(), pg_notification_queue_usage(),"
    b" (SELECT count(*) FROM pg_listening_channels())"
)
"""One round trip checks the link, the session (same backend, every channel
still listened to) and the server's notification queue."""

LOCK_NAMESPACE = "classic_pg_listener"
"""The first key of an exclusive listener's advisory lock; its name the second."""

LISTENED = b"SELECT coalesce(json_agg(c), '[]') FROM pg_listening_channels() AS c"


@dataclass
class Settings:
    """The constructor's arguments, checked by the facade."""

    ping_period: float
    ping_timeout: float
    max_backlog: int
    reconnect_delay: float
    max_reconnect_delay: float
    max_reconnect_attempts: int | None
    healthy_after: float
    queue_usage_warning: float = 0.5
    exclusive: str | None = None
    max_connection_age: float | None = None
    tcp_keepalive: bool = True


@dataclass
class Request:
    """A change to the callbacks, for the serving loop to apply."""

    action: Literal["add", "remove"]
    callback: Callback
    channel: str
    future: Future[None]
    catch_up: CatchUp | None = None
    decode: Callable[[str], Any] | None = None


@dataclass
class Statement:
    """A statement sent to the server, its results gathered as libpq parses them."""

    query: bytes
    expected: int = 1
    """How many results are the statement's own: an error after them was sent
    between its CommandComplete and ReadyForQuery (a notification the server
    could not convert to the client encoding) and is not the statement's."""
    request: Request | None = None
    on_done: Callable[[Statement, psycopg.Error | None], None] | None = None
    results: list[pq.abc.PGresult] = field(default_factory=list)
    started: float = 0.0

    def collect(self, pgconn: pq.abc.PGconn) -> bool:
        """Take the results libpq has parsed; ``True`` once the last one is in."""
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                return True
            self.results.append(result)
        return False

    def error(self, encoding: str) -> psycopg.Error | None:
        """The statement's own error, if any; others are logged, not raised."""
        own: psycopg.Error | None = None
        for index, result in enumerate(self.results):
            if result.status != _FATAL:
                continue
            error = errors.error_from_result(result, encoding=encoding)
            if index < self.expected:
                own = own or error
            else:
                logger.warning(
                    "the server reported an error after %s had completed,"
                    " most likely a notification it could not convert to the"
                    " client encoding %r (that notification is lost): %s",
                    self.query[:60].decode("utf-8", "replace"),
                    encoding,
                    str(error),
                )
        return own

    def value(self, column: int, row: int = 0) -> bytes | None:
        return self.results[0].get_value(row, column)


@dataclass
class Rotation:
    """A new connection listening already, taking over at a marker notification.

    PostgreSQL delivers every notification to every listening session in one
    global (commit) order, so a marker sent once the new session listens
    divides the stream: the old session delivers what precedes it, the new
    one what follows it. Nothing is lost, nothing delivered twice.
    """

    conn: Any
    token: str
    futures: list[Future[None]]
    session_pid: int
    drained: bool = False
    """The old session delivered its marker: everything before it is out."""

    def fail(self, error: BaseException) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(error)


class Decoding:
    """A callback whose payload goes through ``decode`` first, in the callback's thread.

    A payload ``decode`` refuses is a poison message: logged, not delivered.
    """

    __slots__ = ("__wrapped__", "callback", "decode")

    def __init__(self, callback: Callback, decode: Callable[[str], Any]):
        self.callback = self.__wrapped__ = callback
        self.decode = decode

    def __call__(self, notify: Notify) -> object:
        try:
            payload = self.decode(notify.payload)
        except Exception as ex:
            logger.error(
                "poison message on channel %r (pid %d, %d characters): %s refused"
                " it (%s: %s); not delivered to %r",
                notify.channel,
                notify.pid,
                len(notify.payload),
                getattr(self.decode, "__qualname__", self.decode),
                type(ex).__name__,
                ex,
                self.callback,
            )
            return None
        return self.callback(_tuple_new(Notify, (notify.channel, payload, notify.pid)))

    def __repr__(self) -> str:
        return f"{self.callback!r} (decoded by {self.decode!r})"


def registered(entry: Callback) -> Callback:
    """The callback as the user registered it."""
    return entry.callback if type(entry) is Decoding else entry


class ConnectionLost(Exception):
    """Internal: the connection broke; the loop reconnects."""


class Interrupted(BaseException):
    """Internal: ``stop()`` cut a statement of the connection phase short.

    A ``BaseException``, so that no ``except Exception`` on its way out hands
    it to a future or takes it for a refused statement.
    """


class Waker:
    """A self-pipe: any thread, or a signal handler, interrupts the loop's wait.

    ``wake()`` takes no lock and does nothing but one ``os.write``, so a
    signal handler may call it at any point of any thread. The pipe is closed
    only when the waker is collected: no late ``wake()`` can ever write to a
    descriptor number that was closed and reused.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        # A full pipe means the loop will wake anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def __del__(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def settle(future: Future[Any], error: BaseException | None = None) -> None:
    """Resolve a request's future, whatever state a user left it in.

    A future still pending may be cancelled by its user meanwhile; a
    cancelled one is skipped rather than raising ``InvalidStateError``.
    """
    if not future.running() and not future.set_running_or_notify_cancel():
        return  # cancelled by its user
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def public_error(error: BaseException) -> BaseException:
    """What a future may raise for an error of the loop: never an internal one."""
    if isinstance(error, ConnectionLost):
        cause = error.__cause__
        if isinstance(cause, Exception):
            return cause
        return psycopg.OperationalError("the connection was lost")
    if isinstance(error, Exception):
        return error
    return ListenerStopped("the listener stopped first")


def python_codec(pg_encoding: str | None) -> str | None:
    """The Python codec of a PostgreSQL encoding name, if Python has one."""
    if not pg_encoding:
        return None
    try:
        return pg2pyenc(pg_encoding.encode())
    except Exception:
        return None  # SQL_ASCII and the like: no byte limit can be measured


def channel_too_long(channel: str, codec: str | None) -> InvalidChannel | None:
    """Refuse a channel the server would truncate, measured in its encoding."""
    if len(channel) > MAX_CHANNEL_BYTES:
        size = len(channel)
        unit = "characters"
    elif codec is None:
        return None
    else:
        try:
            size = len(channel.encode(codec))
        except UnicodeEncodeError:
            return None  # the server refuses it itself, with its own message
        unit = f"bytes in the database encoding {codec}"
    if size <= MAX_CHANNEL_BYTES:
        return None
    return InvalidChannel(
        f"channel {channel!r} is {size} {unit}: PostgreSQL allows at most"
        f" {MAX_CHANNEL_BYTES} bytes and would truncate it"
    )


class Core:
    """Serves one listener: connect, LISTEN, read, dispatch, ping, reconnect."""

    def __init__(
        self,
        listener: Any,
        settings: Settings,
        host: PluginHost,
        on_reconnect: Callable[[], object] | None,
        make_dispatcher: Callable[[Callable[[], None], Any], Any],
        check_connection: Callable[[object], Any],
    ):
        self._listener = listener
        self._settings = settings
        self._host = host
        self._on_reconnect = on_reconnect
        self._check_connection = check_connection
        self._requests: deque[Request] = deque()
        self._internal: deque[Statement] = deque()
        self._awaits: deque[Awaitable[Any]] = deque()
        self._probes: list[Future[None]] = []
        # Reentrant: a Notifications iterator collected while this thread
        # holds the lock (a garbage collection can start at any allocation)
        # queues its removal through it.
        self._lock = threading.RLock()
        self.waker = Waker()
        self._stopping = False
        self._finished = False
        self._registry = Registry()
        self._reader = Reader(self._registry.entries)
        self._catch_ups: dict[str, dict[Callback, CatchUp]] = {}
        self._held: dict[str, list[Delivery]] = {}
        self._conn: Any = None
        self._pgconn: pq.abc.PGconn | None = None
        self._statement: Statement | None = None
        self._encoding = "utf-8"
        self.server_codec: str | None = None
        self.backend_pid: int | None = None
        self._session_pid: int | None = None
        self.reconnects = 0
        self._received: Counter[str] = Counter()
        self._connected_since: float | None = None
        self._last_notification_at: float | None = None
        self._last_ping_at: float | None = None
        self._last_ping_duration: float | None = None
        self._queue_usage: float | None = None
        # exclusive: callbacks run only while the session holds the lock.
        self.active = settings.exclusive is None
        self._rotations: list[Future[None]] = []
        self._rotation: Rotation | None = None
        self._rotate_at: float | None = None
        self._skip_until: str | None = None  # a new session's marker, after rotating
        self._marker_channel = f"_pg_listener_rotation_{os.getpid()}_{id(self):x}"
        self._markers = 0
        self._dispatcher = make_dispatcher(self.waker.wake, self._callback_done)

    # -- from any thread ---------------------------------------------------------

    def _accept(self, queue: Any, item: object, future: Future[None]) -> None:
        """Queue ``item`` for the loop, or fail its future once the loop ended."""
        with self._lock:
            finished = self._finished
            if not finished:
                queue.append(item)
        if finished:
            settle(future, ListenerStopped("the listener has stopped: nothing done"))
        else:
            self.waker.wake()

    def submit(self, request: Request) -> None:
        self._accept(self._requests, request, request.future)

    def probe(self) -> Future[None]:
        """A future the loop resolves on its next turn: it is not stuck."""
        future: Future[None] = Future()
        self._accept(self._probes, future, future)
        return future

    def rotate(self, future: Future[None]) -> Future[None]:
        """Ask for a new connection that takes over without a gap."""
        self._accept(self._rotations, future, future)
        return future

    def stop(self) -> None:
        # No lock: a signal handler may call this at any point of any thread.
        self._stopping = True
        self.waker.wake()

    @property
    def backlog(self) -> int:
        return int(self._dispatcher.backlog)

    @property
    def channels(self) -> dict[str, tuple[Callback, ...]]:
        """The channels listened to: not one whose LISTEN is still on its way."""
        channels = self._registry.callbacks()
        if (pending := self._listen_pending()) is not None:
            channels.pop(pending, None)
        return channels

    def _listen_pending(self) -> str | None:
        """The new channel of the LISTEN in flight, registered but not yet
        acknowledged (so that notifications just before the answer reach it)."""
        statement = self._statement
        request = statement.request if statement is not None else None
        if request is None or request.action != "add":
            return None
        return request.channel if self._registry.count(request.channel) == 1 else None

    def stats(self, name: str) -> ListenerStats:
        dispatcher = self._dispatcher
        return ListenerStats(
            name=name,
            connected=self._connected_since is not None,
            active=self.active,
            backend_pid=self.backend_pid,
            connected_since=self._connected_since,
            reconnects=self.reconnects,
            channels=tuple(self.channels),
            received=dict(self._received),
            delivered=dispatcher.delivered(),
            callback_errors=dispatcher.errors(),
            backlog=int(dispatcher.backlog),
            last_notification_at=self._last_notification_at,
            last_ping_at=self._last_ping_at,
            last_ping_duration=self._last_ping_duration,
            queue_usage=self._queue_usage,
        )

    # -- the loop ------------------------------------------------------------------

    def serve(self) -> Loop:
        """Run until ``stop()``; raise what ends it otherwise."""
        error: BaseException | None = None
        self._host.call("listener_started", listener=self._listener)
        try:
            yield from self._serve_forever()
        except Interrupted:
            pass  # stop() was called while a statement waited for the server
        except BaseException as ex:
            error = ex
            raise
        finally:
            self._finish(error)
            if not isinstance(error, GeneratorExit):  # nothing may be awaited then
                yield from self._close()
                pending = self._dispatcher.shutdown()
                if pending is not None:
                    yield Await(pending)
            self._host.call("listener_stopped", listener=self._listener, error=error)

    def _serve_forever(self) -> Loop:
        settings = self._settings
        backoff = Backoff(settings.reconnect_delay, settings.max_reconnect_delay)
        connected_before = False
        failures = 0
        while not self._stopping:
            try:
                yield from self._connect()
            except ConnectionLost as ex:
                self._abandon_statement(ex.__cause__ or ex)
                yield from self._close()
                failures += 1
                limit = settings.max_reconnect_attempts
                if limit is not None and failures >= limit:
                    raise ReconnectFailed(
                        f"could not connect after {failures} attempts:"
                        f" {ex.__cause__ or ex}"
                    ) from ex.__cause__
                delay = backoff.next_delay()
                logger.warning(
                    "connection attempt %d failed (%s); next in %.2f s",
                    failures,
                    str(ex.__cause__ or ex),
                    delay,
                )
                yield from self._sleep(delay)
                continue
            failures = 0

            since = time.monotonic()
            if connected_before:
                self.reconnects += 1
            self._host.call(
                "listener_connected", listener=self._listener, connection=self._conn
            )
            if connected_before:
                self._signal_reconnect()
            connected_before = True
            # Each registration's catch-up, at the first connection and after
            # every reconnection, before any notification of its channel; an
            # exclusive standby runs them when it takes over.
            if self.active:
                self._catch_up_all()
            try:
                yield from self._serve_connection()
            except ConnectionLost as ex:
                error = ex.__cause__ or ex
                # Text, not the exception: a handler that keeps records (as
                # pytest's does) would keep its traceback's frames, and with
                # them the whole listener, alive.
                logger.warning("connection lost: %s; reconnecting", str(error))
                self._abandon_statement(error)
                yield from self._close()
                self._host.call(
                    "listener_disconnected", listener=self._listener, error=error
                )
                # A connection that dies at once must not make a tight loop:
                # the backoff only starts over after one that held a while.
                if time.monotonic() - since >= settings.healthy_after:
                    backoff.reset()
                yield from self._sleep(backoff.next_delay())

    def _signal_reconnect(self) -> None:
        logger.warning(
            "reconnected: notifications sent while disconnected were not received"
        )
        self._host.call(
            "listener_reconnected", listener=self._listener, connection=self._conn
        )
        if self._on_reconnect is not None:
            try:
                self._on_reconnect()
            except Exception:
                logger.exception("on_reconnect callback %r raised", self._on_reconnect)

    def _sleep(self, delay: float) -> Loop:
        """Wait before reconnecting; ``stop()`` cuts the wait short."""
        deadline = time.monotonic() + delay
        while not self._stopping and time.monotonic() < deadline:
            yield Wait(-1, 0, deadline)
            self.waker.drain()
            self._answer_probes()

    def _connect(self) -> Loop:
        logger.debug("connecting (thread %s)", threading.current_thread().name)
        try:
            conn = yield CONNECT
        except Exception as ex:
            raise ConnectionLost("the connection factory raised") from ex
        self._use(self._check_connection(conn))
        try:
            self._session_pid = yield from self._listen_all(self._pgconn)
            yield from self._verify(self._pgconn)
            # Changes made before start() or while disconnected, so that the
            # connected hooks see every channel listened to.
            while self._requests:
                statement = self._apply_requests(time.monotonic())
                if statement is not None:
                    yield from self._run(statement)
                elif self._requests:
                    yield Wait(-1, 0, time.monotonic())  # an event loop's turn
        except UnicodeEncodeError as ex:
            # A registered channel this connection's client encoding cannot
            # express: retried, with backoff and a warning, like a refusal.
            raise ConnectionLost() from ex
        except psycopg.Error as ex:
            # Such as "cannot execute LISTEN during recovery" on a standby:
            # retry, with backoff, until a server accepts them again.
            raise ConnectionLost() from ex
        self._connected()
        logger.info(
            "connected (backend pid %d), listening on %d channels",
            self.backend_pid,
            len(self._registry),
        )

    def _use(self, conn: Any) -> None:
        """Make ``conn`` the listener's connection."""
        self._conn = conn
        self._pgconn = conn.pgconn
        configure_keepalive(conn.pgconn, self._settings.tcp_keepalive)
        self._encoding = conn.info.encoding
        self._reader.use_encoding(self._encoding)
        self.server_codec = python_codec(conn.info.parameter_status("server_encoding"))
        self.backend_pid = conn.info.backend_pid

    def _connected(self) -> None:
        self._connected_since = time.time()
        age = self._settings.max_connection_age
        if age is not None:
            # Jitter below the age only, so that it is never exceeded, and
            # listeners started together do not all rotate together.
            self._rotate_at = time.monotonic() + age * random.uniform(0.9, 1.0)

    def _listen_all(self, pgconn: Any, *extra: str) -> Generator[Wait, int, int]:
        """LISTEN every registered channel; the server session's own pid."""
        channels = [*self._registry, *extra]
        # The backend's pid from the server itself: a pooler reports its own.
        listen = Statement(
            b";".join(
                [b"SELECT pg_backend_pid()"]
                + [self._statement_for("LISTEN", ch) for ch in channels]
            ),
            expected=1 + len(channels),
        )
        yield from self._run(listen, pgconn)
        return int(listen.value(0) or 0)

    def _verify(self, pgconn: Any) -> Generator[Wait, int, None]:
        """A following statement must find the same session, still listening.

        Behind a pooler in transaction or statement mode it may be another
        server session, which would never deliver. An exclusive listener
        also tries to take its lock here.
        """
        check = Statement(
            self._ping_query(try_lock=self._settings.exclusive is not None)
        )
        yield from self._run(check, pgconn)
        self._check_session(check)
        self._check_lock(check)

    def _check_session(self, check: Statement) -> None:
        pid = int(check.value(0) or 0)
        listened = int(check.value(2) or 0)
        if pid != self._session_pid:
            raise SessionNotKept(
                f"consecutive statements ran in different server sessions (backend"
                f" {self._session_pid}, then {pid}): the connection goes through a"
                " pooler in transaction or statement mode, where LISTEN is lost"
                " silently. Connect directly to PostgreSQL, or through a pooler"
                " in session mode (PgBouncer: pool_mode = session)"
            )
        if listened < len(self._registry):
            self._relisten()

    def _close(self) -> Loop:
        conn, self._conn, self._pgconn = self._conn, None, None
        self.backend_pid = self._session_pid = self._connected_since = None
        self._rotate_at = self._skip_until = None
        self._held.clear()
        self._internal.clear()
        self._set_active(self._settings.exclusive is None)  # the lock went with it
        rotation, self._rotation = self._rotation, None
        if rotation is not None:
            rotation.fail(
                psycopg.OperationalError("the connection was lost while rotating")
            )
            yield Close(rotation.conn)
        if conn is not None:
            yield Close(conn)

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._finished = True
            pending, self._requests = self._requests, deque()
            probes, self._probes = self._probes, []
            rotations, self._rotations = self._rotations, []
        if self._rotation is not None:
            rotations += self._rotation.futures
        if self._statement is not None and self._statement.request is not None:
            pending.appendleft(self._statement.request)
        self._statement = None
        if isinstance(error, Exception):
            reason: BaseException = error
        else:  # stop(), KeyboardInterrupt, cancellation
            reason = ListenerStopped("the listener stopped before applying this change")
        for request in pending:
            settle(request.future, reason)
        for future in [*probes, *rotations]:
            settle(future, reason)

    def _answer_probes(self) -> None:
        if self._probes:
            with self._lock:
                probes, self._probes = self._probes, []
            for probe in probes:
                settle(probe)

    def _serve_connection(self) -> Loop:
        """Read, dispatch, apply requests and ping until ``stop()`` or a loss."""
        pgconn = self._pgconn
        assert pgconn is not None
        fileno = pgconn.socket
        settings = self._settings
        timeout = settings.ping_timeout
        dispatcher = self._dispatcher
        awaits = self._awaits
        flushing = False
        deadline = 0.0  # of the statement in flight: silence allowed until then
        last_activity = self._last_ping_sent = time.monotonic()
        while True:
            while awaits:
                yield Await(awaits.popleft())
            if self._probes:
                self._answer_probes()
            if self._stopping:
                return
            room = dispatcher.room()
            if room > 0 and self._take(room):
                continue  # the batch filled the room: look again
            statement = self._statement
            if statement is not None and not flushing and statement.collect(pgconn):
                self._statement = None
                self._done(statement)
                continue  # notifications parsed with the answer go first
            rotation = self._rotation
            if rotation is not None and rotation.drained:
                yield from self._switch(rotation)
                pgconn = self._pgconn
                assert pgconn is not None
                fileno = pgconn.socket
                last_activity = time.monotonic()
                continue
            if room <= 0:
                # The backlog is full: stop reading, let the server buffer,
                # and sleep until a worker has drained it to half. The
                # statement in flight waits too, and its deadline with it.
                yield Wait(-1, 0, None)
                self.waker.drain()
                last_activity = time.monotonic()
                deadline = last_activity + timeout
                continue
            now = time.monotonic()
            if statement is None and rotation is None:
                if self._rotations or (
                    self._rotate_at is not None and now >= self._rotate_at
                ):
                    yield from self._begin_rotation()
                    continue
                statement = self._next_statement(now, last_activity)
                if statement is not None:
                    try:
                        pgconn.send_query(statement.query)
                        flushing = pgconn.flush() != 0
                    except psycopg.OperationalError as ex:
                        self._statement = statement
                        raise ConnectionLost() from ex
                    statement.started = time.perf_counter()
                    self._statement = statement
                    # Not ``now``: applying requests took time of its own.
                    deadline = time.monotonic() + timeout
                    continue
            if awaits:
                continue  # inline coroutine callbacks of that batch: await them now
            if statement is not None:
                wake_at: float | None = deadline
            elif rotation is not None:
                wake_at = None  # the marker is on its way
            elif self._requests:
                wake_at = now  # read what came meanwhile, then apply more
            else:
                wake_at = self._next_ping(last_activity)
                if self._rotate_at is not None:
                    wake_at = min(wake_at or self._rotate_at, self._rotate_at)
            ready = yield Wait(fileno, READ | WRITE if flushing else READ, wake_at)
            if not ready:
                self.waker.drain()
                if statement is not None and time.monotonic() >= deadline:
                    raise ConnectionLost() from TimeoutError(
                        f"the server did not answer within {timeout} s"
                    )
                continue
            try:
                if ready & WRITE:
                    flushing = pgconn.flush() != 0
                if ready & READ:
                    pgconn.consume_input()
            except psycopg.OperationalError as ex:
                raise ConnectionLost() from ex
            if pgconn.status != _OK:
                raise ConnectionLost() from psycopg.OperationalError(
                    pgconn.get_error_message() or "the connection was closed"
                )
            last_activity = time.monotonic()
            deadline = last_activity + timeout

    def _next_ping(self, last_activity: float) -> float | None:
        """When the next ping is due: after silence, or every period for a standby."""
        period = self._settings.ping_period
        if not period:
            return None
        if self.active:
            return last_activity + period
        return self._last_ping_sent + period

    def _take(self, room: int) -> bool:
        if self._rotation is None and self._skip_until is None:
            return self._take_notifications(room)
        return self._take_around_marker(room)

    def _take_around_marker(self, room: int) -> bool:
        """While rotating: the old session's notifications up to the marker, the
        new one's after it."""
        pgconn = self._pgconn
        assert pgconn is not None
        marker = self._marker_channel.encode()
        rotation = self._rotation
        if rotation is not None:
            if rotation.drained:
                return False  # what follows the marker comes from the new session
            token = rotation.token.encode()
        else:
            assert self._skip_until is not None
            token = self._skip_until.encode()
        before = []
        for pgnotify in iter(pgconn.notifies, None):
            if pgnotify.relname == marker and pgnotify.extra == token:
                break
            before.append(pgnotify)
        else:  # the marker is still to come
            if rotation is not None:
                self._hand_over(before)
            return False
        if rotation is not None:
            self._hand_over(before)
            rotation.drained = True
            return True  # switch at once
        # else: what came before was the new session's copy of what the old
        # one delivered
        self._skip_until = None
        return self._take_notifications(room)

    # -- rotation ------------------------------------------------------------------

    def _begin_rotation(self) -> Loop:
        """Open the new connection, listen there, and send the marker."""
        with self._lock:
            futures, self._rotations = self._rotations, []
        self._rotate_at = None
        self._markers += 1
        token = f"{os.getpid()}-{id(self):x}-{self._markers}"
        marker = self._marker_channel
        new: Any = None
        old_listens = False  # while the old connection runs a statement
        try:
            try:
                new = self._check_connection((yield CONNECT))
                new_pid = yield from self._listen_all(new.pgconn, marker)
                check = Statement(PING)
                yield from self._run(check, new.pgconn)
                if int(check.value(0) or 0) != new_pid:
                    raise SessionNotKept(
                        "the new connection's statements ran in different server"
                        " sessions: it goes through a pooler in transaction or"
                        " statement mode"
                    )
                # The old session listens to the marker too; if that fails,
                # it is the old connection's loss (raised on, below).
                old_listens = True
                yield from self._run(Statement(self._statement_for("LISTEN", marker)))
                old_listens = False
                notify = sql.SQL("NOTIFY {}, {}").format(
                    sql.Identifier(marker), sql.Literal(token)
                )
                yield from self._run(Statement(notify.as_bytes(new)), new.pgconn)
            except Exception as ex:
                if old_listens:
                    raise  # the old connection's loss: reconnect
                error = public_error(ex)
                logger.warning(
                    "rotation failed, the current connection goes on: %s", str(error)
                )
                for future in futures:
                    settle(future, error)
                if new is not None:
                    yield Close(new)
                self._connected()  # try again after another age
                return
        except BaseException as ex:  # the old connection lost, stop(), Ctrl-C
            error = public_error(ex)
            for future in futures:
                settle(future, error)
            if new is not None and not isinstance(ex, GeneratorExit):
                yield Close(new)
            raise
        self._rotation = Rotation(new, token, futures, new_pid)

    def _switch(self, rotation: Rotation) -> Loop:
        """The old session delivered everything before the marker: hand over."""
        self._rotation = None
        old = self._conn
        self._use(rotation.conn)
        self._session_pid = rotation.session_pid
        self._skip_until = rotation.token
        yield Close(old)
        self._connected()
        self._internal.append(
            Statement(self._statement_for("UNLISTEN", self._marker_channel))
        )
        logger.info("rotated to a new connection (backend pid %s)", self.backend_pid)
        if self._settings.exclusive is not None and self.active:
            # The lock went with the old session: take it again at once.
            self._set_active(False)
            self._internal.append(
                Statement(self._ping_query(try_lock=True), on_done=self._ping_done)
            )
        for future in rotation.futures:
            settle(future)

    def _take_notifications(self, room: int) -> bool:
        """Hand parsed notifications over; ``True`` when they filled ``room``."""
        pgconn = self._pgconn
        assert pgconn is not None
        pgnotifies = list(islice(iter(pgconn.notifies, None), room))
        self._hand_over(pgnotifies)
        return len(pgnotifies) >= room

    def _hand_over(self, pgnotifies: list[Any]) -> None:
        """Count and dispatch libpq's notifications (``PGnotify``)."""
        if not pgnotifies:
            return
        on_notification = self._host.caller("listener_notification")
        if on_notification is None and not self.active:
            return  # a standby reads to keep the server's queue moving, no more
        batch = self._reader.deliveries(pgnotifies, on_notification, self._listener)
        if not batch or not self.active:
            return
        self._last_notification_at = time.time()
        count_channels(self._received, batch)
        if self._held:
            batch = self._hold(batch)
        pending = self._dispatcher.dispatch(batch)
        if pending is not None:
            self._awaits.append(pending)

    def _hold(self, batch: list[Delivery]) -> list[Delivery]:
        """Keep back the notifications of channels whose catch-up must run first."""
        held = self._held
        passed = []
        for delivery in batch:
            waiting = held.get(delivery[1][0])
            if waiting is None:
                passed.append(delivery)
            else:
                waiting.append(delivery)
        return passed

    def _callback_done(self) -> Callable[[Callback, Notify, float, Any], None] | None:
        caller = self._host.caller("listener_callback_done")
        if caller is None:
            return None
        listener = self._listener

        def done(
            callback: Callback, notify: Notify, duration: float, error: Any
        ) -> None:
            caller(
                listener=listener,
                callback=registered(callback),
                notify=notify,
                duration=duration,
                error=error,
            )

        return done

    # -- catch-ups -------------------------------------------------------------------

    def _catch_up(self, channel: str, catch_ups: list[CatchUp]) -> None:
        """Run catch-ups through the dispatcher, ahead of the channel's deliveries."""
        if not catch_ups:
            return
        pending = self._dispatcher.catch_up(
            channel, self._catch_up_runner(channel, catch_ups)
        )
        if pending is not None:
            self._awaits.append(pending)

    def _catch_up_runner(
        self, channel: str, catch_ups: list[CatchUp]
    ) -> Callable[[], Awaitable[None] | None]:
        host, listener = self._host, self._listener

        def report(catch_up: CatchUp, started: float, error: Exception | None) -> None:
            if error is not None:
                logger.error(
                    "catch-up %r of channel %r raised",
                    catch_up,
                    channel,
                    exc_info=error,
                )
            host.call(
                "listener_catch_up_done",
                listener=listener,
                channel=channel,
                catch_up=catch_up,
                duration=time.perf_counter() - started,
                error=error,
            )

        async def finish(
            awaitable: Awaitable[object],
            catch_up: CatchUp,
            started: float,
            rest: list[CatchUp],
        ) -> None:
            try:
                await awaitable
            except Exception as ex:
                report(catch_up, started, ex)
            else:
                report(catch_up, started, None)
            pending = run(rest)
            if pending is not None:
                await pending

        def run(catch_ups: list[CatchUp]) -> Awaitable[None] | None:
            for index, catch_up in enumerate(catch_ups):
                started = time.perf_counter()
                try:
                    result = catch_up(channel)
                except Exception as ex:
                    report(catch_up, started, ex)
                    continue
                if inspect.isawaitable(result):
                    return finish(result, catch_up, started, catch_ups[index + 1 :])
                report(catch_up, started, None)
            return None

        return lambda: run(catch_ups)

    # -- statements ----------------------------------------------------------------

    def _statement_for(self, verb: str, channel: str) -> bytes:
        assert self._conn is not None
        # Always an identifier, never text: MixedCase, spaces and quotes survive.
        query = sql.SQL(verb + " {}").format(sql.Identifier(channel))
        return query.as_bytes(self._conn)

    def _run(
        self, statement: Statement, pgconn: Any = None
    ) -> Generator[Wait, int, None]:
        """Run one statement to its end, waiting for nothing else.

        For the set-up of a connection (``pgconn``, the listener's by
        default), while no notification is delivered from it. Its own error
        is raised; a broken or silent connection raises ``ConnectionLost``;
        ``stop()`` raises ``Interrupted``.
        """
        pgconn = pgconn or self._pgconn
        assert pgconn is not None
        timeout = self._settings.ping_timeout
        deadline = time.monotonic() + timeout
        if statement.request is not None:
            self._statement = statement
        try:
            pgconn.send_query(statement.query)
            statement.started = time.perf_counter()
            flushing = pgconn.flush() != 0
            while flushing or not statement.collect(pgconn):
                ready = yield Wait(
                    pgconn.socket, READ | WRITE if flushing else READ, deadline
                )
                if self._stopping:
                    raise Interrupted
                if not ready:
                    self.waker.drain()
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"the server did not answer within {timeout} s"
                        )
                    continue
                if ready & WRITE:
                    flushing = pgconn.flush() != 0
                if ready & READ:
                    pgconn.consume_input()
                deadline = time.monotonic() + timeout
        except (psycopg.OperationalError, TimeoutError) as ex:
            raise ConnectionLost() from ex
        if pgconn.status != _OK:
            raise ConnectionLost() from psycopg.OperationalError(
                pgconn.get_error_message() or "the connection was closed"
            )
        if statement.request is not None:
            self._statement = None
        self._done(statement)

    def _done(self, statement: Statement) -> None:
        """A statement's answer is in: settle what it was for."""
        error = statement.error(self._encoding)
        if statement.on_done is not None:
            statement.on_done(statement, error)
        elif statement.request is not None:
            self._request_done(statement.request, error)
        elif error is not None:
            raise error

    def _next_statement(self, now: float, last_activity: float) -> Statement | None:
        if self._internal:
            return self._internal.popleft()
        statement = self._apply_requests(now)
        if statement is not None or self._requests:
            return statement
        ping_at = self._next_ping(last_activity)
        if ping_at is not None and now >= ping_at:
            self._last_ping_sent = now
            query = self._ping_query(try_lock=not self.active)
            return Statement(query, on_done=self._ping_done)
        return None

    def _apply_requests(self, now: float) -> Statement | None:
        """Apply requests until one needs a statement (returned) or the turn
        is over: a burst of thousands of ``add_callback()`` is applied a
        share per turn, so that reading and the deadlines go on."""
        turn_ends = now + REQUESTS_TURN
        while self._requests:
            statement = self._next_request()
            if statement is not None or time.monotonic() >= turn_ends:
                return statement
        return None

    def _next_request(self) -> Statement | None:
        """Apply the next request; the statement it needs, if any."""
        request = self._requests.popleft()
        future = request.future
        # A request put back after a lost connection is running already.
        if not (future.running() or future.set_running_or_notify_cancel()):
            return None  # cancelled by its user while queued
        try:
            return self._apply(request)
        except BaseException as ex:
            if not future.done():  # whatever ends the loop, this one resolves too
                future.set_exception(public_error(ex))
            raise

    def _apply(self, request: Request) -> Statement | None:
        channel, callback = request.channel, request.callback
        registry = self._registry
        if request.action == "add":
            if registry.has(channel, callback):
                request.future.set_result(None)
                return None
            first = channel not in registry
            if first and (error := channel_too_long(channel, self.server_codec)):
                request.future.set_exception(error)
                return None
            entry = (
                callback
                if request.decode is None
                else Decoding(callback, request.decode)
            )
            # Registered before LISTEN is acknowledged: the server may send
            # the channel's first notifications just before its answer.
            registry.add(channel, callback, entry)
            self._reader.forget_routes()
            if request.catch_up is not None:
                self._catch_ups.setdefault(channel, {})[callback] = request.catch_up
            if not first:
                request.future.set_result(None)
                if request.catch_up is not None and self._connected_since:
                    self._catch_up(channel, [request.catch_up])
                return None
            try:
                query = self._statement_for("LISTEN", channel)
            except Exception as ex:  # not encodable in the client encoding
                self._unregister(channel, callback)
                request.future.set_exception(ex)
                return None
            if request.catch_up is not None:
                self._held[channel] = []
            return Statement(query, request=request)
        if not registry.has(channel, callback):
            request.future.set_exception(
                CallbackNotRegistered(
                    f"{callback!r} is not registered on channel {channel!r}"
                )
            )
            return None
        if registry.count(channel) > 1:
            self._unregister(channel, callback)
            request.future.set_result(None)
            return None
        # Forgotten only once UNLISTEN is acknowledged: a refused one changes
        # nothing, so the future and the listener's state agree.
        return Statement(self._statement_for("UNLISTEN", channel), request=request)

    def _unregister(self, channel: str, callback: Callback) -> None:
        self._catch_ups.get(channel, {}).pop(callback, None)
        self._reader.forget_routes()
        if self._registry.remove(channel, callback):
            return
        self._catch_ups.pop(channel, None)
        self._held.pop(channel, None)

    def _request_done(self, request: Request, error: psycopg.Error | None) -> None:
        channel = request.channel
        if request.action == "add":
            held = self._held.pop(channel, None)
            if error is not None:
                self._unregister(channel, request.callback)
                request.future.set_exception(error)
                return
            request.future.set_result(None)
            # While connecting, every channel's catch-ups run once connected.
            if request.catch_up is not None and self._connected_since:
                self._catch_up(channel, [request.catch_up])
            if held:
                pending = self._dispatcher.dispatch(held)
                if pending is not None:
                    self._awaits.append(pending)
            return
        if error is not None:
            request.future.set_exception(error)
            return
        self._unregister(channel, request.callback)
        request.future.set_result(None)

    def _abandon_statement(self, error: BaseException) -> None:
        """The connection broke with a statement in flight."""
        statement, self._statement = self._statement, None
        if statement is None:
            return
        if statement.on_done == self._ping_done:
            self._ping_hook(statement, error)
        request = statement.request
        if request is None:
            return
        if request.action == "add":
            # Registered already: the next connection LISTENs to it, then
            # the request, applied again, finds it there and resolves.
            self._held.pop(request.channel, None)
            self._requests.appendleft(request)
        else:
            self._unregister(request.channel, request.callback)
            request.future.set_result(None)  # the next connection won't LISTEN

    # -- ping and session checks ------------------------------------------------------

    def _ping_hook(self, statement: Statement, error: BaseException | None) -> None:
        self._host.call(
            "listener_ping",
            listener=self._listener,
            duration=time.perf_counter() - statement.started,
            error=error,
        )

    def _ping_query(self, try_lock: bool) -> bytes:
        if not try_lock:
            return PING
        # A session-level advisory lock on the listening connection itself:
        # it dies with the session, so a standby takes over when it does.
        lock = sql.SQL(", pg_try_advisory_lock(hashtext({}), hashtext({}))").format(
            sql.Literal(LOCK_NAMESPACE), sql.Literal(self._settings.exclusive)
        )
        assert self._conn is not None
        return PING + lock.as_bytes(self._conn)

    def _check_lock(self, statement: Statement) -> None:
        took = statement.results[0].nfields > 3 and statement.value(3) == b"t"
        if took and not self.active:
            logger.info(
                "took the exclusive lock %r: this listener runs the callbacks now",
                self._settings.exclusive,
            )
            self._set_active(True)
            if self._connected_since is not None:
                self._catch_up_all()  # it did not handle what came before

    def _set_active(self, active: bool) -> None:
        if active != self.active:
            self.active = active
            self._host.call(
                "listener_active_changed", listener=self._listener, active=active
            )

    def _catch_up_all(self) -> None:
        for channel, catch_ups in list(self._catch_ups.items()):
            self._catch_up(channel, list(catch_ups.values()))

    def _ping_done(self, statement: Statement, error: psycopg.Error | None) -> None:
        if error is not None:
            self._ping_hook(statement, error)
            raise ConnectionLost() from error
        # The stats first: a plugin's ping hook may read them.
        self._last_ping_at = time.time()
        self._last_ping_duration = time.perf_counter() - statement.started
        usage = float(statement.value(1) or 0)
        self._queue_usage = usage
        self._ping_hook(statement, None)
        if usage >= self._settings.queue_usage_warning:
            logger.warning(
                "the server's notification queue is %.0f%% full: at 100%% every"
                " commit that sends NOTIFY fails, cluster-wide. A session idle in"
                " transaction, or a listener that does not keep up, holds it back"
                " (see pg_stat_activity)",
                usage * 100,
            )
        self._check_session(statement)
        self._check_lock(statement)

    def _relisten(self) -> None:
        """The session stopped listening to some channel: find which, LISTEN again."""

        def listened(statement: Statement, error: psycopg.Error | None) -> None:
            if error is not None:
                raise ConnectionLost() from error
            have = set(json.loads(statement.value(0) or b"[]"))
            missing = [channel for channel in self._registry if channel not in have]
            if not missing:
                return
            logger.warning(
                "the session no longer listened to %d channels (%s): an UNLISTEN"
                " ran on it, or a pooler changed the server session; listening"
                " again and catching up",
                len(missing),
                ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
            )
            self._internal.appendleft(
                Statement(
                    b";".join(self._statement_for("LISTEN", ch) for ch in missing),
                    expected=len(missing),
                    on_done=lambda statement, error: self._relistened(missing, error),
                )
            )

        self._internal.append(Statement(LISTENED, on_done=listened))

    def _relistened(self, channels: Iterable[str], error: psycopg.Error | None) -> None:
        if error is not None:
            raise ConnectionLost() from error
        for channel in channels:
            self._catch_up(channel, list(self._catch_ups.get(channel, {}).values()))

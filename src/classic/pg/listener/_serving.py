"""The serving loop: the one thread that owns the connection.

Other threads never touch the connection. They queue requests (add or
remove a callback, each carrying its future) and write a byte to a wake-up
pipe; the serving thread sleeps in ``select()`` on that pipe and on the
connection's socket, so an idle listener costs nothing and reacts at once.

Notifications are read at the libpq level (``consume_input()`` then
``notifies()``), about twice as fast as ``Connection.notifies()``. The few
statements the listener sends (``LISTEN``, ``UNLISTEN``, the ping) go through
``_execute``, which waits with a deadline: a dead network cannot hang them.
Notifications that arrive while a statement runs stay parsed in libpq until
the loop takes them, in order, with the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import Notify, errors, pq, sql

from ._backoff import Backoff
from ._dispatch import Delivery, InlineDispatcher, PoolDispatcher
from ._sequencing import OrderBy
from .errors import CallbackNotRegistered, ListenerStopped, ReconnectFailed
from .hookspecs import Callback
from .plugins import PluginHost

logger = logging.getLogger("classic.pg.listener")

ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]

_tuple_new = tuple.__new__
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


@dataclass
class Settings:
    """The constructor's arguments, checked by the facade."""

    max_workers: int | None
    ping_period: float
    ping_timeout: float
    max_backlog: int
    reconnect_delay: float
    max_reconnect_delay: float
    max_reconnect_attempts: int | None
    healthy_after: float
    order_by: OrderBy = None


@dataclass
class Request:
    """A change to the callbacks, for the serving thread to apply."""

    action: Literal["add", "remove"]
    callback: Callback
    channel: str
    future: Future[None]


class ConnectionLost(Exception):
    """Internal: the connection broke; the loop reconnects."""


class Interrupted(BaseException):
    """Internal: ``stop()`` cut a statement short.

    A ``BaseException``, so that no ``except Exception`` on its way out hands
    it to a future or takes it for a refused statement.
    """


class Waker:
    """A self-pipe: any thread writes a byte to interrupt the serving ``select()``."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # Guards close() against a late wake() writing to a reused descriptor.
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            # A full pipe means the serving thread will wake anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self._write, b"\0")

    def drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)

    # A listener that never ran never reaches close(): don't leak the pipe.
    __del__ = close


class Server:
    """Serves one listener: connect, LISTEN, read, dispatch, ping, reconnect."""

    def __init__(
        self,
        listener: Any,
        factory: ConnectionFactory,
        settings: Settings,
        host: PluginHost,
        on_reconnect: Callable[[], object] | None,
        name: str,
    ):
        self._listener = listener
        self._factory = factory
        self._settings = settings
        self._host = host
        self._on_reconnect = on_reconnect
        self._name = name
        self._requests: deque[Request] = deque()
        self._lock = threading.Lock()
        self._waker = Waker()
        self._stopping = False
        self._finished = False
        self._registry: dict[str, tuple[Callback, ...]] = {}
        self._conn: psycopg.Connection[Any] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._encoding = "utf-8"
        self.thread_ident: int | None = None
        self.backend_pid: int | None = None
        self.reconnects = 0
        if settings.max_workers == 0:
            self._dispatcher: InlineDispatcher | PoolDispatcher = InlineDispatcher(
                self._callback_done
            )
        else:
            self._dispatcher = PoolDispatcher(
                settings.max_workers,
                settings.max_backlog,
                self._callback_done,
                self._waker.wake,
                thread_name_prefix=f"{name}-callback",
                order_by=settings.order_by,
            )

    # -- requests from any thread -------------------------------------------

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._finished:
                request.future.set_exception(
                    ListenerStopped("the listener has stopped: nothing was changed")
                )
                return
            self._requests.append(request)
        self._waker.wake()

    def stop(self) -> None:
        self._stopping = True
        self._waker.wake()

    @property
    def backlog(self) -> int:
        return self._dispatcher.backlog

    @property
    def channels(self) -> dict[str, tuple[Callback, ...]]:
        return dict(self._registry)

    # -- the serving thread --------------------------------------------------

    def serve(self) -> None:
        """Run until ``stop()``; raise what ends it otherwise."""
        self.thread_ident = threading.get_ident()
        error: BaseException | None = None
        self._host.call("listener_started", listener=self._listener)
        try:
            self._serve_forever()
        except Interrupted:
            pass  # stop() was called while a statement waited for the server
        except BaseException as ex:
            error = ex
            raise
        finally:
            self._close()
            self._dispatcher.shutdown()
            self._finish(error)
            self._host.call("listener_stopped", listener=self._listener, error=error)

    def _serve_forever(self) -> None:
        settings = self._settings
        backoff = Backoff(settings.reconnect_delay, settings.max_reconnect_delay)
        connected_before = False
        failures = 0
        while not self._stopping:
            try:
                self._connect()
            except ConnectionLost as ex:
                self._close()
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
                    ex.__cause__ or ex,
                    delay,
                )
                self._sleep(delay)
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
            try:
                self._serve_connection()
            except ConnectionLost as ex:
                error = ex.__cause__ or ex
                logger.warning("connection lost: %s; reconnecting", error)
                self._close()
                self._host.call(
                    "listener_disconnected", listener=self._listener, error=error
                )
                # A connection that dies at once must not make a tight loop:
                # the backoff only starts over after one that held a while.
                if time.monotonic() - since >= settings.healthy_after:
                    backoff.reset()
                self._sleep(backoff.next_delay())

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

    def _sleep(self, delay: float) -> None:
        """Wait before reconnecting; ``stop()`` cuts the wait short."""
        deadline = time.monotonic() + delay
        with selectors.DefaultSelector() as selector:
            selector.register(self._waker, _READ)
            while not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if selector.select(remaining):
                    self._waker.drain()

    def _connect(self) -> None:
        logger.debug("connecting (thread %s)", threading.current_thread().name)
        try:
            conn = self._factory()
        except Exception as ex:
            raise ConnectionLost("the connection factory raised") from ex
        if not isinstance(conn, psycopg.Connection):
            raise TypeError(
                "connection_factory must return a psycopg.Connection,"
                f" got {type(conn).__name__}"
            )
        if not conn.autocommit:
            conn.close()
            raise ValueError(
                "connection_factory returned a connection without autocommit:"
                " open it with psycopg.connect(..., autocommit=True), otherwise"
                " LISTEN only takes effect at commit and notifications wait for"
                " the end of each transaction"
            )
        self._conn = conn
        self._pgconn = conn.pgconn
        self._encoding = conn.info.encoding
        self.backend_pid = conn.info.backend_pid
        try:
            for channel in self._registry:
                self._execute(self._statement("LISTEN", channel))
        except psycopg.Error as ex:
            # Such as "cannot execute LISTEN during recovery" on a standby:
            # retry, with backoff, until a server accepts them again.
            raise ConnectionLost() from ex
        # Changes made before start() or while disconnected, so that the
        # connected hooks see every channel listened to.
        self._apply_requests()
        logger.info(
            "connected (backend pid %d), listening on %d channels",
            self.backend_pid,
            len(self._registry),
        )

    def _close(self) -> None:
        conn, self._conn, self._pgconn = self._conn, None, None
        self.backend_pid = None
        if conn is not None:
            conn.close()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._finished = True
            pending, self._requests = self._requests, deque()
        for request in pending:
            if not isinstance(error, Exception):  # stop(), or KeyboardInterrupt
                request.future.set_exception(
                    ListenerStopped("the listener stopped before applying this change")
                )
            else:
                request.future.set_exception(error)
        self._waker.close()

    def _serve_connection(self) -> None:
        """Read, dispatch and ping until ``stop()`` or a lost connection."""
        pgconn = self._pgconn
        assert pgconn is not None
        ping_period = self._settings.ping_period
        dispatcher = self._dispatcher
        with selectors.DefaultSelector() as selector:
            selector.register(self._waker, _READ)
            selector.register(pgconn.socket, _READ)
            reading = True
            last_activity = time.monotonic()
            while True:
                if self._requests:
                    self._apply_requests()
                if self._stopping:
                    return
                # Take what libpq has parsed already (statements and earlier
                # reads leave notifications there) before sleeping.
                if not self._take_notifications():
                    if dispatcher.room() > 0:
                        continue
                    # The backlog is full: stop reading, let the server buffer,
                    # and sleep until a worker has drained it to half.
                    if reading:
                        selector.unregister(pgconn.socket)
                        reading = False
                    selector.select()
                    self._waker.drain()
                    last_activity = time.monotonic()
                    continue
                if not reading:
                    selector.register(pgconn.socket, _READ)
                    reading = True

                timeout = None
                if ping_period:
                    timeout = last_activity + ping_period - time.monotonic()
                    if timeout <= 0:
                        self._ping()
                        last_activity = time.monotonic()
                        continue
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._waker:
                        self._waker.drain()
                        continue
                    try:
                        pgconn.consume_input()
                    except psycopg.OperationalError as ex:
                        raise ConnectionLost() from ex
                    if pgconn.status != pq.ConnStatus.OK:
                        raise ConnectionLost() from psycopg.OperationalError(
                            pgconn.get_error_message() or "the connection was closed"
                        )
                    last_activity = time.monotonic()

    def _take_notifications(self) -> bool:
        """Hand parsed notifications over.

        ``False`` when the backlog filled before libpq ran out of them.
        """
        pgconn = self._pgconn
        assert pgconn is not None
        room = self._dispatcher.room()
        if room <= 0:
            return False
        encoding = self._encoding
        registry = self._registry
        on_notification = self._host.caller("listener_notification")
        listener = self._listener
        batch: list[Delivery] = []
        next_notify = pgconn.notifies
        while True:
            pgnotify = next_notify()
            if pgnotify is None:
                break
            # tuple.__new__, as namedtuple's own _make() does, skips the
            # Python-level Notify.__new__: 17% of a drain in the profile.
            notify: Notify = _tuple_new(
                Notify,
                (
                    pgnotify.relname.decode(encoding),
                    pgnotify.extra.decode(encoding),
                    pgnotify.be_pid,
                ),
            )
            if on_notification is not None:
                on_notification(listener=listener, notify=notify)
            callbacks = registry.get(notify.channel)
            if callbacks:
                batch.append((callbacks, notify))
                if len(batch) >= room:
                    break
        if batch:
            self._dispatcher.dispatch(batch)
        return len(batch) < room

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
                callback=callback,
                notify=notify,
                duration=duration,
                error=error,
            )

        return done

    # -- statements ------------------------------------------------------------

    def _statement(self, verb: str, channel: str) -> bytes:
        assert self._conn is not None
        # Always an identifier, never text: MixedCase, spaces and quotes survive.
        return (
            sql.SQL(verb + " {}").format(sql.Identifier(channel)).as_bytes(self._conn)
        )

    def _apply_requests(self) -> None:
        while self._requests:
            request = self._requests.popleft()
            future = request.future
            # A request put back after a lost connection is running already.
            if not (future.running() or future.set_running_or_notify_cancel()):
                continue
            try:
                self._apply(request)
            except ConnectionLost:
                if request.action == "add":
                    # LISTEN is sent again, and the future answered, on reconnect.
                    self._requests.appendleft(request)
                else:
                    future.set_result(None)  # the channel is forgotten already
                raise
            except Interrupted:
                self._requests.appendleft(request)  # failed by _finish()
                raise
            except Exception as ex:
                request.future.set_exception(ex)
            else:
                request.future.set_result(None)

    def _apply(self, request: Request) -> None:
        channel, callback = request.channel, request.callback
        callbacks = self._registry.get(channel, ())
        if request.action == "add":
            if callback in callbacks:
                return
            if not callbacks:
                self._execute(self._statement("LISTEN", channel))
            self._registry[channel] = (*callbacks, callback)
            return
        if callback not in callbacks:
            raise CallbackNotRegistered(
                f"{callback!r} is not registered on channel {channel!r}"
            )
        index = callbacks.index(callback)
        remaining = callbacks[:index] + callbacks[index + 1 :]
        if remaining:
            self._registry[channel] = remaining
            return
        # Forget the channel first: if UNLISTEN fails with the connection, the
        # next connection simply does not LISTEN to it.
        del self._registry[channel]
        self._execute(self._statement("UNLISTEN", channel))

    def _ping(self) -> None:
        started = time.perf_counter()
        try:
            self._execute(b"SELECT 1")
        except ConnectionLost as ex:
            self._host.call(
                "listener_ping",
                listener=self._listener,
                duration=time.perf_counter() - started,
                error=ex.__cause__ or ex,
            )
            raise
        self._host.call(
            "listener_ping",
            listener=self._listener,
            duration=time.perf_counter() - started,
            error=None,
        )

    def _execute(self, query: bytes) -> None:
        """Run one statement, bounded by ``ping_timeout``.

        A statement the server refuses raises its psycopg error; a broken or
        silent connection raises ``ConnectionLost``.
        """
        pgconn = self._pgconn
        assert pgconn is not None
        deadline = time.monotonic() + self._settings.ping_timeout
        error: psycopg.Error | None = None
        try:
            pgconn.send_query(query)
            while pgconn.flush():
                self._wait_socket(_READ | _WRITE, deadline)
                pgconn.consume_input()
            while True:
                while pgconn.is_busy():
                    self._wait_socket(_READ, deadline)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
                    error = errors.error_from_result(result, encoding=self._encoding)
        except (psycopg.OperationalError, TimeoutError) as ex:
            raise ConnectionLost() from ex
        if pgconn.status != pq.ConnStatus.OK:
            raise ConnectionLost() from (
                error or psycopg.OperationalError("the connection was closed")
            )
        if error is not None:
            raise error

    def _wait_socket(self, events: int, deadline: float) -> None:
        pgconn = self._pgconn
        assert pgconn is not None
        # The waker too: stop() must not wait for a silent server's deadline.
        with selectors.DefaultSelector() as selector:
            selector.register(pgconn.socket, events)
            selector.register(self._waker, _READ)
            while (remaining := deadline - time.monotonic()) > 0:
                ready = selector.select(remaining)
                if self._stopping:
                    raise Interrupted
                for key, _ in ready:
                    if key.fileobj is self._waker:
                        self._waker.drain()  # the loop looks at requests later
                    else:
                        return
        raise TimeoutError(
            f"the server did not answer within {self._settings.ping_timeout} s"
        )

"""``Listener``: the serving loop in a thread, callbacks in a pool or inline.

The loop and everything it decides live in ``_core``; this module drives it
with ``select()`` (``_waiting.run``) in the caller's thread (``run()``) or a
thread of its own (``start()``), like ``threading.Thread``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import psycopg
from psycopg import Notify

from . import _waiting
from ._dispatch import InlineDispatcher, PoolDispatcher
from ._facade import ListenerBase, ListenerOptions, check_connection
from ._sequencing import OrderBy, key_function
from .hookspecs import CatchUp

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # a dependency on 3.10 only
    from typing_extensions import Unpack

logger = logging.getLogger("classic.pg.listener")


ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]


class _WaitGuard(list[Any]):
    """``Future._waiters`` that refuse a waiter from the serving thread.

    ``concurrent.futures.wait()`` and ``as_completed()`` install a waiter on
    each future rather than calling ``result()``: this is where they can be
    stopped from blocking the one thread that would resolve the future.
    """

    def __init__(self, future: _RequestFuture):
        super().__init__()
        self._future = future

    def append(self, waiter: Any) -> None:
        self._future._refuse_to_block()
        super().append(waiter)


class _RequestFuture(Future[None]):
    """A future that refuses to deadlock its own serving thread.

    With ``max_workers=0`` callbacks (and always hooks) run in the serving
    thread, which is the only thread that can resolve this future: any
    blocking wait on it there (``result()``, ``exception()``,
    ``concurrent.futures.wait()``) would block forever, so it raises instead.
    """

    def __init__(self, listener: Listener):
        super().__init__()
        self._listener = listener
        self._waiters = _WaitGuard(self)

    def _refuse_to_block(self) -> None:
        if not self.done() and threading.get_ident() == self._listener._serving:
            raise RuntimeError(
                "waiting on this future from the serving thread (an inline"
                " callback or a hook) would deadlock: it resolves only after"
                " the callback returns; use add_done_callback() instead"
            )

    def result(self, timeout: float | None = None) -> None:
        self._refuse_to_block()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_to_block()
        return super().exception(timeout)


class Listener(ListenerBase):
    """Calls your callbacks with the notifications PostgreSQL sends on channels.

    :param connection_factory: called without arguments, in the serving
        thread, for every (re)connection; must return a
        ``psycopg.Connection`` opened with ``autocommit=True``.
    :param max_workers: how many pool threads may run callbacks (``None``:
        ``min(32, os.cpu_count() + 4)``, as ``ThreadPoolExecutor``); threads
        start as work comes; ``0`` runs callbacks inline, in the serving
        thread.
    :param ping_period: seconds without notifications after which the
        connection is checked with a cheap query; ``0`` never checks.
    :param ping_timeout: seconds of silence from the server, while it owes
        an answer to a ping, a ``LISTEN`` or an ``UNLISTEN``, after which the
        connection is held for lost (a half-open connection would otherwise
        hang it for the kernel's TCP timeout).
    :param max_backlog: how many notifications may wait for a pool worker;
        beyond it the listener stops reading and the server buffers.
    :param reconnect_delay: first delay before reconnecting, doubled per
        failed attempt up to ``max_reconnect_delay``.
    :param max_reconnect_attempts: consecutive failed connection attempts
        after which ``run()`` ends with ``ReconnectFailed``; ``None``: never.
    :param on_reconnect: called without arguments, in the serving thread,
        after each reconnection, once every channel is listened to again:
        notifications sent while disconnected are lost, so catch up here
        (or per channel, with ``add_callback(catch_up=...)``).
    :param plugins: plugin objects to register besides the discovered ones.
    :param autoload_plugins: load the ``classic_pg_listener`` entry points;
        ``None`` (default) unless ``CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD``
        is set.
    :param blocked_plugins: plugin names never to register.
    :param name: names the serving thread and the pool's threads.
    :param order_by: the pool's order: ``None``, any order; ``"channel"``,
        in order per channel; a callable ``key(notify) -> Hashable``, in
        order per key: for two notifications of one key, every callback of
        the first has returned before any of the second starts. Different
        keys run side by side. Inline (``max_workers=0``) everything is in
        order anyway.
    :param tcp_keepalive: when the DSN sets no keepalive option, turn on TCP
        keepalives and ``TCP_USER_TIMEOUT`` on the connection's socket, so
        that a silent server is detected within about a minute even with
        ``ping_period=0``; ``False`` leaves the socket as libpq made it.
    :param exclusive: a name: callbacks run only while this listener's
        session holds a PostgreSQL advisory lock of that name, so that of
        several processes listening with the same name, on any machines, one
        runs the callbacks and the others stand by, connected and listening,
        trying the lock every ``ping_period``. The one that takes it runs
        every channel's catch-ups first. See ``is_active`` and the
        ``listener_active_changed`` hook.
    :param max_connection_age: seconds (less up to 10% of jitter) after
        which the connection is replaced, without a gap, as ``rotate()``
        does: for proxies and services that cut connections after a maximum
        lifetime, credentials that rotate, backends that grow.
    """

    def __init__(
        self,
        connection_factory: ConnectionFactory,
        max_workers: int | None = None,
        ping_period: float = 60,
        *,
        order_by: OrderBy = None,
        **options: Unpack[ListenerOptions],
    ):
        if max_workers is not None and (
            not isinstance(max_workers, int) or max_workers < 0
        ):
            raise ValueError(f"max_workers must be None or >= 0, got {max_workers!r}")
        self._max_workers = max_workers
        key_function(order_by)  # checks order_by
        self._order_by = order_by
        self._lock = threading.Lock()
        self._started = False
        self._serving: int | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        super().__init__(connection_factory, ping_period, **options)

    def _make_dispatcher(
        self, wake: Callable[[], None], on_done: Callable[[], Any]
    ) -> InlineDispatcher | PoolDispatcher:
        if self._max_workers == 0:
            return InlineDispatcher(on_done)
        return PoolDispatcher(
            self._max_workers,
            self._settings.max_backlog,
            on_done,
            wake,
            thread_name_prefix=f"{self.name}-callback",
            order_by=self._order_by,
        )

    def _check_connection(self, conn: object) -> psycopg.Connection[Any]:
        hint = ""
        if isinstance(conn, psycopg.AsyncConnection):
            hint = ": use AsyncListener for an AsyncConnection"
        result: psycopg.Connection[Any] = check_connection(
            conn, psycopg.Connection, hint
        )
        return result

    def _new_future(self) -> Future[None]:
        return _RequestFuture(self)

    # -- callbacks -------------------------------------------------------------

    def add_callback(
        self,
        callback: Callable[[Notify], object],
        channel: str,
        *,
        catch_up: CatchUp | None = None,
        decode: Callable[[str], Any] | None = None,
    ) -> Future[None]:
        """Call ``callback(notify)`` for every notification on ``channel``.

        Returns at once. The serving thread sends ``LISTEN`` when the channel
        is new, then resolves the future with ``None``; if the server refused
        it, the future raises the psycopg error and nothing was registered.
        Before ``run()``/``start()``, or while disconnected, the change waits
        for the connection. A callback already registered on the channel is
        not added twice.

        :param catch_up: ``catch_up(channel)`` is called once the server has
            acknowledged ``LISTEN``: when this registration is first applied,
            and again after every reconnection and every re-``LISTEN``. No
            notification of the channel read after that ``LISTEN`` reaches
            ``callback`` before ``catch_up`` has returned, so a catch-up that
            reads "everything newer than what I processed" may see an event
            twice, never miss one. It runs in a pool worker (inline with
            ``max_workers=0``); one that raises is logged and delivery goes on.
            The future does not wait for it.
        :param decode: applied to the payload before ``callback`` sees it, in
            the thread that runs the callback (``json.loads``, a pydantic
            model's ``model_validate_json``); the callback gets the
            ``Notify`` with the decoded payload. A payload ``decode`` refuses
            is logged as a poison message and skipped.
        """
        return self._request("add", callback, channel, catch_up, decode)

    def remove_callback(
        self, callback: Callable[[Notify], object], channel: str
    ) -> Future[None]:
        """Stop calling ``callback`` for ``channel``.

        Once the future resolves, no notification read afterwards goes to the
        callback (one already handed to the pool may still run). The last
        callback of a channel takes ``UNLISTEN`` with it; if the server
        refuses it, the future raises and nothing changed. The future raises
        ``CallbackNotRegistered`` if the callback was not registered there.
        """
        return self._request("remove", callback, channel)

    def unregister_plugin(self, name: str) -> Future[None]:
        """Unregister a plugin and remove the callbacks it registered.

        Its hooks stop at once; the returned future resolves once its
        callbacks are removed, as ``remove_callback``'s do.
        """
        return self._host.unregister(name)

    def rotate(self) -> Future[None]:
        """Replace the connection by a new one, without a gap.

        A new connection is opened through the factory and listens to every
        channel; a marker notification then divides the stream between the
        two sessions, so that no notification is lost or delivered twice,
        and the old connection is closed. Not a reconnection: no catch-up, no
        reconnect signal, ``reconnects`` unchanged; ``backend_pid`` changes.
        The future resolves once the new connection serves; if it could not
        be opened, the old one goes on and the future raises.
        """
        return self._core.rotate(self._new_future())

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Serve in the calling thread until ``stop()``.

        Raises what ended the listener otherwise: ``ReconnectFailed``,
        ``SessionNotKept``, or a factory returning a connection it cannot serve.
        """
        self._mark_started()
        self._serve()
        if self._exception is not None:
            raise self._exception

    def start(self) -> None:
        """Serve in a new thread; return at once, like ``threading.Thread.start``."""
        self._mark_started()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def _mark_started(self) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError("a listener can only be started once")
            self._started = True

    def _serve(self) -> None:
        self._serving = threading.get_ident()
        try:
            _waiting.run(self._core.serve(), self._core.waker.fileno(), self._factory)
        except BaseException as ex:
            self._exception = ex
            if threading.current_thread() is self._thread:
                logger.error("listener %s ended", self.name, exc_info=ex)
        finally:
            self._serving = None
            self._done.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the listener has stopped and every accepted callback ran.

        Like ``threading.Thread.join``: returns after ``timeout`` seconds
        even if it has not; raises ``RuntimeError`` before ``start()``/``run()``.
        """
        if not self._started:
            raise RuntimeError("cannot join a listener that was not started")
        thread = self._thread
        # The thread itself ends a moment after it is done: wait for it too,
        # so that no thread of the listener outlives join().
        if (
            self._done.wait(timeout)
            and thread is not None
            and thread is not threading.current_thread()
        ):
            thread.join(timeout)

    def is_alive(self) -> bool:
        """Whether the listener was started and has not finished stopping."""
        return self._started and not self._done.is_set()

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

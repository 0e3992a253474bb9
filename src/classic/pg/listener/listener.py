"""The ``Listener`` facade: checks arguments, runs the serving thread, makes futures.

Everything here runs in the caller's thread and never touches the
connection: it validates what it is given, then queues it for the serving
thread (``_serving.Server``), which answers through the returned future.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from psycopg import Notify

from ._backoff import Backoff
from ._sequencing import OrderBy, key_function
from ._serving import ConnectionFactory, Request, Server, Settings
from .errors import InvalidChannel, InvalidChannelType
from .hookspecs import Callback
from .plugins import PluginHost, PluginInfo, autoload_enabled

logger = logging.getLogger("classic.pg.listener")

MAX_CHANNEL_BYTES = 63
"""PostgreSQL truncates longer identifiers (NAMEDATALEN - 1), so a longer
channel would be listened to under another name and never match."""

_counter = itertools.count(1)


def check_channel(channel: object) -> str:
    """Refuse, at the caller, a channel PostgreSQL would not deliver as given."""
    if not isinstance(channel, str):
        raise InvalidChannelType(
            f"channel must be a non-empty str, got {type(channel).__name__}"
        )
    if not channel:
        raise InvalidChannel("channel must be a non-empty str, got ''")
    if "\0" in channel:
        raise InvalidChannel(f"channel must not contain NUL characters: {channel!r}")
    size = len(channel.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            f"channel {channel!r} is {size} bytes long: PostgreSQL allows at most"
            f" {MAX_CHANNEL_BYTES} and would truncate it"
        )
    return channel


def _check_callback(callback: object) -> None:
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")


class _RequestFuture(Future[None]):
    """A future that refuses to deadlock its own serving thread.

    With ``max_workers=0`` callbacks run in the serving thread, which is the
    only thread that can resolve this future: waiting on it there would
    block forever, so it raises instead.
    """

    def __init__(self, server: Server):
        super().__init__()
        self._server = server

    def result(self, timeout: float | None = None) -> None:
        if not self.done() and threading.get_ident() == self._server.thread_ident:
            raise RuntimeError(
                "waiting on this future from the serving thread (an inline"
                " callback or a hook) would deadlock: it resolves only after"
                " the callback returns"
            )
        return super().result(timeout)


class Listener:
    """Calls your callbacks with the notifications PostgreSQL sends on channels.

    :param connection_factory: called without arguments, in the serving
        thread, for every (re)connection; must return a
        ``psycopg.Connection`` opened with ``autocommit=True``.
    :param max_workers: how many threads of the pool may run callbacks
        (``None``: ``min(32, os.cpu_count() + 4)``, as ``ThreadPoolExecutor``);
        threads start as work comes; ``0`` runs callbacks inline, in the
        serving thread.
    :param ping_period: seconds without notifications after which the
        connection is checked with a cheap query; ``0`` never checks.
    :param ping_timeout: seconds the ping, and every ``LISTEN``/``UNLISTEN``,
        may take before the connection is held for lost (a half-open
        connection would otherwise hang it for the kernel's TCP timeout).
    :param max_backlog: how many notifications may wait for a pool worker;
        beyond it the listener stops reading and the server buffers.
    :param reconnect_delay: first delay before reconnecting, doubled per
        failed attempt up to ``max_reconnect_delay``.
    :param max_reconnect_attempts: consecutive failed connection attempts
        after which ``run()`` ends with ``ReconnectFailed``; ``None``: never.
    :param on_reconnect: called without arguments, in the serving thread,
        after each reconnection, once every channel is listened to again:
        notifications sent while disconnected are lost, so catch up here.
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
    """

    def __init__(
        self,
        connection_factory: ConnectionFactory,
        max_workers: int | None = None,
        ping_period: float = 60,
        *,
        ping_timeout: float = 5.0,
        max_backlog: int = 10_000,
        reconnect_delay: float = Backoff.INITIAL_DELAY,
        max_reconnect_delay: float = Backoff.MAX_DELAY,
        max_reconnect_attempts: int | None = None,
        on_reconnect: Callable[[], object] | None = None,
        plugins: Iterable[object] = (),
        autoload_plugins: bool | None = None,
        blocked_plugins: Iterable[str] = (),
        name: str | None = None,
        order_by: OrderBy = None,
    ):
        if not callable(connection_factory):
            raise TypeError(
                f"connection_factory must be callable, got {connection_factory!r}"
            )
        if max_workers is not None and (
            not isinstance(max_workers, int) or max_workers < 0
        ):
            raise ValueError(f"max_workers must be None or >= 0, got {max_workers!r}")
        if ping_period < 0:
            raise ValueError(f"ping_period must be >= 0, got {ping_period!r}")
        if ping_timeout <= 0:
            raise ValueError(f"ping_timeout must be > 0, got {ping_timeout!r}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog!r}")
        if max_reconnect_attempts is not None and max_reconnect_attempts < 1:
            raise ValueError(
                "max_reconnect_attempts must be None or >= 1,"
                f" got {max_reconnect_attempts!r}"
            )
        if on_reconnect is not None and not callable(on_reconnect):
            raise TypeError(f"on_reconnect must be callable, got {on_reconnect!r}")
        Backoff(reconnect_delay, max_reconnect_delay)  # checks the two delays
        key_function(order_by)  # checks order_by

        self.name = name or f"pg-listener-{next(_counter)}"
        self._host = PluginHost(self, blocked_plugins)
        self._server = Server(
            self,
            connection_factory,
            Settings(
                max_workers=max_workers,
                ping_period=ping_period,
                ping_timeout=ping_timeout,
                max_backlog=max_backlog,
                reconnect_delay=reconnect_delay,
                max_reconnect_delay=max_reconnect_delay,
                max_reconnect_attempts=max_reconnect_attempts,
                healthy_after=max(5.0, reconnect_delay),
                order_by=order_by,
            ),
            self._host,
            on_reconnect,
            self.name,
        )
        self._lock = threading.Lock()
        self._started = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._exception: BaseException | None = None

        # Plugins come last: their callbacks go through add_callback.
        if autoload_enabled(autoload_plugins):
            self._host.load_entry_points()
        for plugin in plugins:
            self._host.register(plugin)

    def __repr__(self) -> str:
        if self._done.is_set():
            state = "stopped"
        elif self._started:
            state = "connected" if self.backend_pid else "disconnected"
        else:
            state = "initial"
        return f"<Listener {self.name} {state}>"

    # -- callbacks -------------------------------------------------------------

    def add_callback(
        self, callback: Callable[[Notify], object], channel: str
    ) -> Future[None]:
        """Call ``callback(notify)`` for every notification on ``channel``.

        Returns at once. The serving thread sends ``LISTEN`` when the channel
        is new, then resolves the future with ``None``; if the server refused
        it, the future raises the psycopg error and nothing was registered.
        Before ``run()``/``start()``, or while disconnected, the change waits
        for the connection. A callback already registered on the channel is
        not added twice.
        """
        return self._request("add", callback, channel)

    def remove_callback(
        self, callback: Callable[[Notify], object], channel: str
    ) -> Future[None]:
        """Stop calling ``callback`` for ``channel``.

        Once the future resolves, no notification read afterwards goes to the
        callback (one already handed to the pool may still run). The last
        callback of a channel takes ``UNLISTEN`` with it. The future raises
        ``CallbackNotRegistered`` if the callback was not registered there.
        """
        return self._request("remove", callback, channel)

    def _request(self, action: Any, callback: Callback, channel: str) -> Future[None]:
        _check_callback(callback)
        check_channel(channel)
        future = _RequestFuture(self._server)
        self._server.submit(Request(action, callback, channel, future))
        return future

    # -- plugins ---------------------------------------------------------------

    def register_plugin(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object (usually a module) with ``@hookimpl`` functions.

        Its ``listener_register_callbacks`` runs at once. Returns the name it
        was registered under, or ``None`` if that name is blocked. Raises
        ``PluginError`` when the plugin is invalid.
        """
        return self._host.register(plugin, name)

    def unregister_plugin(self, name: str) -> Future[None]:
        """Unregister a plugin and remove the callbacks it registered.

        Its hooks stop at once; the returned future resolves once its
        callbacks are removed, as ``remove_callback``'s do.
        """
        return self._host.unregister(name)

    @property
    def plugins(self) -> list[PluginInfo]:
        """The registered plugins: name, distribution, version, hooks, channels."""
        return self._host.infos()

    # -- state -------------------------------------------------------------------

    @property
    def channels(self) -> dict[str, tuple[Callable[[Notify], object], ...]]:
        """The channels listened to and their callbacks, as last applied."""
        return self._server.channels

    @property
    def backend_pid(self) -> int | None:
        """The server process serving the connection; ``None`` while disconnected."""
        return self._server.backend_pid

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established after a loss.

        Each reconnection may have missed notifications: a value that grew
        since you last looked means a catch-up is due.
        """
        return self._server.reconnects

    @property
    def backlog(self) -> int:
        """Notifications read but not yet through their callbacks (pool mode)."""
        return self._server.backlog

    @property
    def exception(self) -> BaseException | None:
        """What ended ``run()``, if not ``stop()``; read it after ``join()``."""
        return self._exception

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Serve in the calling thread until ``stop()``.

        Raises what ended the listener otherwise: ``ReconnectFailed``, or a
        factory returning a connection without autocommit.
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
        try:
            self._server.serve()
        except BaseException as ex:
            self._exception = ex
            if threading.current_thread() is self._thread:
                logger.error("listener %s ended", self.name, exc_info=ex)
        finally:
            self._done.set()

    def stop(self) -> None:
        """Ask the serving thread to stop; return at once.

        Idempotent and callable from any thread, a callback included. Once
        stopped, a listener stays stopped: ``run()`` called later returns at
        once.
        """
        self._server.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the listener has stopped and every accepted callback ran.

        Like ``threading.Thread.join``: returns after ``timeout`` seconds
        even if it has not; raises ``RuntimeError`` before ``start()``/``run()``.
        """
        if not self._started:
            raise RuntimeError("cannot join a listener that was not started")
        self._done.wait(timeout)

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

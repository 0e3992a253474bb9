"""What ``Listener`` and ``AsyncListener`` share: argument checks, requests, state.

Everything here runs in the caller's thread and never touches the
connection: it validates what it is given, then queues it for the serving
loop (``_core.Core``), which answers through a ``concurrent.futures.Future``.
Each listener only adds how it runs the loop, how callbacks are dispatched,
and which kind of future it hands back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, Literal, TypedDict

from psycopg import Notify

from ._backoff import Backoff
from ._core import Core, Request, Settings, channel_too_long
from ._stats import ListenerStats
from .errors import InvalidChannel, InvalidChannelType
from .hookspecs import Callback, CatchUp
from .plugins import PluginHost, PluginInfo, autoload_enabled

_counter = itertools.count(1)


def check_channel(channel: object, codec: str | None = None) -> str:
    """Refuse, at the caller, a channel PostgreSQL would not deliver as given.

    ``codec`` is the database's encoding once a connection told it: the
    server truncates identifiers by bytes in that encoding. Before that, the
    length in characters is all that can be known; the serving loop measures
    bytes when it connects.
    """
    if not isinstance(channel, str):
        raise InvalidChannelType(
            f"channel must be a non-empty str, got {type(channel).__name__}"
        )
    if not channel:
        raise InvalidChannel("channel must be a non-empty str, got ''")
    if "\0" in channel:
        raise InvalidChannel(f"channel must not contain NUL characters: {channel!r}")
    if error := channel_too_long(channel, codec):
        raise error
    return channel


def check_callable(value: object, what: str, *, allow_async: bool) -> None:
    if not callable(value):
        raise TypeError(f"{what} must be callable, got {value!r}")
    if not allow_async and _is_coroutine_function(value):
        raise TypeError(
            f"{what} {value!r} is a coroutine function: a threaded Listener would"
            " never await it; use AsyncListener"
        )


def check_hashable(callback: object) -> None:
    try:
        hash(callback)
    except TypeError:
        raise TypeError(
            f"callback {callback!r} must be hashable: a listener tells callbacks"
            " apart by equality and hash, as a dict does (for a dataclass,"
            " @dataclass(eq=False) or frozen=True)"
        ) from None


def _is_coroutine_function(value: object) -> bool:
    import inspect

    return inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
        getattr(value, "__call__", None)  # noqa: B004 - a callable object's method
    )


def close_quietly(conn: object) -> None:
    """Close what a factory returned, without awaiting anything."""
    pgconn = getattr(conn, "pgconn", None)
    if pgconn is not None:
        pgconn.finish()
    elif callable(close := getattr(conn, "close", None)):
        close()


def check_connection(conn: object, expected: type[Any], hint: str) -> Any:
    """The factory's connection, refused (and closed) unless the loop can serve it."""
    if not isinstance(conn, expected):
        close_quietly(conn)
        raise TypeError(
            f"connection_factory must return a {expected.__module__}."
            f"{expected.__qualname__}, got {type(conn).__name__}{hint}"
        )
    if not conn.autocommit:
        close_quietly(conn)
        raise ValueError(
            "connection_factory returned a connection without autocommit:"
            " open it with autocommit=True, otherwise LISTEN only takes effect"
            " at commit and notifications wait for the end of each transaction"
        )
    # psycopg keeps them privately; the listener reads notifications itself,
    # so handlers added with add_notify_handler() would never be called.
    if getattr(conn, "_notify_handlers", None):
        close_quietly(conn)
        raise ValueError(
            "connection_factory returned a connection with notify handlers"
            " (add_notify_handler()): the listener reads the notifications"
            " itself and would never call them; register them with"
            " add_callback() instead"
        )
    return conn


class ListenerOptions(TypedDict, total=False):
    """The keyword arguments both listeners take; see ``Listener``."""

    ping_timeout: float
    max_backlog: int
    reconnect_delay: float
    max_reconnect_delay: float
    max_reconnect_attempts: int | None
    on_reconnect: Callable[[], object] | None
    plugins: Iterable[object]
    autoload_plugins: bool | None
    blocked_plugins: Iterable[str]
    name: str | None
    exclusive: str | None
    max_connection_age: float | None
    tcp_keepalive: bool


class ListenerBase:
    """The shared half of both listeners; see ``Listener`` for the parameters."""

    _allow_async = False

    def __init__(
        self,
        connection_factory: Callable[[], Any],
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
        exclusive: str | None = None,
        max_connection_age: float | None = None,
        tcp_keepalive: bool = True,
    ):
        if not callable(connection_factory):
            raise TypeError(
                f"connection_factory must be callable, got {connection_factory!r}"
            )
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
        if on_reconnect is not None:
            check_callable(on_reconnect, "on_reconnect", allow_async=False)
        if exclusive is not None:
            if not isinstance(exclusive, str) or not exclusive:
                raise ValueError(
                    f"exclusive must be a non-empty str, got {exclusive!r}"
                )
            if not ping_period:
                raise ValueError(
                    "exclusive needs a ping_period: standbys try the lock every"
                    " ping_period, and ping_period=0 would never take over"
                )
        if max_connection_age is not None and max_connection_age <= 0:
            raise ValueError(
                f"max_connection_age must be None or > 0, got {max_connection_age!r}"
            )
        Backoff(reconnect_delay, max_reconnect_delay)  # checks the two delays

        self.name = name or f"pg-listener-{next(_counter)}"
        self._factory = connection_factory
        self._settings = Settings(
            ping_period=ping_period,
            ping_timeout=ping_timeout,
            max_backlog=max_backlog,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            max_reconnect_attempts=max_reconnect_attempts,
            healthy_after=max(5.0, reconnect_delay),
            exclusive=exclusive,
            max_connection_age=max_connection_age,
            tcp_keepalive=tcp_keepalive,
        )
        self._host = PluginHost(self, self, blocked_plugins)
        self._core = Core(
            self,
            self._settings,
            self._host,
            on_reconnect,
            self._make_dispatcher,
            self._check_connection,
        )
        self._exception: BaseException | None = None

        # Plugins come last: their callbacks go through add_callback.
        if autoload_enabled(autoload_plugins):
            self._host.load_entry_points()
        for plugin in plugins:
            self._host.register(plugin)

    def __repr__(self) -> str:
        if not self._started:
            state = "initial"
        elif not self.is_alive():
            state = "stopped"
        else:
            state = "connected" if self.backend_pid else "disconnected"
        return f"<{type(self).__name__} {self.name} {state}>"

    # -- what each listener provides ------------------------------------------------

    def _make_dispatcher(
        self, wake: Callable[[], None], on_done: Callable[[], Any]
    ) -> Any:
        raise NotImplementedError

    def _check_connection(self, conn: object) -> Any:
        raise NotImplementedError

    def _new_future(self) -> Future[None]:
        """The future the core resolves for one request (``Requests`` protocol)."""
        return Future()

    # -- requests ------------------------------------------------------------------

    def _request(
        self,
        action: Literal["add", "remove"],
        callback: Callback,
        channel: str,
        catch_up: CatchUp | None = None,
        decode: Callable[[str], Any] | None = None,
    ) -> Future[None]:
        check_callable(callback, "callback", allow_async=self._allow_async)
        check_hashable(callback)
        check_channel(channel, self._core.server_codec)
        if catch_up is not None:
            check_callable(catch_up, "catch_up", allow_async=self._allow_async)
        if decode is not None:
            check_callable(decode, "decode", allow_async=False)
        future = self._new_future()
        self._core.submit(Request(action, callback, channel, future, catch_up, decode))
        return future

    def _add(self, callback: Callback, channel: str) -> Future[None]:
        """``add_callback`` as a ``concurrent.futures.Future`` (for plugins)."""
        return self._request("add", callback, channel)

    def _remove(self, callback: Callback, channel: str) -> Future[None]:
        """``remove_callback`` as a ``concurrent.futures.Future`` (for plugins)."""
        return self._request("remove", callback, channel)

    # -- plugins -------------------------------------------------------------------

    def register_plugin(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object (usually a module) with ``@hookimpl`` functions.

        Its ``listener_register_callbacks`` runs at once. Returns the name it
        was registered under, or ``None`` if that name is blocked. Raises
        ``PluginError`` when the plugin is invalid.
        """
        return self._host.register(plugin, name)

    @property
    def plugins(self) -> list[PluginInfo]:
        """The registered plugins: name, distribution, version, hooks, channels."""
        return self._host.infos()

    # -- state -----------------------------------------------------------------------

    @property
    def channels(self) -> dict[str, tuple[Callable[[Notify], object], ...]]:
        """The channels listened to and their callbacks, as last applied."""
        return self._core.channels

    @property
    def backend_pid(self) -> int | None:
        """The server process serving the connection; ``None`` while disconnected."""
        return self._core.backend_pid

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established after a loss.

        Each reconnection may have missed notifications: a value that grew
        since you last looked means a catch-up is due.
        """
        return self._core.reconnects

    @property
    def backlog(self) -> int:
        """Notifications read but not yet through their callbacks."""
        return self._core.backlog

    @property
    def exception(self) -> BaseException | None:
        """What ended ``run()``, if not ``stop()``; read it after ``join()``."""
        return self._exception

    def stats(self) -> ListenerStats:
        """A frozen snapshot of the listener's state and counters.

        Cheap enough for every scrape: the counters are kept per batch, and
        this copies them.
        """
        return self._core.stats(self.name)

    @property
    def is_active(self) -> bool:
        """Whether this listener runs callbacks: always, unless ``exclusive``
        is set and another process holds the lock (a standby)."""
        return self._core.active

    def responsive(self, timeout: float = 1.0) -> bool:
        """Whether the serving loop answers within ``timeout`` seconds.

        ``False`` when it has stopped, or is stuck (in a long inline
        callback, a hook, a connection attempt): what a liveness probe asks.
        """
        future = self._core.probe()
        try:
            future.result(timeout)
        except Exception:
            return False
        return True

    _started: bool

    def is_alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the serving loop to stop; return at once.

        Idempotent and callable from any thread, a callback, or a signal
        handler at any point (it takes no lock). Once stopped, a listener
        stays stopped.
        """
        self._core.stop()

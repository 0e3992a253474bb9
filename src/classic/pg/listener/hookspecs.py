"""The hooks a plugin may implement.

A plugin is any object (usually a module) with functions marked
``@hookimpl`` whose names are the names below. It may take only the
arguments it needs, in any order: pluggy passes them by name.

The listener calls the hooks itself, one implementation at a time: an
implementation that raises is logged (logger ``classic.pg.listener``, with
the plugin's name and the traceback) and the next one still runs. No hook
can stop the listener or the delivery of notifications.

Hooks run in the thread named in their docstring. Those that run in the
serving thread hold up the reading of notifications while they run: keep them
short, and hand slow work to a thread of your own. The same plugins serve
``AsyncListener``: there, "the serving thread" is the event loop's, hooks
are called in the loop (plain functions, never awaited), and ``listener``
is the ``AsyncListener``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from psycopg import Connection, Notify

    from .listener import Listener

PROJECT_NAME = "classic_pg_listener"
"""The pluggy project name, and the entry-point group plugins declare."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Callback = Callable[["Notify"], object]
CatchUp = Callable[[str], object]
"""``catch_up(channel)``: reads what the channel's callback may have missed."""
Register = Callable[[Callback, str], "Future[None]"]


@hookspec
def listener_register_callbacks(listener: Listener, register: Register) -> None:
    """Contribute the plugin's callbacks.

    Called once for each plugin, right after the plugin is registered with a
    listener: while the listener is being constructed for plugins found
    through entry points or passed as ``plugins=``, or inside
    ``Listener.register_plugin()``. It runs in the thread that made that call.

    :param listener: the listener the plugin was registered with.
    :param register: ``register(callback, channel)`` adds ``callback`` for
        ``channel`` exactly as ``Listener.add_callback`` does (same checks,
        same future) and records it as the plugin's, so that
        ``Listener.plugins`` lists the channel and ``unregister_plugin``
        removes the callback again.

    The return value is ignored.
    """


@hookspec
def listener_started(listener: Listener) -> None:
    """The listener started serving.

    Called in the serving thread (the caller of ``run()``, or the thread made
    by ``start()``) before the first connection is attempted.

    :param listener: the listener that started.

    The return value is ignored.
    """


@hookspec
def listener_connected(listener: Listener, connection: Connection[Any]) -> None:
    """A connection was opened and every channel is listened to.

    Called in the serving thread after each successful (re)connect, once
    ``LISTEN`` was issued for every channel, those of changes made before
    ``start()`` or while disconnected included (their futures have
    resolved), and before any notification of that connection is
    delivered. Do not run statements on ``connection``: it belongs to the
    serving thread, and a result left on it would confuse the listener.

    :param listener: the listener that connected.
    :param connection: the connection the factory returned.

    The return value is ignored.
    """


@hookspec
def listener_reconnected(listener: Listener, connection: Connection[Any]) -> None:
    """Notifications may have been missed: run your catch-up now.

    PostgreSQL keeps no notification for a session that is not connected.
    Called in the serving thread right after ``listener_connected`` on every
    connection but the first, that is after each connection loss. Every
    channel is listened to again, so a catch-up query started from here (on
    a connection of your own) cannot miss an event that happened since: at
    worst an event is seen both by the query and as a notification.

    :param listener: the listener that reconnected.
    :param connection: the new connection (see ``listener_connected``).

    The return value is ignored.
    """


@hookspec
def listener_disconnected(listener: Listener, error: BaseException) -> None:
    """The connection was lost.

    Called in the serving thread when the connection broke, its backend was
    terminated, a ping failed or timed out, or a ``LISTEN`` could not be sent.
    The listener then reconnects with backoff. Not called when ``stop()``
    closes the connection.

    :param listener: the listener that lost its connection.
    :param error: what broke the connection.

    The return value is ignored.
    """


@hookspec
def listener_ping(
    listener: Listener, duration: float, error: BaseException | None
) -> None:
    """A ping was answered, failed or timed out.

    Called in the serving thread after each ping, which the listener sends
    when no notification arrived for ``ping_period`` seconds. A failed ping
    is followed by ``listener_disconnected``.

    :param listener: the listener that pinged.
    :param duration: seconds from sending the ping to its answer or failure.
    :param error: ``None`` when the server answered, else the error (a
        ``TimeoutError`` when no answer came within ``ping_timeout``).

    The return value is ignored.
    """


@hookspec
def listener_notification(listener: Listener, notify: Notify) -> None:
    """A notification was received, before it is handed to the callbacks.

    Called in the serving thread for every notification, whether or not a
    callback is registered for its channel. It runs on the hot path: the
    listener calls it only when some plugin implements it, and whatever it
    costs is paid for each notification.

    :param listener: the listener that received it.
    :param notify: the notification.

    The return value is ignored.
    """


@hookspec
def listener_callback_done(
    listener: Listener,
    callback: Callback,
    notify: Notify,
    duration: float,
    error: BaseException | None,
) -> None:
    """A callback returned or raised.

    Called in the thread that ran the callback (a pool worker, or the serving
    thread with ``max_workers=0``), right after it, for every callback and
    every notification. Only called when some plugin implements it.

    :param listener: the listener that ran the callback.
    :param callback: the callback, as it was registered.
    :param notify: the notification it was given.
    :param duration: seconds the callback ran.
    :param error: ``None`` when it returned, else the exception it raised
        (which the listener has logged already).

    The return value is ignored.
    """


@hookspec
def listener_catch_up_done(
    listener: Listener,
    channel: str,
    catch_up: CatchUp,
    duration: float,
    error: BaseException | None,
) -> None:
    """A catch-up returned or raised.

    Called in the thread (or task) that ran the catch-up, right after it:
    a pool worker, or the serving thread with ``max_workers=0``. A catch-up
    runs once its channel's ``LISTEN`` is acknowledged, when its registration
    is first applied and after every reconnection; the channel's
    notifications wait for it, whether it returned or raised.

    :param listener: the listener that ran the catch-up.
    :param channel: the channel it caught up on.
    :param catch_up: the function given to ``add_callback(catch_up=...)``.
    :param duration: seconds it ran.
    :param error: ``None`` when it returned, else the exception it raised
        (which the listener has logged already).

    The return value is ignored.
    """


@hookspec
def listener_active_changed(listener: Listener, active: bool) -> None:
    """An ``exclusive`` listener took its lock, or lost it.

    Called in the serving thread (the event loop for ``AsyncListener``) when
    the listener becomes the one that runs the callbacks (its session took
    the advisory lock), before the catch-ups it then runs, and when it stops
    being it (its connection was lost, taking the lock with it). Never
    called for a listener without ``exclusive``, which is always active.

    :param listener: the listener whose role changed.
    :param active: ``True`` when it runs the callbacks from now on.

    The return value is ignored.
    """


@hookspec
def listener_unregistered(listener: Listener) -> None:
    """The plugin is being unregistered from the listener.

    Called for that plugin alone, in the thread calling
    ``unregister_plugin()``, just before its hooks stop: release what it
    holds for this listener (an HTTP server, a file), as ``listener_stopped``
    does when the listener stops. Not called when the listener stops.

    :param listener: the listener the plugin leaves.

    The return value is ignored.
    """


@hookspec
def listener_stopped(listener: Listener, error: BaseException | None) -> None:
    """The listener stopped serving.

    Called in the serving thread as ``run()`` ends: the connection is closed
    and every callback handed to the pool has finished.

    :param listener: the listener that stopped.
    :param error: ``None`` after ``stop()``, else the error that ended
        ``run()`` (such as ``ReconnectFailed``).

    The return value is ignored.
    """

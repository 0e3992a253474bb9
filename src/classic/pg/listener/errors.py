"""Exceptions raised by the listener.

Every error of ours derives from :class:`ListenerError`, so an application can
tell them from psycopg's, which reach it unchanged when the server refused a
statement (a failed ``LISTEN`` arrives in the future as the psycopg error).
"""

from __future__ import annotations


class ListenerError(Exception):
    """Base class of the exceptions raised by classic-pg-listener."""


class ListenerStopped(ListenerError):
    """The listener stopped before it could act on a request.

    Futures of ``add_callback``/``remove_callback`` still pending when the
    serving thread ends fail with it: they never hang.
    """


class InvalidChannel(ListenerError, ValueError):
    """A channel name PostgreSQL would not deliver as given: empty, too long, NUL."""


class InvalidChannelType(InvalidChannel, TypeError):
    """A channel that is not a ``str`` at all: a ``ValueError`` and a ``TypeError``."""


class CallbackNotRegistered(ListenerError, LookupError):
    """``remove_callback`` named a callback that is not registered on that channel."""


class ReconnectFailed(ListenerError):
    """The connection could not be (re)established within ``max_reconnect_attempts``.

    ``run()`` raises it and ``Listener.exception`` holds it after ``join()``;
    ``__cause__`` is the last error of the connection factory.
    """


class PluginError(ListenerError):
    """A plugin could not be loaded or registered.

    The message names the distribution and the entry point, so the broken
    package can be found without reading a traceback.
    """


class SessionNotKept(ListenerError):
    """Consecutive statements ran in different server sessions.

    The connection goes through a pooler in transaction or statement mode
    (PgBouncer's ``pool_mode = transaction``), which hands each transaction
    to whichever server session is free: ``LISTEN`` stays behind in one
    session and notifications are silently never delivered. ``run()`` ends
    with it, without retrying: it is a configuration error, not an outage.
    """


class BufferOverflow(ListenerError):
    """A consumer of ``AsyncListener.notifications()`` fell too far behind.

    Raised by the iterator once it has yielded every notification it kept:
    the ones after them were not kept. A WebSocket or SSE endpoint typically
    closes the client's stream on it.
    """

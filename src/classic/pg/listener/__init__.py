"""PostgreSQL LISTEN/NOTIFY turned into dependable callbacks.

>>> from classic.pg.listener import Listener
"""

from __future__ import annotations

from ._facade import check_channel
from ._notify import MAX_PAYLOAD_BYTES, anotify, notify
from ._stats import ListenerStats
from .async_listener import AsyncListener
from .errors import (
    BufferOverflow,
    CallbackNotRegistered,
    InvalidChannel,
    InvalidChannelType,
    ListenerError,
    ListenerStopped,
    PluginError,
    ReconnectFailed,
    SessionNotKept,
)
from .hookspecs import hookimpl, hookspec
from .listener import Listener
from .plugins import PluginInfo

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "AsyncListener",
    "BufferOverflow",
    "CallbackNotRegistered",
    "InvalidChannel",
    "InvalidChannelType",
    "Listener",
    "ListenerError",
    "ListenerStats",
    "ListenerStopped",
    "PluginError",
    "PluginInfo",
    "ReconnectFailed",
    "SessionNotKept",
    "anotify",
    "check_channel",
    "hookimpl",
    "hookspec",
    "notify",
]

"""PostgreSQL LISTEN/NOTIFY turned into dependable callbacks.

>>> from classic.pg.listener import Listener
"""

from __future__ import annotations

from ._notify import MAX_PAYLOAD_BYTES, anotify, notify
from .errors import (
    CallbackNotRegistered,
    InvalidChannel,
    InvalidChannelType,
    ListenerError,
    ListenerStopped,
    PluginError,
    ReconnectFailed,
)
from .hookspecs import hookimpl, hookspec
from .listener import Listener
from .plugins import PluginInfo

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CallbackNotRegistered",
    "InvalidChannel",
    "InvalidChannelType",
    "Listener",
    "ListenerError",
    "ListenerStopped",
    "PluginError",
    "PluginInfo",
    "ReconnectFailed",
    "anotify",
    "hookimpl",
    "hookspec",
    "notify",
]

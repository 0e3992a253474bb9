"""Write the notifications of chosen channels as JSON lines, to a file or stdout.

Installed, this plugin joins every listener that autoloads plugins, and is
configured by the environment:

``CLASSIC_PG_LISTENER_JSONL_CHANNELS``
    ``a,b``: the channels to write. Unset or empty: the plugin registers
    nothing, so installing it changes nothing until it is configured.
``CLASSIC_PG_LISTENER_JSONL_PATH``
    the file to append to (created if missing); unset or empty: stdout.

Each line is one notification: ``{"channel", "payload", "pid", "received"}``,
``received`` being the time it reached the callback, in UTC, ISO 8601.

In code, ``listener.register_plugin(JsonlPlugin(["a", "b"], path))`` does the
same without the environment.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import weakref
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from classic.pg.listener import hookimpl

if TYPE_CHECKING:
    from psycopg import Notify

    from classic.pg.listener import Listener
    from classic.pg.listener.hookspecs import Register

ENV_CHANNELS = "CLASSIC_PG_LISTENER_JSONL_CHANNELS"
ENV_PATH = "CLASSIC_PG_LISTENER_JSONL_PATH"

__all__ = ["ENV_CHANNELS", "ENV_PATH", "JsonlPlugin", "JsonlWriter"]


class JsonlWriter:
    """The callback: one JSON line per notification, whole lines only.

    Pool workers call it concurrently; the lock keeps each line in one piece
    and in the order the writes happened.

    The file is opened by ``open()`` (the plugin calls it when the listener
    starts) or at the first write, never at construction: listing plugins
    (``pg-listener plugins``) registers them into a listener that never
    starts, and must leave no file behind. ``close()`` closes it (the plugin
    calls it at ``listener_unregistered`` and ``listener_stopped``); a
    notification still in flight after that (``unregister_plugin()`` removes
    the callback after the hook) is appended with the file opened for that
    line alone, so that no line is lost and no descriptor stays open.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        if self.path is not None and not self.path.parent.is_dir():
            # Checked now, without creating anything, so that a bad path is
            # reported at registration (and by ``pg-listener plugins``).
            raise FileNotFoundError(
                f"cannot write {self.path}: no directory {self.path.parent}"
            )
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._closed = False

    def open(self) -> None:
        """Open the file now, so that an unwritable one is reported at once."""
        with self._lock:
            if self.path is not None and self._file is None and not self._closed:
                self._file = self.path.open("a", encoding="utf-8")

    def __call__(self, notify: Notify) -> None:
        line = json.dumps(
            {
                "channel": notify.channel,
                "payload": notify.payload,
                "pid": notify.pid,
                "received": datetime.now(timezone.utc).isoformat(),
            },
            ensure_ascii=False,
        )
        with self._lock:
            if self.path is None:
                # sys.stdout is looked up per write: it may be replaced meanwhile.
                stream: IO[str] = sys.stdout
            elif self._closed:
                with self.path.open("a", encoding="utf-8") as once:
                    once.write(line + "\n")
                return
            else:
                if self._file is None:
                    self._file = self.path.open("a", encoding="utf-8")
                stream = self._file
            stream.write(line + "\n")
            stream.flush()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            file, self._file = self._file, None
            if file is not None:
                file.close()

    def __repr__(self) -> str:
        return f"<JsonlWriter {self.path or 'stdout'}>"


def _channels(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


class JsonlPlugin:
    """The plugin, configured in code: the channels to write and where."""

    def __init__(self, channels: Iterable[str], path: str | Path | None = None):
        self.channels = list(channels)
        self.path = path
        # One writer per listener, closed when that listener stops or the
        # plugin leaves it.
        self._writers: weakref.WeakKeyDictionary[Any, JsonlWriter] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_env(cls) -> JsonlPlugin:
        return cls(
            _channels(os.environ.get(ENV_CHANNELS, "")),
            os.environ.get(ENV_PATH) or None,
        )

    @hookimpl
    def listener_register_callbacks(
        self, listener: Listener, register: Register
    ) -> None:
        if not self.channels:
            return
        writer = JsonlWriter(self.path)
        self._writers[listener] = writer
        for channel in self.channels:
            register(writer, channel)

    @hookimpl
    def listener_started(self, listener: Listener) -> None:
        writer = self._writers.get(listener)
        if writer is not None:
            writer.open()

    @hookimpl
    def listener_unregistered(self, listener: Listener) -> None:
        self._close(listener)

    @hookimpl
    def listener_stopped(self, listener: Listener) -> None:
        self._close(listener)

    def _close(self, listener: Listener) -> None:
        writer = self._writers.pop(listener, None)
        if writer is not None:
            writer.close()


# The entry point names this module: its hooks read the environment once per
# listener, when the listener registers the plugin.
_from_env: weakref.WeakKeyDictionary[Any, JsonlPlugin] = weakref.WeakKeyDictionary()


@hookimpl
def listener_register_callbacks(listener: Listener, register: Register) -> None:
    plugin = _from_env[listener] = JsonlPlugin.from_env()
    plugin.listener_register_callbacks(listener, register)


@hookimpl
def listener_started(listener: Listener) -> None:
    plugin = _from_env.get(listener)
    if plugin is not None:
        plugin.listener_started(listener)


@hookimpl
def listener_unregistered(listener: Listener) -> None:
    plugin = _from_env.pop(listener, None)
    if plugin is not None:
        plugin.listener_unregistered(listener)


@hookimpl
def listener_stopped(listener: Listener) -> None:
    plugin = _from_env.pop(listener, None)
    if plugin is not None:
        plugin.listener_stopped(listener)

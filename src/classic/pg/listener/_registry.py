"""The channels a listener serves, and the callbacks of each.

A channel may have thousands of callbacks (one per open WebSocket or SSE
stream, each through ``notifications()``), and they come and go in bursts:
every client reconnects after a deploy. So adding or removing one costs the
same whatever a channel holds (a dict keyed by the callback, which is why
callbacks must be hashable), and the tuple a delivery carries is built once
per change, when the next notification of the channel needs it.

Only the serving loop changes a registry. Other threads read it through
``callbacks()``, which copies what it reads in single steps of C code that
a change in the loop cannot interleave with.
"""

from __future__ import annotations

from collections.abc import Iterator

from .hookspecs import Callback


class Registry:
    def __init__(self) -> None:
        # channel -> {the callback as registered: what is called}. The two
        # differ for a callback registered with ``decode``.
        self._channels: dict[str, dict[Callback, Callback]] = {}
        self._entries: dict[str, tuple[Callback, ...]] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._channels))

    def __contains__(self, channel: str) -> bool:
        return channel in self._channels

    def count(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def has(self, channel: str, callback: Callback) -> bool:
        return callback in self._channels.get(channel, ())

    def entries(self, channel: str) -> tuple[Callback, ...]:
        """What to call for a notification of ``channel``, in the order added."""
        entries = self._entries.get(channel)
        if entries is None:
            by_callback = self._channels.get(channel)
            if by_callback is None:
                return ()
            entries = self._entries[channel] = tuple(by_callback.values())
        return entries

    def callbacks(self) -> dict[str, tuple[Callback, ...]]:
        """Every channel's callbacks as registered; safe from any thread."""
        return {
            channel: tuple(by_callback)
            for channel, by_callback in list(self._channels.items())
        }

    def add(self, channel: str, callback: Callback, entry: Callback) -> None:
        self._channels.setdefault(channel, {})[callback] = entry
        self._entries.pop(channel, None)

    def remove(self, channel: str, callback: Callback) -> bool:
        """Forget ``callback``; whether ``channel`` has callbacks left."""
        by_callback = self._channels.get(channel)
        if by_callback is None:
            return False
        by_callback.pop(callback, None)
        self._entries.pop(channel, None)
        if by_callback:
            return True
        del self._channels[channel]
        return False

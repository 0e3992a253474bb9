"""What a listener counts, and the frozen snapshot ``stats()`` returns.

The serving loop and the dispatcher count per batch (one ``Counter`` update
in C per read, one per chunk run), never with a lock per notification;
``stats()`` copies the counters when asked, so a collector that reads them at
scrape time costs the hot path nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import countOf
from typing import Any

from ._sequencing import OneChannel


def count_channels(
    counter: Counter[str],
    deliveries: Sequence[tuple[Any, Any]],
    cut_from: Sequence[tuple[Any, Any]] | None = None,
) -> None:
    """Count ``(callbacks, notify)`` pairs per channel into ``counter``.

    Most batches hold one channel: then one addition (the reader said so of
    the batch, or of the batch ``cut_from`` that ``deliveries`` is a slice
    of), or one C-level count and one addition, a third of what
    ``Counter.update`` costs per item.
    """
    if not deliveries:
        return
    batch = deliveries if cut_from is None else cut_from
    if type(batch) is OneChannel:
        counter[batch.channel] += len(deliveries)
        return
    channels = [notify[0] for _, notify in deliveries]
    first = channels[0]
    if countOf(channels, first) == len(channels):
        counter[first] += len(channels)
    else:
        counter.update(channels)


@dataclass(frozen=True)
class ListenerStats:
    """A listener's state and counters at one instant.

    Counters only grow (until the process ends); per-channel mappings hold the
    channels that saw at least one notification, listened to now or not.
    """

    name: str
    """The listener's name (``Listener(name=...)``)."""
    connected: bool
    """Whether a connection is established and its channels listened to."""
    active: bool
    """Whether callbacks run (``False`` for an ``exclusive`` standby)."""
    backend_pid: int | None
    """The server process of the connection; ``None`` while disconnected."""
    connected_since: float | None
    """When the current connection was established (``time.time()``)."""
    reconnects: int
    """Connections re-established after a loss (each may have missed some)."""
    channels: tuple[str, ...]
    """The channels listened to now."""
    received: Mapping[str, int]
    """Notifications read, per channel (channels with a callback)."""
    delivered: Mapping[str, int]
    """Notifications whose callbacks all ran, per channel."""
    callback_errors: Mapping[str, int]
    """Callbacks that raised, per channel."""
    backlog: int
    """Notifications read whose callbacks have not all run yet."""
    last_notification_at: float | None
    """When the last notification was read (``time.time()``)."""
    last_ping_at: float | None
    """When the last ping was answered (``time.time()``)."""
    last_ping_duration: float | None
    """Seconds the last answered ping took."""
    queue_usage: float | None
    """``pg_notification_queue_usage()`` at the last ping: the fraction of the
    server's notification queue in use (commits that NOTIFY fail at 1.0)."""

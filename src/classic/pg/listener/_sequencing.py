"""What may run now: order per key and catch-up holds, as pure logic.

The pool (threads) and an asyncio dispatcher (tasks) share one problem:
given the deliveries handed over and the work that finished, which work
may start? ``Sequencer`` answers it without threads, clocks or I/O, so both
run on the same rules and the rules are tested on their own:

- ``push(batch)`` takes deliveries in the order they were read and returns
  the units that may start at once; ``finish(unit)`` is told when a unit
  has run and returns the units that may start now.
- With a key (``order_by``), the deliveries of one key run one unit at a
  time, in order: for A then B of the same key, every callback of A has
  returned before any of B starts. Deliveries of a key that is running
  wait in that key's queue and leave together, as the next unit, once the
  running one finished. Different keys never wait for each other.
- ``catch_up(channel, run)`` holds every delivery of ``channel`` pushed
  after it until ``run`` has finished; catch-ups of one channel run one
  after the other, those of different channels side by side.

Without a key and without a catch-up in progress, ``push`` returns the batch
as one unit: the unordered pool pays one test for all this.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import countOf
from typing import Union

from psycopg import Notify

from .hookspecs import Callback

logger = logging.getLogger("classic.pg.listener")

Delivery = tuple[tuple[Callback, ...], Notify]
"""A notification with the callbacks registered for its channel when it came."""


class OneChannel(list[Delivery]):
    """Deliveries all of one channel, as most reads are: counted per channel
    with one addition instead of a pass over them."""

    __slots__ = ("channel",)

    def __init__(self, channel: str, deliveries: Iterable[Delivery]):
        super().__init__(deliveries)
        self.channel = channel


KeyFunction = Callable[[Notify], Hashable]
OrderBy = Union[None, str, KeyFunction]  # noqa: UP007 (a runtime alias on 3.10)

ORDER_BY_CHANNEL = "channel"


def key_function(order_by: object) -> KeyFunction | None:
    """The key for ``order_by``; ``ValueError``/``TypeError`` for a bad one."""
    if order_by is None:
        return None
    if isinstance(order_by, str):
        if order_by != ORDER_BY_CHANNEL:
            raise ValueError(
                f"order_by must be None, {ORDER_BY_CHANNEL!r} or a callable"
                f" key(notify), got {order_by!r}"
            )
        return _channel
    if not callable(order_by):
        raise TypeError(
            f"order_by must be None, {ORDER_BY_CHANNEL!r} or a callable"
            f" key(notify), got {order_by!r}"
        )
    return order_by


def _channel(notify: Notify) -> Hashable:
    return notify[0]


@dataclass(eq=False)
class Unit:
    """Work that may start: deliveries to run, or a channel's catch-up.

    ``key`` is the ordering key the unit holds until it finished (``None``:
    it holds none, and may be split between workers).
    """

    deliveries: Sequence[Delivery] = ()
    key: Hashable = None
    catch_up: Callable[[], object] | None = None
    channel: str = ""


@dataclass(eq=False)
class _Hold:
    """A channel whose deliveries wait for its catch-up(s)."""

    waiting: deque[Callable[[], object]] = field(default_factory=deque)


class _Fallback:
    """The key of a notification whose key function raised: one per channel."""

    __slots__ = ("channel",)

    def __init__(self, channel: str):
        self.channel = channel

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Fallback) and other.channel == self.channel

    def __hash__(self) -> int:
        return hash((_Fallback, self.channel))

    def __repr__(self) -> str:
        return f"<fallback key of channel {self.channel!r}>"


class Sequencer:
    """Decides which work may start, given what was pushed and what finished.

    :param key: ``None`` for no order, else the key of a notification;
        deliveries of one key run one unit at a time, in push order.
    :param max_chunk: most deliveries in one unit of a key.
    """

    def __init__(self, key: KeyFunction | None, max_chunk: int = 256):
        self._key = key
        self._max_chunk = max_chunk
        # A key present is running (a unit of it is out); its deque holds
        # the deliveries that came meanwhile.
        self._keys: dict[Hashable, deque[Delivery]] = {}
        self._holds: dict[str, _Hold] = {}
        # Deliveries held back, in the order pushed, with their keys: those
        # of held channels, and (with a key) those of a key held already, so
        # that a key's order holds across channels too.
        self._held: list[tuple[Hashable, Delivery]] = []
        self._held_keys: set[Hashable] = set()
        self.waiting = 0
        """Deliveries pushed that no returned unit holds yet."""

    @property
    def idle(self) -> bool:
        """No unit out (running or to run) that must be finished."""
        return not self._keys and not self._holds and not self._held

    def push(self, batch: Sequence[Delivery]) -> list[Unit]:
        """Take deliveries in the order read; return the units that may start."""
        if self._holds or self._held:
            batch = self._hold(batch)
            if not batch:
                return []
        if self._key is None:
            return [Unit(batch)]
        return self._ordered(batch)

    def catch_up(self, channel: str, run: Callable[[], object]) -> list[Unit]:
        """Hold ``channel`` until ``run`` finished; the unit if it may run now."""
        hold = self._holds.get(channel)
        if hold is not None:
            hold.waiting.append(run)  # after the catch-up of the channel running
            return []
        self._holds[channel] = _Hold()
        return [Unit(catch_up=run, channel=channel)]

    def finish(self, unit: Unit) -> list[Unit]:
        """``unit`` has run (or raised): the units that may start now."""
        if unit.catch_up is not None:
            return self._caught_up(unit.channel)
        if unit.key is None:
            return []
        queue = self._keys[unit.key]
        if not queue:
            del self._keys[unit.key]
            return []
        return [self._next_of(unit.key, queue)]

    def _next_of(self, key: Hashable, queue: deque[Delivery]) -> Unit:
        if len(queue) <= self._max_chunk:
            chunk: Sequence[Delivery] = list(queue)
            queue.clear()
        else:
            chunk = [queue.popleft() for _ in range(self._max_chunk)]
        self.waiting -= len(chunk)
        return Unit(chunk, key)

    def _hold(self, batch: Sequence[Delivery]) -> list[Delivery]:
        """Put aside what must wait for a catch-up; return the others."""
        holds, held, held_keys = self._holds, self._held, self._held_keys
        keyed = self._key is not None and self._key is not _channel
        free = []
        for delivery in batch:
            key = self._safe_key(delivery[1]) if keyed else None
            if delivery[1][0] in holds or (keyed and key in held_keys):
                held.append((key, delivery))
                if keyed:
                    held_keys.add(key)
            else:
                free.append(delivery)
        self.waiting += len(batch) - len(free)
        return free

    def _caught_up(self, channel: str) -> list[Unit]:
        hold = self._holds[channel]
        if hold.waiting:
            return [Unit(catch_up=hold.waiting.popleft(), channel=channel)]
        del self._holds[channel]
        # Release, in order, what no other hold keeps: neither its channel,
        # nor (with a key) an earlier delivery of its key still held.
        keyed = self._key is not None and self._key is not _channel
        still: list[tuple[Hashable, Delivery]] = []
        blocked: set[Hashable] = set()
        released: list[Delivery] = []
        for key, delivery in self._held:
            if delivery[1][0] in self._holds or (keyed and key in blocked):
                still.append((key, delivery))
                if keyed:
                    blocked.add(key)
            else:
                released.append(delivery)
        self._held, self._held_keys = still, blocked
        if not released:
            return []
        self.waiting -= len(released)
        if self._key is None:
            return [Unit(released)]
        return self._ordered(released)

    def _ordered(self, batch: Sequence[Delivery]) -> list[Unit]:
        key_of = self._key
        assert key_of is not None
        try:
            keys: list[Hashable]
            if key_of is _channel:
                keys = [notify[0] for _, notify in batch]
            else:
                keys = [key_of(notify) for _, notify in batch]
            first = keys[0]
            # Most batches hold one key (one busy channel): one C-level count.
            if countOf(keys, first) == len(keys):
                return self._one_key(first, batch)
            return self._grouped(keys, batch)
        except Exception:  # a key raised, or is unhashable: one by one
            return self._grouped([self._safe_key(n) for _, n in batch], batch)

    def _grouped(
        self, keys: Sequence[Hashable], batch: Sequence[Delivery]
    ) -> list[Unit]:
        """Deliveries of several keys: grouped first (an unhashable key raises
        before anything changed), then one key at a time."""
        by_key: dict[Hashable, list[Delivery]] = {}
        for key, delivery in zip(keys, batch, strict=True):
            chunk = by_key.get(key)
            if chunk is None:
                by_key[key] = [delivery]
            else:
                chunk.append(delivery)
        units: list[Unit] = []
        for key, chunk in by_key.items():
            units += self._one_key(key, chunk)
        return units

    def _one_key(self, key: Hashable, chunk: Sequence[Delivery]) -> list[Unit]:
        """Deliveries of one key: a unit if the key is free, else they wait."""
        queue = self._keys.get(key)
        if queue is not None:
            queue.extend(chunk)
            self.waiting += len(chunk)
            return []
        queue = self._keys[key] = deque()
        if len(chunk) > self._max_chunk:
            queue.extend(chunk[self._max_chunk :])
            self.waiting += len(queue)
            chunk = chunk[: self._max_chunk]
        return [Unit(chunk, key)]

    def _safe_key(self, notify: Notify) -> Hashable:
        """The key of ``notify``; the fallback key (logged) if it cannot be had."""
        assert self._key is not None
        try:
            key = self._key(notify)
            hash(key)
        except Exception:
            key = _Fallback(notify[0])
            logger.exception(
                "order_by key %r raised on a notification of channel %r;"
                " delivered under %r",
                self._key,
                notify[0],
                key,
            )
        return key

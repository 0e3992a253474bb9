"""Running callbacks: inline in the serving thread, or in a thread pool.

The serving thread hands over notifications in batches (all it parsed from
one read of the socket). Submitting each notification to the pool on its own
costs four to five times the CPU of calling the callback inline; a batch pays
that once, so the pool keeps up with a burst while a trickle still goes out
one notification at a time, without delay.

The pool's backlog is bounded: ``room()`` tells the serving thread how many
more notifications it may hand over; when none, it stops reading the socket
(the server buffers meanwhile) and waits for ``wake`` to be called once the
backlog has drained to half.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter

from psycopg import Notify

from .hookspecs import Callback

logger = logging.getLogger("classic.pg.listener")

Delivery = tuple[tuple[Callback, ...], Notify]
"""A notification with the callbacks registered for its channel when it came."""

CallbackDone = Callable[[Callback, Notify, float, "BaseException | None"], None]

_count_into = Counter.update
_channel_of = itemgetter(0)
_notify_of = itemgetter(1)


class Counts:
    """Per-channel counters, updated once per batch (errors, rare, one by one)."""

    def __init__(self) -> None:
        self._delivered: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    def delivered(self) -> dict[str, int]:
        return dict(self._delivered)

    def errors(self) -> dict[str, int]:
        return dict(self._errors)


def deliver(
    batch: Sequence[Delivery], on_done: CallbackDone | None, counts: Counts
) -> None:
    """Call every callback of every delivery; a raising callback is logged."""
    errors = counts._errors
    if on_done is None:
        for callbacks, notify in batch:
            for callback in callbacks:
                try:
                    callback(notify)
                except Exception:
                    errors[notify[0]] += 1
                    _log_failure(callback, notify)
    else:
        for callbacks, notify in batch:
            for callback in callbacks:
                error: BaseException | None = None
                started = time.perf_counter()
                try:
                    callback(notify)
                except Exception as ex:
                    error = ex
                    errors[notify[0]] += 1
                    _log_failure(callback, notify)
                on_done(callback, notify, time.perf_counter() - started, error)
    _count_into(counts._delivered, map(_channel_of, map(_notify_of, batch)))


def _log_failure(callback: Callback, notify: Notify) -> None:
    logger.exception(
        "callback %r raised on a notification of channel %r (pid %d)",
        callback,
        notify.channel,
        notify.pid,
    )


class InlineDispatcher(Counts):
    """Runs the callbacks at once, in the serving thread (``max_workers=0``)."""

    backlog = 0

    def __init__(self, on_done: Callable[[], CallbackDone | None]):
        super().__init__()
        self._on_done = on_done

    def room(self) -> int:
        return sys.maxsize

    def dispatch(self, batch: Sequence[Delivery]) -> None:
        deliver(batch, self._on_done(), self)

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        run()

    def shutdown(self) -> None:
        pass


class PoolDispatcher(Counts):
    """Runs the callbacks in a ``ThreadPoolExecutor``, with a bounded backlog."""

    MAX_CHUNK = 64

    def __init__(
        self,
        max_workers: int | None,
        max_backlog: int,
        on_done: Callable[[], CallbackDone | None],
        wake: Callable[[], None],
        thread_name_prefix: str,
    ):
        super().__init__()
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=thread_name_prefix
        )
        # The executor's own default, which it keeps to itself.
        self._workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._max_backlog = max_backlog
        self._low_water = max_backlog // 2
        self._on_done = on_done
        self._wake = wake
        self._lock = threading.Lock()
        self._backlog = 0
        self._wake_when_drained = False
        # Channels whose catch-up runs: their deliveries wait behind it.
        self._holding: dict[str, list[Delivery]] = {}
        self._catching: dict[str, list[Callable[[], object]]] = {}

    @property
    def backlog(self) -> int:
        """Notifications handed over whose callbacks have not all finished."""
        return self._backlog

    def room(self) -> int:
        room = self._max_backlog - self._backlog
        if room > 0:
            return room
        with self._lock:
            # Ask for a wake-up, then look again: a worker may have drained the
            # backlog between the first look and the request.
            self._wake_when_drained = True
            room = self._max_backlog - self._backlog
            if room > 0:
                self._wake_when_drained = False
            return room

    def dispatch(self, batch: Sequence[Delivery]) -> None:
        with self._lock:
            self._backlog += len(batch)
            if self._holding:
                batch = self._hold(batch)
                if not batch:
                    return
        on_done = self._on_done()
        # Every worker gets a share of the batch, so slow callbacks run side by
        # side; a share is capped so that a burst keeps all of them busy.
        chunk = min(self.MAX_CHUNK, -(-len(batch) // self._workers))
        for start in range(0, len(batch), chunk):
            self._executor.submit(self._run, batch[start : start + chunk], on_done)

    def _hold(self, batch: Sequence[Delivery]) -> list[Delivery]:
        passed = []
        for delivery in batch:
            held = self._holding.get(delivery[1][0])
            if held is None:
                passed.append(delivery)
            else:
                held.append(delivery)
        return passed

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        with self._lock:
            runs = self._catching.get(channel)
            if runs is not None:
                runs.append(run)  # after the one running, still ahead of the rest
                return
            self._catching[channel] = [run]
            self._holding[channel] = []
        self._executor.submit(self._catch_up, channel)

    def _catch_up(self, channel: str) -> None:
        while True:
            with self._lock:
                runs = self._catching[channel]
                if not runs:
                    del self._catching[channel]
                    held = self._holding.pop(channel)
                    self._backlog -= len(held)
                    break
                run = runs.pop(0)
            try:
                run()
            except Exception:
                logger.exception("catch-up of channel %r raised", channel)
        if held:
            self.dispatch(held)

    def _run(self, batch: Sequence[Delivery], on_done: CallbackDone | None) -> None:
        try:
            deliver(batch, on_done, self)
        finally:
            with self._lock:
                self._backlog -= len(batch)
                wake = self._wake_when_drained and self._backlog <= self._low_water
                if wake:
                    self._wake_when_drained = False
            if wake:
                self._wake()

    def shutdown(self) -> None:
        """Wait for every batch handed over: nothing accepted is dropped."""
        self._executor.shutdown(wait=True)

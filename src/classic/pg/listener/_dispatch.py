"""Running callbacks: inline in the serving thread, or in a pool of threads.

The serving thread hands over notifications in batches (all it parsed from
one read of the socket) and asks ``room()`` how many more it may hand over;
when none, it stops reading the socket (the server buffers meanwhile) and
waits for ``wake`` to be called once the backlog has drained to half.

The pool is its own, not a ``ThreadPoolExecutor``, for four reasons found
in the profiles and the issues:

- Cost. An executor pays a ``Future``, a work item and a queue per task;
  here a batch is one list appended to a deque under one lock, and a
  worker takes its share with one more lock, whatever the batch size.
- Shares sized by what callbacks cost. A worker takes as many deliveries
  as it can run in about a millisecond (a slice), measured on the
  chunks it ran: no-op callbacks go a thousand at a time to one worker,
  1 ms sleeps one at a time to as many workers as there are. More workers
  are woken only when the work waiting would take longer than a slice:
  CPU-bound callbacks do not wake threads that would only fight for the
  GIL.
- Threads are named daemon threads started when the first work arrives:
  an idle listener has none, and interpreter exit (the CLI's second
  Ctrl-C) does not wait for a backlog of slow callbacks.
- Order and catch-ups: ``_sequencing.Sequencer`` decides which work may
  start; the pool only runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

from psycopg import Notify

from ._sequencing import Delivery, OrderBy, Sequencer, Unit, key_function
from ._stats import count_channels
from .hookspecs import Callback

logger = logging.getLogger("classic.pg.listener")

__all__ = ["CallbackDone", "Counts", "Delivery", "InlineDispatcher", "PoolDispatcher"]

CallbackDone = Callable[[Callback, Notify, float, "BaseException | None"], None]
"""The ``listener_callback_done`` hook, bound to its plugins of the moment."""


def deliver(
    batch: Sequence[Delivery], on_done: CallbackDone | None
) -> dict[str, int] | None:
    """Call every callback of every delivery; a raising callback is logged.

    Returns the number of callbacks that raised, per channel (``None``: none).
    """
    errors: dict[str, int] | None = None
    if on_done is None:
        for callbacks, notify in batch:
            for callback in callbacks:
                try:
                    callback(notify)
                except Exception:
                    _log_failure(callback, notify)
                    errors = _count_error(errors, notify)
        return errors
    for callbacks, notify in batch:
        for callback in callbacks:
            error: BaseException | None = None
            started = time.perf_counter()
            try:
                callback(notify)
            except Exception as ex:
                error = ex
                _log_failure(callback, notify)
                errors = _count_error(errors, notify)
            on_done(callback, notify, time.perf_counter() - started, error)
    return errors


def _count_error(errors: dict[str, int] | None, notify: Notify) -> dict[str, int]:
    if errors is None:
        errors = {}
    errors[notify[0]] = errors.get(notify[0], 0) + 1
    return errors


def _log_failure(callback: Callback, notify: Notify) -> None:
    logger.exception(
        "callback %r raised on a notification of channel %r (pid %d)",
        callback,
        notify.channel,
        notify.pid,
    )


def run_catch_up(channel: str, run: Callable[[], object]) -> None:
    try:
        run()
    except Exception:
        logger.exception("catch-up %r of channel %r raised", run, channel)


class Counts:
    """Per-channel counters, updated once per chunk, read by the stats."""

    def __init__(self) -> None:
        self._delivered: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    def add(
        self,
        chunk: Sequence[Delivery],
        errors: dict[str, int] | None,
        cut_from: Sequence[Delivery] | None = None,
    ) -> None:
        count_channels(self._delivered, chunk, cut_from)
        if errors:
            self._errors.update(errors)

    def delivered(self) -> dict[str, int]:
        return dict(self._delivered)

    def errors(self) -> dict[str, int]:
        return dict(self._errors)


def _seconds_per_call() -> float:
    """What a trivial Python call costs here: the unit of the pool's timings.

    The shares and the standby's patience are set in these units, so that
    the pool behaves alike on a slow machine, a fast one and under valgrind
    (50 times slower), where its instructions are counted.
    """

    def nothing() -> None:
        pass

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(1_000):
            nothing()
        best = min(best, time.perf_counter() - started)
    return best / 1_000


class InlineDispatcher:
    """Runs the callbacks at once, in the serving thread (``max_workers=0``).

    Everything is in order whatever ``order_by`` says, catch-ups included:
    a catch-up runs at once, and what follows waits for it by construction.
    """

    backlog = 0

    def __init__(self, on_done: Callable[[], CallbackDone | None]):
        self._on_done = on_done
        self._counts = Counts()
        self.delivered = self._counts.delivered
        self.errors = self._counts.errors

    def room(self) -> int:
        return sys.maxsize

    def dispatch(self, batch: Sequence[Delivery]) -> None:
        errors = deliver(batch, self._on_done())
        self._counts.add(batch, errors)

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        run_catch_up(channel, run)

    def drained(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class _Worker:
    """A pool thread and the lock it sleeps on while idle (a binary semaphore)."""

    __slots__ = ("seen", "standby", "thread", "wakeup")

    def __init__(self, pool: PoolDispatcher, name: str):
        self.wakeup = threading.Lock()
        self.wakeup.acquire()  # a new worker starts running, not idle
        self.standby = False
        self.seen = 0
        self.thread = threading.Thread(
            target=pool._work, args=(self,), name=name, daemon=True
        )

    def wake(self) -> None:
        # Woken twice before it ran (made a standby, then free; or stopped):
        # once is enough, it reads its state under the pool's lock.
        with contextlib.suppress(RuntimeError):
            self.wakeup.release()


class PoolDispatcher:
    """Runs the callbacks in worker threads, with a bounded backlog.

    :param order_by: ``None``, ``"channel"`` or ``key(notify)``: see
        ``_sequencing``.
    """

    SLICE_CALLS = 20_000
    """A worker takes as many deliveries as it runs in the time of this many
    trivial calls (about 1 ms): by the measured cost of its callbacks."""

    MAX_TAKE = 1024
    """Most deliveries a worker takes at a time, however cheap they are."""

    STANDBY_SLICES = 16
    """Slices without progress after which a standby takes waiting work.

    At least two GIL switch intervals too: a busy worker that merely waits
    for the GIL is not taken for a blocked one.
    """

    _seconds_per_call: float | None = None

    def __init__(
        self,
        max_workers: int | None,
        max_backlog: int,
        on_done: Callable[[], CallbackDone | None],
        wake: Callable[[], object],
        thread_name_prefix: str,
        order_by: OrderBy = None,
    ):
        if PoolDispatcher._seconds_per_call is None:
            PoolDispatcher._seconds_per_call = _seconds_per_call()
        self._slice = self.SLICE_CALLS * PoolDispatcher._seconds_per_call
        self._patience = max(
            self.STANDBY_SLICES * self._slice, 2 * sys.getswitchinterval()
        )
        # ThreadPoolExecutor's default size, which callers know.
        self._max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._max_backlog = max_backlog
        self._low_water = max_backlog // 2
        self._on_done = on_done
        self._wake = wake
        self._prefix = thread_name_prefix
        self._sequencer = Sequencer(key_function(order_by))
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._counts = Counts()
        # Units that may start; a worker takes a share of the first one.
        self._ready: deque[Unit] = deque()
        self._offset = 0  # of the first unit, taken already
        self._ready_deliveries = 0
        self._catch_ups: deque[Unit] = deque()  # first, so a hold ends soon
        self._catch_ups_running = 0
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        # Workers woken (or started) that have not taken work yet, and
        # workers running work; the others are idle.
        self._free = 0
        self._busy = 0
        self._standby: _Worker | None = None
        self._takes = 0  # works taken, for the standby to see progress
        self._cost = self._slice  # seconds per delivery; slow until measured
        self._backlog = 0
        self._wake_when_drained = False
        self._closing = False
        self._stopped = False  # every worker is to end

    @property
    def backlog(self) -> int:
        """Notifications handed over whose callbacks have not all finished."""
        return self._backlog

    def delivered(self) -> dict[str, int]:
        """Notifications whose callbacks all ran, per channel."""
        with self._lock:
            return self._counts.delivered()

    def errors(self) -> dict[str, int]:
        """Callbacks that raised, per channel."""
        with self._lock:
            return self._counts.errors()

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
        if not batch:  # all of it held back by the core, say
            return
        with self._lock:
            self._backlog += len(batch)
            self._ready_units(self._sequencer.push(batch))
            wake = self._helpers()
        self._start(wake)

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        """Run ``run`` in a worker; hold ``channel``'s later deliveries until done."""
        with self._lock:
            self._catch_ups_running += 1
            self._ready_units(self._sequencer.catch_up(channel, run))
            wake = self._helpers()
        self._start(wake)

    def drained(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for every delivery and catch-up handed over.

        For a loop that goes on answering requests while the pool finishes
        (a callback may wait on one): ``wake`` is called once the last one
        finished after ``shutdown()`` or ``drained()`` was first called, and
        no lock is held meanwhile that a callback or a request could need.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closing = True
            while self._backlog or self._catch_ups_running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._drained.wait(remaining)
            return True

    def shutdown(self) -> None:
        """Wait for every delivery and catch-up handed over, then end the threads.

        Nothing accepted is dropped.
        """
        self.drained()
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
            if self._standby is not None:
                self._standby.standby = False
                idle.append(self._standby)
                self._standby = None
            workers = list(self._workers)
        for worker in idle:
            worker.wake()
        for worker in workers:
            worker.thread.join()

    # -- under the lock ----------------------------------------------------------

    def _ready_units(self, units: list[Unit]) -> None:
        for unit in units:
            if unit.catch_up is not None:
                self._catch_ups.append(unit)
            else:
                self._ready.append(unit)
                self._ready_deliveries += len(unit.deliveries)

    def _helpers(self) -> list[_Worker]:
        """Workers to wake or start for the work ready now.

        Enough free workers that the work ready takes about one slice
        each (when none is busy, at least one), one per key at most, one
        per catch-up, ``max_workers`` in all. Less than a slice of work
        waits for a busy worker to come back for more: cheap callbacks do
        not spread over threads that would fight for the GIL. A busy worker
        may however be blocked for good in a callback, so work left without
        a free worker gets a standby, which takes it if no worker took any
        work for a while (``STANDBY_SLICES``).
        """
        if not self._ready and not self._catch_ups:
            return []
        need = 0
        if self._ready:
            need = int(self._ready_deliveries * self._cost / self._slice)
            if self._ready[-1].key is not None:
                need = min(need, len(self._ready))
            if not self._busy:
                need = need or 1
        need += len(self._catch_ups)
        wake: list[_Worker] = []
        while self._free < need and self._free + self._busy < self._max_workers:
            woken: _Worker | None = self._standby
            if woken is not None:
                self._standby = None
                woken.standby = False
            else:
                woken = self._idle_worker()
            if woken is not None:
                wake.append(woken)
            self._free += 1
        if not self._free and self._standby is None and self._busy < self._max_workers:
            if self._idle:
                worker = self._idle.pop()
                wake.append(worker)
            else:
                worker = _Worker(self, f"{self._prefix}_{len(self._workers)}")
                self._workers.append(worker)
            worker.standby = True
            worker.seen = self._takes
            self._standby = worker
            if worker.thread.ident is None:
                worker.thread.start()
        return wake

    def _idle_worker(self) -> _Worker | None:
        """An idle worker to wake, or ``None`` once a new one was started.

        Started here, under the lock, so that two threads handing it work
        cannot both start it; it runs once the lock is released.
        """
        if self._idle:
            return self._idle.pop()
        worker = _Worker(self, f"{self._prefix}_{len(self._workers)}")
        self._workers.append(worker)
        worker.thread.start()
        return None

    def _take(self) -> tuple[Unit, Sequence[Delivery]] | None:
        """The next work for a worker: a unit, and the deliveries to run of it."""
        if self._catch_ups:
            self._takes += 1
            return self._catch_ups.popleft(), ()
        if not self._ready:
            return None
        self._takes += 1
        unit = self._ready[0]
        deliveries = unit.deliveries
        start = self._offset
        left = len(deliveries) - start
        if unit.key is None:
            # A share: a slice's worth by the measured cost, and no more than
            # an even split of what is ready between the running workers.
            share = min(
                int(self._slice / self._cost) or 1,
                -(-self._ready_deliveries // (self._busy + self._free + 1)),
                self.MAX_TAKE,
            )
            if share < left:
                self._offset = start + share
                self._ready_deliveries -= share
                return unit, deliveries[start : start + share]
        self._ready.popleft()
        self._offset = 0
        self._ready_deliveries -= left
        return unit, deliveries[start:] if start else deliveries

    def _finished(
        self,
        unit: Unit,
        chunk: Sequence[Delivery],
        errors: dict[str, int] | None,
        took: float,
    ) -> bool:
        """Account for work done; whether to wake the serving thread."""
        if unit.catch_up is not None:
            self._catch_ups_running -= 1
        elif chunk:
            self._backlog -= len(chunk)
            self._counts.add(chunk, errors, unit.deliveries)
            # Seconds per delivery, smoothed: one odd chunk (a GIL switch in
            # the middle) does not swing the shares.
            self._cost += (took / len(chunk) - self._cost) / 4
        if unit.key is not None or unit.catch_up is not None:
            self._ready_units(self._sequencer.finish(unit))
        wake = False
        if self._wake_when_drained and self._backlog <= self._low_water:
            self._wake_when_drained = False
            wake = True
        if self._closing and not self._backlog and not self._catch_ups_running:
            self._drained.notify_all()
            wake = True
        return wake

    # -- outside the lock ----------------------------------------------------------

    @staticmethod
    def _start(wake: list[_Worker]) -> None:
        for worker in wake:
            worker.wake()

    def _work(self, me: _Worker) -> None:
        """A worker's life: take work, run it, account for it; sleep when none."""
        lock = self._lock
        done: tuple[Unit, Sequence[Delivery], dict[str, int] | None, float] | None
        done = None  # the work it ran last; None: it was free
        while True:
            if me.standby and not self._stand_by(me):
                me.wakeup.acquire()  # idle again
                continue
            with lock:
                wake_server = False
                if done is None:
                    self._free -= 1
                else:
                    wake_server = self._finished(*done)
                    self._busy -= 1
                work = self._take()
                if work is not None:
                    self._busy += 1
                    helpers = self._helpers()
                elif self._stopped:
                    return
                else:
                    self._idle.append(me)
            if wake_server:
                self._wake()
            if work is None:
                me.wakeup.acquire()  # released by _helpers(), or by shutdown()
                done = None
                continue
            self._start(helpers)
            unit, chunk = work
            started = time.perf_counter()
            errors = None
            try:
                if unit.catch_up is not None:
                    run_catch_up(unit.channel, unit.catch_up)
                else:
                    # The hook's plugins of now, not of when the batch came:
                    # an unregistered plugin's hooks stop with this chunk.
                    errors = deliver(chunk, self._on_done())
            except BaseException:  # SystemExit in a callback, say: log, go on
                logger.exception("a callback worker caught an exception")
            done = unit, chunk, errors, time.perf_counter() - started

    def _stand_by(self, me: _Worker) -> bool:
        """Watch the work left waiting; whether to take it (else: idle)."""
        while True:
            me.wakeup.acquire(timeout=self._patience)
            with self._lock:
                if not me.standby:  # _helpers() made it free, or shutdown()
                    return True
                if self._ready or self._catch_ups:
                    if self._takes != me.seen:  # the busy ones make progress
                        me.seen = self._takes
                        continue
                    self._free += 1
                    result = True
                else:
                    self._idle.append(me)
                    result = False
                me.standby = False
                self._standby = None
                return result

"""Running callbacks for ``AsyncListener``: awaited in order, or by worker tasks.

Callbacks may be coroutine functions or plain functions; both run in the
event loop's thread. A plain function is simply called (it must be short: it
holds the loop while it runs); a coroutine is awaited.

``max_concurrency=0`` awaits every callback in the serving task, one at a
time, in order: ``dispatch()`` calls the plain ones at once and hands back an
awaitable only when a callback returned one, so a batch of plain callbacks
costs no task and no await. Otherwise ``max_concurrency`` worker tasks take
deliveries from a queue: no task per notification, and never more callbacks
awaited at once than workers; a batch that comes while they are all idle
starts in the serving task, as inline, until a callback must be awaited.
The backlog is bounded as in the thread pool,
and order per key and catch-up holds follow ``_sequencing.Sequencer``, the
pool's rules.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._dispatch import CallbackDone, Counts, _log_failure
from ._sequencing import Delivery, OrderBy, Sequencer, Unit, key_function

logger = logging.getLogger("classic.pg.listener")

DEFAULT_CONCURRENCY = 100
"""Worker tasks when ``max_concurrency=None``."""


async def _await_callback(
    awaitable: Awaitable[object],
    notify: Any,
    callback: Any,
    counts: Counts,
    on_done: CallbackDone | None,
    started: float,
) -> None:
    error: BaseException | None = None
    try:
        await awaitable
    except Exception as ex:
        error = ex
        counts._errors[notify[0]] += 1
        _log_failure(callback, notify)
    if on_done is not None:
        on_done(callback, notify, time.perf_counter() - started, error)


def _call(
    callback: Any, notify: Any, counts: Counts, on_done: CallbackDone | None
) -> tuple[Awaitable[object], float] | None:
    """Call one callback; what it returned if that is to be awaited, and
    when it was called. A plain one is finished here, hook included."""
    started = time.perf_counter()
    try:
        result = callback(notify)
    except Exception as ex:
        counts._errors[notify[0]] += 1
        _log_failure(callback, notify)
        if on_done is not None:
            on_done(callback, notify, time.perf_counter() - started, ex)
        return None
    if result is not None and inspect.isawaitable(result):
        return result, started
    if on_done is not None:
        on_done(callback, notify, time.perf_counter() - started, None)
    return None


async def _then(
    first: Awaitable[None],
    callbacks: Sequence[Any],
    notify: Any,
    counts: Counts,
    on_done: CallbackDone | None,
) -> None:
    await first
    for callback in callbacks:
        called = _call(callback, notify, counts, on_done)
        if called is not None:
            result, started = called
            await _await_callback(result, notify, callback, counts, on_done, started)


Stop = tuple[Awaitable[object], int, float]
"""Where a run of callbacks stopped: the awaitable the callback at that
position of its delivery returned, and when that callback was called."""


def run_until_awaited(
    deliveries: Sequence[Delivery],
    start: int,
    end: int,
    counts: Counts,
    on_done: CallbackDone | None,
) -> tuple[int, Stop | None]:
    """Run ``deliveries[start:end]`` in order until a callback returns an awaitable.

    Returns the index of that delivery and where it stopped (``finish()``
    makes the rest of it an awaitable); ``(end, None)`` when everything ran.
    Without a hook, plain callbacks take the loop of the threaded inline
    dispatch: no call per delivery, no clock reading.
    """
    if on_done is not None:
        for index in range(start, end):
            callbacks, notify = deliveries[index]
            for position, callback in enumerate(callbacks):
                called = _call(callback, notify, counts, on_done)
                if called is not None:
                    return index, (called[0], position, called[1])
        return end, None
    for index in range(start, end):
        callbacks, notify = deliveries[index]
        for callback in callbacks:
            try:
                result = callback(notify)
            except Exception:
                counts._errors[notify[0]] += 1
                _log_failure(callback, notify)
                continue
            if result is not None and inspect.isawaitable(result):
                position = next(i for i, c in enumerate(callbacks) if c is callback)
                return index, (result, position, 0.0)
    return end, None


def finish(
    delivery: Delivery, stop: Stop, counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None]:
    """The rest of a delivery where a run stopped: the awaitable, then its
    later callbacks, in order."""
    callbacks, notify = delivery
    result, position, started = stop
    callback = callbacks[position]
    first = _await_callback(result, notify, callback, counts, on_done, started)
    if position + 1 < len(callbacks):
        return _then(first, callbacks[position + 1 :], notify, counts, on_done)
    return first


def drop(stop: Stop) -> None:
    """A stop never to be finished: its coroutine is closed, so that it is
    not reported as never awaited."""
    result = stop[0]
    if inspect.iscoroutine(result):
        result.close()


async def _deliver(
    batch: Sequence[Delivery],
    index: int,
    stop: Stop,
    counts: Counts,
    on_done: CallbackDone | None,
) -> None:
    """The rest of a batch, once the delivery at ``index`` must be awaited."""
    end = len(batch)
    while True:
        await finish(batch[index], stop, counts, on_done)
        start = index
        index, maybe = run_until_awaited(batch, index + 1, end, counts, on_done)
        counts.add(batch[start:index], None, batch)
        if maybe is None:
            return
        stop = maybe


def deliver(
    batch: Sequence[Delivery], counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """Run a batch in order; an awaitable for the rest once one must be awaited."""
    index, stop = run_until_awaited(batch, 0, len(batch), counts, on_done)
    if stop is None:
        counts.add(batch, None)
        return None
    # Count what ran to completion; the rest is counted as it ends.
    counts.add(batch[:index], None, batch)
    return _deliver(batch, index, stop, counts, on_done)


async def _run_catch_up(run: Callable[[], object]) -> None:
    try:
        pending = run()
        if pending is not None and inspect.isawaitable(pending):
            await pending
    except Exception:
        logger.exception("a catch-up raised")


class InlineDispatcher(Counts):
    """Awaits every callback in the serving task, in order (``max_concurrency=0``)."""

    backlog = 0

    def __init__(self, on_done: Callable[[], CallbackDone | None]):
        super().__init__()
        self._on_done = on_done

    def room(self) -> int:
        return 1 << 30

    def dispatch(self, batch: Sequence[Delivery]) -> Awaitable[None] | None:
        return deliver(batch, self, self._on_done())

    def catch_up(
        self, channel: str, run: Callable[[], object]
    ) -> Awaitable[None] | None:
        pending = run()
        return pending if pending is not None and inspect.isawaitable(pending) else None

    def shutdown(self) -> None:
        return None

    def cancel(self) -> None:
        pass


class TaskDispatcher(Counts):
    """Worker tasks running callbacks concurrently, with a bounded backlog.

    ``_sequencing.Sequencer`` decides what may start (order per key,
    catch-up holds). Work that may start while no worker is busy or awaited
    runs at once, in the task that made it ready (the serving task): plain
    callbacks then cost no task switch and no loop turn, as inline. At the
    first callback that returns an awaitable, that delivery goes to a worker
    to be awaited. The rest of an unordered unit goes to the queue for
    another worker, while a keyed unit stays with that worker, in order. The
    queue holds ``(unit, start, end, stop)``: the deliveries to run, and
    where the first of them stopped, if it did.

    :param order_by: ``None``, ``"channel"`` or ``key(notify)``: see
        ``_sequencing``.
    """

    def __init__(
        self,
        max_concurrency: int | None,
        max_backlog: int,
        on_done: Callable[[], CallbackDone | None],
        wake: Callable[[], None],
        name: str,
        order_by: OrderBy = None,
    ):
        super().__init__()
        self._workers_wanted = max_concurrency or DEFAULT_CONCURRENCY
        self._max_backlog = max_backlog
        self._low_water = max_backlog // 2
        self._on_done = on_done
        self._wake = wake
        self._name = name
        self._sequencer = Sequencer(key_function(order_by))
        self._queue: deque[tuple[Unit, int, int, Stop | None]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._waking = 0  # workers woken or started, yet to look at the queue
        self._backlog = 0
        self._wake_when_drained = False
        self._closing = False

    @property
    def backlog(self) -> int:
        return self._backlog

    def room(self) -> int:
        room = self._max_backlog - self._backlog
        if room <= 0:
            self._wake_when_drained = True  # one thread: no race to guard
        return room

    def dispatch(self, batch: Sequence[Delivery]) -> None:
        if not batch:
            return
        self._backlog += len(batch)
        self._ready(self._sequencer.push(batch))

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        """Run ``run`` in a worker; hold ``channel``'s later deliveries until done."""
        self._ready(self._sequencer.catch_up(channel, run))

    def _ready(self, units: list[Unit]) -> None:
        queue = self._queue
        for unit in units:
            if unit.catch_up is not None:
                queue.appendleft((unit, 0, 0, None))  # first, so a hold ends soon
            elif queue or len(self._idle) < len(self._workers):
                # Behind work queued or running (with max_concurrency=1, that
                # is what keeps the order).
                queue.append((unit, 0, len(unit.deliveries), None))
            elif (stopped := self._run(unit, 0, len(unit.deliveries))) is not None:
                queue.appendleft((unit, *stopped))
        if queue:
            self._kick()

    def _run(self, unit: Unit, start: int, end: int) -> tuple[int, int, Stop] | None:
        """Run ``unit.deliveries[start:end]`` until a callback must be awaited.

        ``None`` once all ran; else ``(index, end, stop)``: the delivery to
        finish and the end of what stays with it. The rest of an unordered
        unit goes to the queue, for another worker.
        """
        deliveries = unit.deliveries
        index, stop = run_until_awaited(deliveries, start, end, self, self._on_done())
        self._account(deliveries, start, index)
        if stop is None:
            if unit.key is not None:
                self._ready(self._sequencer.finish(unit))
            return None
        if unit.key is None and index + 1 < end:
            self._queue.appendleft((unit, index + 1, end, None))
            self._kick()
            end = index + 1
        return index, end, stop

    def _kick(self) -> None:
        """Wake idle workers, else start more, while the queue outnumbers
        the workers already woken or started."""
        queue, idle = self._queue, self._idle
        wanted = len(queue) - self._waking
        while idle and wanted > 0:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                wanted -= 1
        while wanted > 0 and len(self._workers) < self._workers_wanted:
            task = asyncio.get_running_loop().create_task(
                self._work(), name=f"{self._name}-callback-{len(self._workers) + 1}"
            )
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
            self._waking += 1
            wanted -= 1

    def _account(self, deliveries: Sequence[Delivery], start: int, end: int) -> None:
        """``deliveries[start:end]`` ran, every callback: counted, off the backlog."""
        if start >= end:
            return
        whole = start == 0 and end == len(deliveries)  # as it is, not a copy
        self.add(deliveries if whole else deliveries[start:end], None, deliveries)
        self._backlog -= end - start
        if self._wake_when_drained and self._backlog <= self._low_water:
            self._wake_when_drained = False
            self._wake()

    async def _work(self) -> None:
        queue, loop = self._queue, asyncio.get_running_loop()
        self._waking -= 1
        while True:
            if not queue:
                if self._closing:
                    return
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                self._waking -= 1
                continue
            unit, start, end, stop = queue.popleft()
            if unit.catch_up is not None:
                await _run_catch_up(unit.catch_up)
                self._ready(self._sequencer.finish(unit))
                continue
            if stop is None:
                stopped = self._run(unit, start, end)
                if stopped is None:
                    continue
                start, end, stop = stopped
            deliveries = unit.deliveries
            while True:
                # The hook's plugins of now, not of when the delivery stopped.
                await finish(deliveries[start], stop, self, self._on_done())
                self._account(deliveries, start, start + 1)
                stopped = self._run(unit, start + 1, end)
                if stopped is None:
                    break
                start, end, stop = stopped

    async def shutdown(self) -> None:
        """Let the workers finish what was accepted, catch-ups too, then end them."""
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
        self._idle.clear()
        while self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)

    def cancel(self) -> None:
        """The serving task was cancelled: so are the callbacks still to run."""
        for _, _, _, stop in self._queue:
            if stop is not None:
                drop(stop)
        self._queue.clear()
        for task in self._workers:
            task.cancel()

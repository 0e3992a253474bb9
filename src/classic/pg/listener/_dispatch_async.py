"""Running callbacks for ``AsyncListener``: awaited in order, or by worker tasks.

Callbacks may be coroutine functions or plain functions; both run in the
event loop's thread. A plain function is simply called (it must be short: it
holds the loop while it runs); a coroutine is awaited.

``max_concurrency=0`` awaits every callback in the serving task, one at a
time, in order: ``dispatch()`` calls the plain ones at once and hands back an
awaitable only when a callback returned one, so a batch of plain callbacks
costs no task and no await. Otherwise ``max_concurrency`` worker tasks take
deliveries from a queue: no task per notification, and never more callbacks
running at once than workers. The backlog is bounded as in the thread pool,
and order per key and catch-up holds follow ``_sequencing.Sequencer``, the
pool's rules.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from ._core import Delivery
from ._dispatch import CallbackDone, Counts, _log_failure
from ._sequencing import OrderBy, Sequencer, Unit, key_function

_count_into = Counter.update
_notify_of = itemgetter(1)
_channel_of = itemgetter(0)


def _channels(batch: Sequence[Delivery]) -> Iterator[str]:
    return map(_channel_of, map(_notify_of, batch))


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


def _run_one(
    callback: Any, notify: Any, counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """Call one callback; the awaitable that finishes it, if it returned one."""
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
        return _await_callback(result, notify, callback, counts, on_done, started)
    if on_done is not None:
        on_done(callback, notify, time.perf_counter() - started, None)
    return None


def _call(
    callbacks: Sequence[Any], notify: Any, counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """A delivery's callbacks in order; an awaitable for the rest once one must be
    awaited. Without a hook, plain callbacks cost no clock reading."""
    position = 0
    for callback in callbacks:
        position += 1
        if on_done is None:
            try:
                result = callback(notify)
            except Exception:
                counts._errors[notify[0]] += 1
                _log_failure(callback, notify)
                continue
            if result is None or not inspect.isawaitable(result):
                continue
            pending: Awaitable[None] = _await_callback(
                result, notify, callback, counts, None, 0.0
            )
        else:
            maybe = _run_one(callback, notify, counts, on_done)
            if maybe is None:
                continue
            pending = maybe
        if position < len(callbacks):
            return _then(pending, callbacks[position:], notify, counts, on_done)
        return pending
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
        pending = _run_one(callback, notify, counts, on_done)
        if pending is not None:
            await pending


async def _deliver(
    batch: Sequence[Delivery],
    start: int,
    first: Awaitable[None],
    counts: Counts,
    on_done: CallbackDone | None,
) -> None:
    """The rest of a batch, once a delivery's callbacks must be awaited.

    ``first`` finishes the delivery at ``start``, its later callbacks included.
    """
    await first
    counts._delivered[batch[start][1][0]] += 1
    for callbacks, notify in batch[start + 1 :]:
        pending = _call(callbacks, notify, counts, on_done)
        if pending is not None:
            await pending
        counts._delivered[notify[0]] += 1


def deliver(
    batch: Sequence[Delivery], counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """Run a batch in order; an awaitable for the rest once one must be awaited."""
    for index, (callbacks, notify) in enumerate(batch):
        pending = _call(callbacks, notify, counts, on_done)
        if pending is not None:
            # Count what ran to completion; the rest is counted as it ends.
            _count_into(counts._delivered, _channels(batch[:index]))
            return _deliver(batch, index, pending, counts, on_done)
    _count_into(counts._delivered, _channels(batch))
    return None


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
    catch-up holds); the queue holds its units, each with the index of its
    first delivery not yet taken. A worker runs a unit's plain callbacks one
    after the other without awaiting; at the first callback that returns an
    awaitable, the rest of an unordered unit goes back to the queue for
    another worker, while a keyed unit stays with its worker, in order.

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
        self._queue: deque[tuple[Unit, int]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
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
        for unit in units:
            if unit.catch_up is not None:
                self._queue.appendleft((unit, 0))  # first, so a hold ends soon
            else:
                self._queue.append((unit, 0))
        if units:
            self._kick()

    def _kick(self) -> None:
        """Wake idle workers, else start more while the queue outnumbers them."""
        queue, idle = self._queue, self._idle
        woke = False
        while idle and queue:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woke = True
        if woke:
            return
        while queue and len(self._workers) < self._workers_wanted:
            task = asyncio.get_running_loop().create_task(
                self._work(), name=f"{self._name}-callback-{len(self._workers) + 1}"
            )
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
            if len(self._workers) >= len(queue):
                break

    def _account(self, chunk: Sequence[Delivery]) -> None:
        """Deliveries whose callbacks all ran: counted, out of the backlog."""
        if not chunk:
            return
        self.add(chunk, None)
        self._backlog -= len(chunk)
        if self._wake_when_drained and self._backlog <= self._low_water:
            self._wake_when_drained = False
            self._wake()

    async def _work(self) -> None:
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            if not queue:
                if self._closing:
                    return
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            unit, start = queue.popleft()
            if unit.catch_up is not None:
                await _run_catch_up(unit.catch_up)
                self._ready(self._sequencer.finish(unit))
                continue
            deliveries = unit.deliveries
            # The hook's plugins of now, not of when the batch came.
            on_done = self._on_done()
            keyed = unit.key is not None
            index, end = start, len(deliveries)
            while index < end:
                callbacks, notify = deliveries[index]
                index += 1
                pending = _call(callbacks, notify, self, on_done)
                if pending is None:
                    continue
                self._account(deliveries[start : index - 1])
                start = index - 1
                if not keyed and index < end:
                    queue.appendleft((unit, index))  # the rest, for another worker
                    end = index
                    self._kick()
                await pending
            self._account(deliveries[start:index])
            if keyed:
                self._ready(self._sequencer.finish(unit))

    async def shutdown(self) -> None:
        """Let the workers finish what was accepted, catch-ups too, then end them."""
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()
        while self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)

    def cancel(self) -> None:
        """The serving task was cancelled: so are the callbacks still to run."""
        self._queue.clear()
        for task in self._workers:
            task.cancel()

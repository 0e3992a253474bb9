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


def _finishing(
    first: Awaitable[None],
    callbacks: Sequence[Any],
    after: int,
    notify: Any,
    counts: Counts,
    on_done: CallbackDone | None,
) -> Awaitable[None]:
    """What finishes a delivery: ``first``, then its callbacks from ``after`` on."""
    if after < len(callbacks):
        return _then(first, callbacks[after:], notify, counts, on_done)
    return first


def run_until_awaited(
    deliveries: Sequence[Delivery],
    start: int,
    end: int,
    counts: Counts,
    on_done: CallbackDone | None,
) -> tuple[int, Awaitable[None] | None]:
    """Run ``deliveries[start:end]`` in order until a callback returns an awaitable.

    Returns the index of that delivery and the awaitable that finishes it,
    its later callbacks included; ``(end, None)`` when everything ran. Plain
    callbacks without a hook take the loop of the threaded inline dispatch:
    no call per delivery, no clock reading.
    """
    if on_done is not None:
        for index in range(start, end):
            callbacks, notify = deliveries[index]
            for position, callback in enumerate(callbacks):
                pending = _run_one(callback, notify, counts, on_done)
                if pending is not None:
                    return index, _finishing(
                        pending, callbacks, position + 1, notify, counts, on_done
                    )
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
                after = next(i for i, c in enumerate(callbacks) if c is callback) + 1
                pending = _await_callback(result, notify, callback, counts, None, 0.0)
                return index, _finishing(
                    pending, callbacks, after, notify, counts, None
                )
    return end, None


async def _deliver(
    batch: Sequence[Delivery],
    index: int,
    pending: Awaitable[None],
    counts: Counts,
    on_done: CallbackDone | None,
) -> None:
    """The rest of a batch, once the delivery at ``index`` must be awaited."""
    end = len(batch)
    while True:
        await pending
        start = index
        index, maybe = run_until_awaited(batch, index + 1, end, counts, on_done)
        counts.add(batch[start:index], None)
        if maybe is None:
            return
        pending = maybe


def deliver(
    batch: Sequence[Delivery], counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """Run a batch in order; an awaitable for the rest once one must be awaited."""
    index, pending = run_until_awaited(batch, 0, len(batch), counts, on_done)
    if pending is None:
        counts.add(batch, None)
        return None
    # Count what ran to completion; the rest is counted as it ends.
    counts.add(batch[:index], None)
    return _deliver(batch, index, pending, counts, on_done)


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
            counted, end = start, len(deliveries)
            while True:
                index, pending = run_until_awaited(
                    deliveries, start, end, self, on_done
                )
                if pending is None:
                    break
                self._account(deliveries[counted:index])
                counted = index
                if not keyed and index + 1 < end:
                    queue.appendleft((unit, index + 1))  # the rest, for another worker
                    end = index + 1
                    self._kick()
                await pending
                start = index + 1
            self._account(deliveries[counted:end])
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

"""Running callbacks for ``AsyncListener``: awaited in order, or by worker tasks.

Callbacks may be coroutine functions or plain functions; both run in the
event loop's thread. A plain function is simply called (it must be short: it
holds the loop while it runs); a coroutine is awaited.

``max_concurrency=0`` awaits every callback in the serving task, one at a
time, in order: ``dispatch()`` calls the plain ones at once and hands back an
awaitable only when a callback returned one, so a batch of plain callbacks
costs no task and no await. Otherwise ``max_concurrency`` worker tasks take
deliveries from a queue: no task per notification, and never more callbacks
running at once than workers. The backlog is bounded as in the thread pool.
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


async def _deliver(
    batch: Sequence[Delivery],
    start: int,
    first: Awaitable[None],
    counts: Counts,
    on_done: CallbackDone | None,
    skip: int,
) -> None:
    """The rest of a batch, once a callback returned an awaitable."""
    await first
    for index in range(start, len(batch)):
        callbacks, notify = batch[index]
        for callback in callbacks[skip:]:
            pending = _run_one(callback, notify, counts, on_done)
            if pending is not None:
                await pending
        skip = 0
        counts._delivered[notify[0]] += 1


def deliver(
    batch: Sequence[Delivery], counts: Counts, on_done: CallbackDone | None
) -> Awaitable[None] | None:
    """Run a batch in order; an awaitable for the rest once one must be awaited."""
    index = 0
    for callbacks, notify in batch:
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
                pending: Awaitable[None] | None = _await_callback(
                    result, notify, callback, counts, None, 0.0
                )
            else:
                pending = _run_one(callback, notify, counts, on_done)
            if pending is not None:
                # Count what ran to completion; the rest is counted as it ends.
                _count_into(counts._delivered, _channels(batch[:index]))
                return _deliver(batch, index, pending, counts, on_done, position)
        index += 1
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
    """Worker tasks running callbacks concurrently, with a bounded backlog."""

    def __init__(
        self,
        max_concurrency: int | None,
        max_backlog: int,
        on_done: Callable[[], CallbackDone | None],
        wake: Callable[[], None],
        name: str,
    ):
        super().__init__()
        self._workers_wanted = max_concurrency or DEFAULT_CONCURRENCY
        self._max_backlog = max_backlog
        self._low_water = max_backlog // 2
        self._on_done = on_done
        self._wake = wake
        self._name = name
        self._queue: deque[Delivery] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._holding: dict[str, list[Delivery]] = {}
        self._catching: dict[str, asyncio.Task[None]] = {}
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
        self._backlog += len(batch)
        holding = self._holding
        if holding:
            for delivery in batch:
                held = holding.get(delivery[1][0])
                if held is None:
                    self._queue.append(delivery)
                else:
                    held.append(delivery)
        else:
            self._queue.extend(batch)
        self._kick()

    def _kick(self) -> None:
        """Wake idle workers, and start more while the queue outnumbers them."""
        queue, idle = self._queue, self._idle
        while idle and queue:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
        while queue and len(self._workers) < self._workers_wanted:
            task = asyncio.get_running_loop().create_task(
                self._work(), name=f"{self._name}-callback-{len(self._workers) + 1}"
            )
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
            if len(self._workers) >= len(queue):
                break

    async def _work(self) -> None:
        queue, counts, loop = self._queue, self, asyncio.get_running_loop()
        while True:
            if not queue:
                if self._closing:
                    return
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            callbacks, notify = queue.popleft()
            on_done = self._on_done()
            for callback in callbacks:
                pending = _run_one(callback, notify, counts, on_done)
                if pending is not None:
                    await pending
            counts._delivered[notify[0]] += 1
            self._backlog -= 1
            if self._wake_when_drained and self._backlog <= self._low_water:
                self._wake_when_drained = False
                self._wake()

    def catch_up(self, channel: str, run: Callable[[], object]) -> None:
        previous = self._catching.get(channel)
        self._holding.setdefault(channel, [])
        task = asyncio.get_running_loop().create_task(
            self._catch_up(channel, run, previous)
        )
        self._catching[channel] = task

    async def _catch_up(
        self,
        channel: str,
        run: Callable[[], object],
        previous: asyncio.Task[None] | None,
    ) -> None:
        if previous is not None:
            await asyncio.shield(previous)  # catch-ups of a channel run in turn
        await _run_catch_up(run)
        if self._catching.get(channel) is asyncio.current_task():
            del self._catching[channel]
            held = self._holding.pop(channel, [])
            self._queue.extend(held)
            self._kick()

    async def shutdown(self) -> None:
        """Let the workers finish what was accepted, then end them."""
        while self._catching:
            await asyncio.gather(*self._catching.values(), return_exceptions=True)
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)

    def cancel(self) -> None:
        """The serving task was cancelled: so are the callbacks still to run."""
        self._queue.clear()
        for held in self._holding.values():
            held.clear()
        for task in [*self._workers, *self._catching.values()]:
            task.cancel()

"""The two drivers of the serving loop: one for threads, one for asyncio.

The loop itself (``_core.Core.serve``) does no waiting of its own: it is a
generator that yields what it needs, as psycopg's ``generators.py`` does, and
a driver here does it and sends the answer back in:

``Wait(fileno, events, deadline)``
    wait until ``fileno`` is ready for ``events`` (``READ``/``WRITE``), the
    waker is written to, or ``deadline`` (``time.monotonic()``) passes;
    ``fileno`` ``-1`` waits for the waker and the deadline only. Answers the
    ready events of ``fileno`` (``0``: woken or timed out).
``CONNECT``
    call the connection factory (awaiting it when it is a coroutine
    function); answers the connection.
``Close(connection)``
    close a connection (awaiting ``AsyncConnection.close()``).
``Await(awaitable)``
    asyncio only: await it (inline coroutine callbacks, the tasks at stop).

An exception raised while doing any of it, ``KeyboardInterrupt`` and task
cancellation included, is thrown into the loop, whose ``finally`` resolves
every future before the exception goes on: whatever ends the loop, no future
is left pending. Neither driver knows the other exists.
"""

from __future__ import annotations

import asyncio
import inspect
import select
import selectors
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Wait:
    __slots__ = ("deadline", "events", "fileno")

    def __init__(self, fileno: int, events: int, deadline: float | None):
        self.fileno = fileno
        self.events = events
        self.deadline = deadline


class Close:
    __slots__ = ("connection",)

    def __init__(self, connection: Any):
        self.connection = connection


class Await:
    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]):
        self.awaitable = awaitable


class _Connect:
    __slots__ = ()


CONNECT = _Connect()

Effect = Wait | Close | Await | _Connect
Loop = Generator[Effect, Any, None]


def run(loop: Loop, waker_fileno: int, factory: Callable[[], Any]) -> None:
    """Drive ``loop`` in the calling thread, sleeping in ``select()``."""
    with selectors.DefaultSelector() as selector:
        selector.register(waker_fileno, READ)
        watched = -1  # the connection's socket, while registered
        watched_events = 0
        answer: Any = None
        error: BaseException | None = None
        while True:
            try:
                effect = loop.send(answer) if error is None else loop.throw(error)
            except StopIteration:
                return
            answer = error = None
            try:
                if type(effect) is Wait:
                    fileno = effect.fileno
                    if fileno != watched or effect.events != watched_events:
                        if watched >= 0:
                            selector.unregister(watched)
                        watched, watched_events = fileno, effect.events
                        if fileno >= 0:
                            selector.register(fileno, effect.events)
                    timeout = None
                    if effect.deadline is not None:
                        timeout = max(0.0, effect.deadline - time.monotonic())
                    answer = 0
                    for key, events in selector.select(timeout):
                        if key.fd == fileno:
                            answer = events
                elif type(effect) is Close:
                    if watched >= 0:
                        # Before the descriptor is closed and its number reused.
                        selector.unregister(watched)
                        watched = -1
                    effect.connection.close()
                elif type(effect) is _Connect:
                    answer = factory()
                else:
                    raise TypeError(f"a threaded listener cannot {effect!r}")
            except BaseException as ex:
                error = ex


async def run_async(
    loop: Loop,
    waker_fileno: int,
    factory: Callable[[], Any],
    on_cancel: Callable[[], None] = lambda: None,
) -> None:
    """Drive ``loop`` in the running event loop; it never blocks the event loop.

    ``on_cancel`` runs when the task is cancelled, before the cancellation
    goes into the loop: the callbacks still to run are cancelled with it.
    """
    watch = _Watch(asyncio.get_running_loop(), waker_fileno)
    answer: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                effect = loop.send(answer) if error is None else loop.throw(error)
            except StopIteration:
                return
            answer = error = None
            try:
                if type(effect) is Wait:
                    answer = await watch.wait(effect)
                    continue
                # Nothing may stay watched while the loop awaits something
                # else: a socket or pipe that stays readable would spin the
                # event loop meanwhile.
                watch.unwatch()
                if type(effect) is Await:
                    answer = await effect.awaitable
                elif type(effect) is Close:
                    await effect.connection.close()
                else:
                    answer = factory()
                    if inspect.isawaitable(answer):
                        answer = await answer
            except asyncio.CancelledError as ex:
                on_cancel()
                error = ex
            except BaseException as ex:
                error = ex
    finally:
        watch.unwatch()


class _Watch:
    """The readers and the timer of consecutive waits, kept from one to the next.

    A wait after a wait on the same socket (the common case: a read, a
    batch, the next wait) adds and removes nothing; a deadline later than
    the armed timer keeps the timer, whose early firing is a harmless
    spurious wake-up. That spares each wake-up four epoll_ctl calls and a
    timer, which is most of what it costs the event loop.

    A kept reader may fire once too often: the event loop polls before it
    runs the serving task, which then reads the socket dry, so the event
    that poll saw comes after the read, for data already taken. Taken for
    real, it would cost a whole pass of the serving loop per batch, for
    nothing; a zero-timeout poll tells it apart, for less.
    """

    def __init__(self, event_loop: asyncio.AbstractEventLoop, waker_fileno: int):
        self._loop = event_loop
        self._waker = waker_fileno
        self._fileno = -2  # nothing watched
        self._events = 0
        self._waiter: asyncio.Future[int] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _ready(self, events: int) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(events)

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if _readable_now(self._fileno):
            waiter.set_result(READ)

    async def wait(self, effect: Wait) -> int:
        event_loop = self._loop
        fileno, events = effect.fileno, effect.events
        if fileno != self._fileno or events != self._events:
            self.unwatch()
            event_loop.add_reader(self._waker, self._ready, 0)
            if fileno >= 0:
                if events & READ:
                    event_loop.add_reader(fileno, self._readable)
                if events & WRITE:
                    event_loop.add_writer(fileno, self._ready, WRITE)
            self._fileno, self._events = fileno, events
        deadline = effect.deadline
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
        elif (
            timer is None
            or timer.cancelled()
            or timer.when() > _loop_time(event_loop, deadline)
        ):
            if timer is not None:
                timer.cancel()
            self._timer = event_loop.call_at(
                _loop_time(event_loop, deadline), self._timer_fired
            )
        waiter: asyncio.Future[int] = event_loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            self._waiter = None

    def _timer_fired(self) -> None:
        self._timer = None
        self._ready(0)

    def unwatch(self) -> None:
        """Remove the readers and the timer."""
        if self._fileno == -2:
            return
        event_loop = self._loop
        event_loop.remove_reader(self._waker)
        if self._fileno >= 0:
            if self._events & READ:
                event_loop.remove_reader(self._fileno)
            if self._events & WRITE:
                event_loop.remove_writer(self._fileno)
        self._fileno, self._events = -2, 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_poll = getattr(select, "poll", None)


def _readable_now(fileno: int) -> bool:
    """Whether ``fileno`` has something to read (or was closed) right now.

    ``poll()``, not ``select()``: a busy service's sockets number in the
    thousands, and ``select()`` refuses a descriptor above ``FD_SETSIZE``
    (1024). Windows has no ``poll()``, and its ``select()`` no such limit.
    """
    if _poll is None:
        return bool(select.select((fileno,), (), (), 0)[0])
    poller = _poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


def _loop_time(event_loop: asyncio.AbstractEventLoop, deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the event loop's clock."""
    return event_loop.time() + (deadline - time.monotonic())

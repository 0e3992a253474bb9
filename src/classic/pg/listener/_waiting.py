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
    event_loop = asyncio.get_running_loop()
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
                answer = await _wait(event_loop, effect, waker_fileno)
            elif type(effect) is Await:
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


async def _wait(
    event_loop: asyncio.AbstractEventLoop, effect: Wait, waker_fileno: int
) -> int:
    ready: asyncio.Future[int] = event_loop.create_future()

    def wake(events: int) -> None:
        if not ready.done():
            ready.set_result(events)

    # Readers are added for one wait and removed after it: a reader left on a
    # socket that stays readable would spin the event loop while the serving
    # task awaits something else (an inline coroutine callback, say).
    fileno, events = effect.fileno, effect.events
    event_loop.add_reader(waker_fileno, wake, 0)
    if fileno >= 0:
        if events & READ:
            event_loop.add_reader(fileno, wake, READ)
        if events & WRITE:
            event_loop.add_writer(fileno, wake, WRITE)
    timer = None
    if effect.deadline is not None:
        timer = event_loop.call_later(effect.deadline - time.monotonic(), wake, 0)
    try:
        return await ready
    finally:
        event_loop.remove_reader(waker_fileno)
        if fileno >= 0:
            if events & READ:
                event_loop.remove_reader(fileno)
            if events & WRITE:
                event_loop.remove_writer(fileno)
        if timer is not None:
            timer.cancel()

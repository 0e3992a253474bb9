"""``AsyncListener``: the same serving loop as ``Listener``, driven by asyncio.

The loop (``_core``) is the one ``Listener`` runs; here ``_waiting.run_async``
drives it with the event loop's readers, so it starts no thread and never
blocks the event loop. Callbacks, coroutine functions or plain ones, run in
the event loop; hooks too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import psycopg
from psycopg import Notify

from . import _waiting
from ._dispatch_async import InlineDispatcher, TaskDispatcher
from ._facade import (
    ListenerBase,
    ListenerOptions,
    check_callable,
    check_channel,
    check_connection,
)
from .errors import BufferOverflow
from .hookspecs import CatchUp

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # a dependency on 3.10 only
    from typing_extensions import Unpack

logger = logging.getLogger("classic.pg.listener")

AsyncConnectionFactory = Callable[
    [], "psycopg.AsyncConnection[Any] | Awaitable[psycopg.AsyncConnection[Any]]"
]


class AsyncListener(ListenerBase):
    """Calls your callbacks, in the event loop, with the notifications of channels.

    :param connection_factory: called without arguments for every
        (re)connection; returns a ``psycopg.AsyncConnection`` opened with
        ``autocommit=True``, or is a coroutine function returning one (such as
        ``lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True)``).
    :param max_concurrency: how many callbacks may run at once, in worker
        tasks (``None``: 100); ``0`` awaits each callback in the serving
        task, one at a time, in order.
    :param ping_period: as for ``Listener``, and every keyword argument
        too: ``ping_timeout``, ``max_backlog``, ``reconnect_delay``,
        ``max_reconnect_delay``, ``max_reconnect_attempts``, ``on_reconnect``,
        ``plugins``, ``autoload_plugins``, ``blocked_plugins``, ``name``,
        ``exclusive``, ``max_connection_age``, ``tcp_keepalive``.

    Callbacks may be ``async def`` functions, awaited, or plain functions,
    called in the event loop: a plain function holds the whole loop while it
    runs, so keep it short, and hand blocking work to
    ``asyncio.to_thread()`` from an ``async def`` callback.
    """

    _allow_async = True

    def __init__(
        self,
        connection_factory: AsyncConnectionFactory,
        max_concurrency: int | None = None,
        ping_period: float = 60,
        **options: Unpack[ListenerOptions],
    ):
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int) or max_concurrency < 0
        ):
            raise ValueError(
                f"max_concurrency must be None or >= 0, got {max_concurrency!r}"
            )
        self._max_concurrency = max_concurrency
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # known at run() or start()
        self._started = False
        self._finished = False
        self._task: asyncio.Task[None] | None = None
        self._streams: weakref.WeakSet[Notifications] = weakref.WeakSet()
        self._done: asyncio.Event | None = None
        super().__init__(connection_factory, ping_period, **options)

    def _make_dispatcher(
        self, wake: Callable[[], None], on_done: Callable[[], Any]
    ) -> InlineDispatcher | TaskDispatcher:
        if self._max_concurrency == 0:
            return InlineDispatcher(on_done)
        return TaskDispatcher(
            self._max_concurrency,
            self._settings.max_backlog,
            on_done,
            wake,
            self.name,
        )

    def _check_connection(self, conn: object) -> psycopg.AsyncConnection[Any]:
        hint = ""
        if isinstance(conn, psycopg.Connection):
            hint = ": use Listener for a (blocking) Connection"
        result: psycopg.AsyncConnection[Any] = check_connection(
            conn, psycopg.AsyncConnection, hint
        )
        return result

    def _in_loop(self, make: Callable[[], Future[None]]) -> asyncio.Future[None]:
        """A request's future as an asyncio one, resolved in the listener's loop.

        The loop is found before the request is made: a call that cannot be
        answered in a loop changes nothing.
        """
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "AsyncListener: call this from the event loop, or from"
                    " another thread once the listener runs in its loop"
                ) from None
        return asyncio.wrap_future(make(), loop=loop)

    # -- callbacks -------------------------------------------------------------

    def add_callback(
        self,
        callback: Callable[[Notify], object],
        channel: str,
        *,
        catch_up: CatchUp | None = None,
        decode: Callable[[str], Any] | None = None,
    ) -> asyncio.Future[None]:
        """Call ``callback(notify)`` (awaited if it is a coroutine) for ``channel``.

        As ``Listener.add_callback``, with an ``asyncio.Future`` to await or
        not; callable from the loop or from any thread, the future resolving
        in the loop. ``catch_up`` may be a coroutine function too.
        """
        return self._in_loop(
            lambda: self._request("add", callback, channel, catch_up, decode)
        )

    def remove_callback(
        self, callback: Callable[[Notify], object], channel: str
    ) -> asyncio.Future[None]:
        """Stop calling ``callback`` for ``channel``, as ``Listener`` does."""
        return self._in_loop(lambda: self._request("remove", callback, channel))

    def unregister_plugin(self, name: str) -> asyncio.Future[None]:
        """Unregister a plugin and remove its callbacks; as ``Listener``'s."""
        return self._in_loop(lambda: self._host.unregister(name))

    def rotate(self) -> asyncio.Future[None]:
        """Replace the connection by a new one, without a gap; see ``Listener``."""
        return self._in_loop(lambda: self._core.rotate(self._new_future()))

    def notifications(
        self,
        channel: str,
        *,
        max_buffer: int = 1000,
        catch_up: CatchUp | None = None,
    ) -> Notifications:
        """The notifications of ``channel``, as an async iterator.

        For a WebSocket or server-sent-events endpoint::

            async with listener.notifications("orders") as stream:
                async for notify in stream:
                    await websocket.send_text(notify.payload)

        Arguments are checked at the call. Listening starts at the first
        ``__anext__()``, which returns once the channel is listened to (and
        with its first notification). Up to ``max_buffer`` notifications wait
        for a slow consumer; one more and the iterator raises
        ``BufferOverflow`` once it has yielded those, rather than drop
        notifications silently or hold up every other callback. The
        iterator ends when the listener stops. Leaving it (``break``, an
        exception, cancellation, or the ``async with`` block) removes its
        callback.
        """
        check_channel(channel, self._core.server_codec)
        if not isinstance(max_buffer, int) or max_buffer < 1:
            raise ValueError(f"max_buffer must be an int >= 1, got {max_buffer!r}")
        if catch_up is not None:
            check_callable(catch_up, "catch_up", allow_async=True)
        stream = Notifications(self, channel, max_buffer, catch_up)
        self._streams.add(stream)
        return stream

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve in the running event loop until ``stop()``.

        Raises what ended the listener otherwise (``ReconnectFailed``,
        ``SessionNotKept``...). Cancelling the task that awaits it stops the
        listener cleanly, closing the connection and resolving every future,
        then re-raises ``CancelledError``.
        """
        self._mark_started()
        await self._serve()
        if self._exception is not None:
            raise self._exception

    def start(self) -> None:
        """Serve in a task of the running loop; return at once."""
        self._mark_started()
        assert self._loop is not None
        self._task = self._loop.create_task(self._serve(logged=True), name=self.name)

    def _mark_started(self) -> None:
        if self._started:
            raise RuntimeError("a listener can only be started once")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("the listener was made in another event loop")
        self._loop = loop
        self._started = True
        self._done = asyncio.Event()

    async def _serve(self, logged: bool = False) -> None:
        dispatcher = self._core._dispatcher
        try:
            await _waiting.run_async(
                self._core.serve(),
                self._core.waker.fileno(),
                self._factory,
                on_cancel=dispatcher.cancel,
            )
        except asyncio.CancelledError:
            raise
        except BaseException as ex:
            self._exception = ex
            if logged:
                logger.error("listener %s ended", self.name, exc_info=ex)
        finally:
            self._finished = True
            for stream in list(self._streams):
                stream._end()
            assert self._done is not None
            self._done.set()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until the listener has stopped and every accepted callback ran.

        Returns after ``timeout`` seconds even if it has not, like
        ``Listener.join``; raises ``RuntimeError`` before ``start()``/``run()``.
        """
        if self._done is None:
            raise RuntimeError("cannot join a listener that was not started")
        # asyncio's TimeoutError: not yet the builtin one on Python 3.10.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)

    def is_alive(self) -> bool:
        """Whether the listener was started and has not finished stopping."""
        return self._started and not self._finished

    async def __aenter__(self) -> AsyncListener:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await self.join()


_END = object()
_OVERFLOW = object()


class Notifications:
    """An async iterator over one channel's notifications, with a bounded buffer.

    Made by ``AsyncListener.notifications()``. Also an async context manager,
    and ``aclose()``-able, for a removal at a known moment; a ``break`` out
    of ``async for`` removes the callback once the iterator is collected.
    """

    def __init__(
        self,
        listener: AsyncListener,
        channel: str,
        max_buffer: int,
        catch_up: CatchUp | None,
    ) -> None:
        self._listener = listener
        self._channel = channel
        self._max_buffer = max_buffer
        self._catch_up = catch_up
        self._buffer: asyncio.Queue[Any] = asyncio.Queue()
        self._kept = 0
        self._state = "new"  # then "listening", "overflowed", "closed"
        # The registered callback holds the iterator weakly: a consumer that
        # breaks out of its loop drops the iterator, whose __del__ removes it.
        stream = weakref.ref(self)

        def put(notify: Notify) -> None:
            if (alive := stream()) is not None:
                alive._put(notify)

        self._callback = put

    def _put(self, notify: Notify) -> None:
        if self._state != "listening":
            return
        if self._kept >= self._max_buffer:
            self._state = "overflowed"
            self._buffer.put_nowait(_OVERFLOW)  # where the gap is
            return
        self._kept += 1
        self._buffer.put_nowait(notify)

    def _end(self) -> None:
        """The listener stopped: the iterator ends after what it kept."""
        self._buffer.put_nowait(_END)

    def __aiter__(self) -> Notifications:
        return self

    async def __anext__(self) -> Notify:
        if self._state == "closed":
            raise StopAsyncIteration
        if self._state == "new":
            self._state = "listening"
            try:
                await self._listener.add_callback(
                    self._callback, self._channel, catch_up=self._catch_up
                )
            except BaseException:
                # Cancelled, say, while the LISTEN was on its way: it may be
                # applied all the same, and the removal queued after it.
                self._close()
                raise
        try:
            item = await self._buffer.get()
        except BaseException:
            self._close()
            raise
        if item is _END:
            self._close()
            raise StopAsyncIteration
        if item is _OVERFLOW:
            self._close()
            raise BufferOverflow(
                f"the consumer of channel {self._channel!r} fell"
                f" {self._max_buffer} notifications behind: later ones were not kept"
            )
        self._kept -= 1
        return item  # type: ignore[no-any-return]

    def _close(self) -> None:
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self._state = "closed"
        listener = self._listener
        if listener.is_alive():
            # A concurrent.futures one: nothing to await, nothing to warn about
            # if nobody looks at it.
            listener._request("remove", self._callback, self._channel)

    async def aclose(self) -> None:
        """Remove the callback now."""
        self._close()

    async def __aenter__(self) -> Notifications:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()

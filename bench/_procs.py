"""The benchmark's child processes: one sender, and one process per receiver.

Each receiver runs in a process of its own so that its CPU time
(``time.process_time()``, every thread included) and its peak RSS belong to
it alone; the sender is another process, so producing notifications never
costs the receiver anything. Both obey commands sent over a
``multiprocessing`` pipe by ``run.py``.

Clocks: ``time.monotonic()`` is CLOCK_MONOTONIC on Linux, one clock for the
whole machine, so a timestamp taken in the sender can be compared with one
taken in a receiver.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

import psycopg

KINDS = (
    "raw psycopg",
    "asyncpg",
    "Listener(0)",
    "Listener(pool)",
    "Listener(ordered)",
    "psycopg async",
    "AsyncListener(0)",
    "AsyncListener",
)
"""The receivers, in the order of the table; the first is the yardstick."""

NOTIFY_SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p"
BATCH = 5_000
"""Notifications per statement: big enough that the round trip is amortised."""

COLLECT_TIMEOUT = 300.0

Callback = Callable[..., object]


# -- the sender ---------------------------------------------------------------


def sender_main(dsn: str, pipe: Connection) -> None:
    """Send notifications on command; answer with when sending began and ended.

    ``("burst", channel, n)`` sends ``n`` unique payloads as fast as one
    connection can; the payloads are built before the clock starts, so the
    figure is the ceiling of the server plus psycopg's array adaptation.
    ``("paced", channel, n, rate)`` sends ``n`` payloads at ``rate`` per
    second, in small batches stamped ``"<seq>:<monotonic_ns>"`` just before
    each statement, for the latency figures.
    """
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        while True:
            command = pipe.recv()
            if command[0] == "exit":
                return
            if command[0] == "burst":
                _, channel, n = command
                batches = [
                    [str(i) for i in range(start, min(start + BATCH, n))]
                    for start in range(0, n, BATCH)
                ]
                started = time.monotonic()
                for batch in batches:
                    cur.execute(NOTIFY_SQL, (channel, batch), prepare=True)
                pipe.send((started, time.monotonic()))
            elif command[0] == "paced":
                _, channel, n, rate = command
                pipe.send(_send_paced(cur, channel, n, rate))


def _send_paced(
    cur: psycopg.Cursor[Any], channel: str, n: int, rate: float
) -> tuple[float, float]:
    per_batch = 10
    interval = per_batch / rate
    started = next_at = time.monotonic()
    for start in range(0, n, per_batch):
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += interval
        stamp = time.monotonic_ns()
        batch = [f"{i}:{stamp}" for i in range(start, min(start + per_batch, n))]
        cur.execute(NOTIFY_SQL, (channel, batch), prepare=True)
    return started, time.monotonic()


# -- the probe: what every receiver calls --------------------------------------


class Probe:
    """Counts notifications; its ``callback`` is the "no-op" every receiver gets.

    The counting is one C call (``next`` on ``itertools.count``, atomic under
    the GIL, so pool workers may share it) and a comparison; the last
    notification stamps the time and sets ``done``.
    """

    def __init__(self, n: int, mode: str, sleep: float):
        self.n = n
        self.done = threading.Event()
        self.t_end = 0.0
        self.stamps: list[tuple[str, int]] = []
        self._counter = itertools.count(1)
        self.callback: Callback
        if mode == "latency":
            self.callback = self._stamp
        elif mode == "burst":
            self.callback = self._sleep
            self._sleep_for = sleep
        else:
            self.callback = self._count

    @property
    def received(self) -> int:
        # Reading an itertools.count without advancing it: its repr holds the value.
        return int(repr(self._counter)[6:-1]) - 1

    def _count(self, *_: object) -> None:
        if next(self._counter) == self.n:
            self.t_end = time.monotonic()
            self.done.set()

    def _stamp(self, *args: Any) -> None:
        payload = args[-1]
        if not isinstance(payload, str):  # a Notify; asyncpg passes the payload
            payload = payload.payload
        self.stamps.append((payload, time.monotonic_ns()))
        self._count()

    def _sleep(self, *_: object) -> None:
        time.sleep(self._sleep_for)
        self._count()

    def latencies_us(self) -> list[float]:
        """Send-to-callback delays, skipping the first batches (connection warm-up)."""
        values = sorted(
            (received - int(payload.split(":")[1])) / 1000
            for payload, received in self.stamps[50:]
        )
        return values or [0.0]


# -- the receivers -------------------------------------------------------------


class Receiver(Protocol):
    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None: ...

    def stop(self, finished: bool) -> float | None:
        """Tear down; the seconds ``stop()`` to ``join()`` took, for a Listener."""


class RawPsycopg:
    """(a) The loop a user writes without a library: ``conn.notifies()``."""

    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(f'LISTEN "{channel}"')

        def loop() -> None:
            for notify in self._conn.notifies(stop_after=n):
                callback(notify)

        self._thread = threading.Thread(target=loop, name="raw-loop", daemon=True)
        self._thread.start()

    def stop(self, finished: bool) -> float | None:
        if finished:  # otherwise the loop still waits; the process exits anyway
            self._thread.join()
            self._conn.close()
        return None


class Asyncpg:
    """(b) asyncpg's ``add_listener``, its event loop in a thread of its own."""

    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="asyncpg-loop", daemon=True
        )
        self._thread.start()
        self._run(self._connect(dsn, channel, callback))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _connect(self, dsn: str, channel: str, callback: Callback) -> None:
        import asyncpg  # type: ignore[import-untyped]

        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self._conn = await asyncpg.connect(
            host=params.get("host"),
            port=params.get("port"),
            user=params.get("user"),
            password=params.get("password"),
            database=params.get("dbname"),
        )
        await self._conn.add_listener(channel, callback)

    def stop(self, finished: bool) -> float | None:
        if finished:
            self._run(self._conn.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        return None


class Ours:
    """(c), (d), (e) This library's ``Listener``: inline, default pool, ordered."""

    def __init__(self, max_workers: int | None, order_by: str | None = None):
        self._max_workers = max_workers
        self._order_by = order_by

    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None:
        from classic.pg.listener import Listener

        self._listener = Listener(
            lambda: psycopg.connect(dsn, autocommit=True),
            max_workers=self._max_workers,
            autoload_plugins=False,
            order_by=self._order_by,
        )
        future = self._listener.add_callback(callback, channel)
        self._listener.start()
        future.result(30)

    def stop(self, finished: bool) -> float | None:
        started = time.perf_counter()
        self._listener.stop()
        self._listener.join()
        return time.perf_counter() - started


class _LoopThread:
    """An event loop in a thread of its own, as an asyncio service runs one."""

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-loop", daemon=True
        )
        self._thread.start()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


class PsycopgAsync(_LoopThread):
    """(f) The loop an asyncio user writes: ``AsyncConnection.notifies()``."""

    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None:
        self._start_loop()
        self._task = self._run(self._listen(dsn, channel, callback, n))

    async def _listen(
        self, dsn: str, channel: str, callback: Callback, n: int
    ) -> asyncio.Task[None]:
        self._conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await self._conn.execute(f'LISTEN "{channel}"')

        async def loop() -> None:
            async for notify in self._conn.notifies(stop_after=n):
                callback(notify)

        return asyncio.get_running_loop().create_task(loop())

    def stop(self, finished: bool) -> float | None:
        if finished:
            self._run(self._close())
            self._stop_loop()
        return None

    async def _close(self) -> None:
        await self._task
        await self._conn.close()


class AsyncOurs(_LoopThread):
    """(g), (h) This library's ``AsyncListener``: awaited in order, or in tasks."""

    def __init__(self, max_concurrency: int | None):
        self._max_concurrency = max_concurrency

    def start(self, dsn: str, channel: str, callback: Callback, n: int) -> None:
        self._start_loop()
        self._run(self._listen(dsn, channel, callback))

    async def _listen(self, dsn: str, channel: str, callback: Callback) -> None:
        from classic.pg.listener import AsyncListener

        self._listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
            max_concurrency=self._max_concurrency,
            autoload_plugins=False,
        )
        self._listener.start()
        await self._listener.add_callback(callback, channel)

    def stop(self, finished: bool) -> float | None:
        started = time.perf_counter()
        self._run(self._stop())
        elapsed = time.perf_counter() - started
        self._stop_loop()
        return elapsed

    async def _stop(self) -> None:
        self._listener.stop()
        await self._listener.join()


def make_receiver(kind: str) -> Receiver:
    if kind == "raw psycopg":
        return RawPsycopg()
    if kind == "asyncpg":
        return Asyncpg()
    if kind == "Listener(0)":
        return Ours(0)
    if kind == "Listener(pool)":
        return Ours(None)
    if kind == "Listener(ordered)":
        return Ours(None, order_by="channel")
    if kind == "psycopg async":
        return PsycopgAsync()
    if kind == "AsyncListener(0)":
        return AsyncOurs(0)
    if kind == "AsyncListener":
        return AsyncOurs(None)
    raise ValueError(f"unknown receiver {kind!r}")


def rss_mb() -> float:
    """The resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def receiver_main(kind: str, dsn: str, pipe: Connection) -> None:
    """Serve measurements for one receiver kind until told to exit.

    ``("setup", mode, channel, n, sleep)`` starts a fresh receiver listening
    on ``channel`` and answers ``"ready"`` once it listens; ``("collect",
    wait)`` waits (if ``wait``) for the ``n``-th notification, then answers
    with the CPU seconds since ready, the time of the last callback, the
    latencies, RSS, and how long ``stop()`` to ``join()`` took.
    """
    probe: Probe | None = None
    receiver: Receiver | None = None
    cpu0 = 0.0
    rss0 = 0.0
    while True:
        command = pipe.recv()
        if command[0] == "exit":
            pipe.close()
            os._exit(0)  # skip interpreter teardown: loops may still wait
        if command[0] == "setup":
            _, mode, channel, n, sleep = command
            probe = Probe(n, mode, sleep)
            receiver = make_receiver(kind)
            receiver.start(dsn, channel, probe.callback, n)
            rss0 = rss_mb()
            cpu0 = time.process_time()
            pipe.send(("ready", os.getpid()))
        elif command[0] == "collect":
            assert probe is not None
            assert receiver is not None
            if command[1] and not probe.done.wait(COLLECT_TIMEOUT):
                raise TimeoutError(f"{kind}: only {probe.received}/{probe.n} arrived")
            cpu = time.process_time() - cpu0
            result: dict[str, Any] = {
                "cpu": cpu,
                "t_end": probe.t_end,
                "received": probe.received,
                "rss0": rss0,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            if probe.stamps:
                lat = probe.latencies_us()
                result["p50"] = lat[len(lat) // 2]
                result["p99"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            result["stop_join"] = receiver.stop(bool(command[1]))
            pipe.send(("result", result))

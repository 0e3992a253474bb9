"""What plugins cost the serving hot path: drain a backlog with and without them.

    python bench/plugin_overhead.py [--n 200000] [--repeat 5] [--dsn DSN]

Each run builds a listener with ``max_workers=0`` (callbacks inline, so the
serving thread does all the work and the figure is its own), parks the
serving thread inside a callback on a gate channel, queues ``n``
notifications at the server in one statement, then opens the gate and times
until the last one has reached its callback. The variants differ only in the
plugin registered:

- ``none``: no plugin at all;
- ``unrelated``: a plugin implementing hooks that are not per notification
  (``listener_ping``, ``listener_connected``): the claim under test is that
  this costs nothing measurable;
- ``notification`` / ``callback_done``: a no-op implementation of one
  per-notification hook, for scale.

Runs are interleaved (none, unrelated, ..., none, unrelated, ...) so that a
drift of the machine spreads over every variant; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from typing import Any

import psycopg

from classic.pg.listener import Listener, hookimpl

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
WAIT = 120.0


class Unrelated:
    @hookimpl
    def listener_ping(self, duration: float) -> None:
        pass

    @hookimpl
    def listener_connected(self) -> None:
        pass


class OnNotification:
    @hookimpl
    def listener_notification(self, notify: Any) -> None:
        pass


class OnCallbackDone:
    @hookimpl
    def listener_callback_done(self, duration: float) -> None:
        pass


VARIANTS: dict[str, list[object]] = {
    "none": [],
    "unrelated": [Unrelated()],
    "notification": [OnNotification()],
    "callback_done": [OnCallbackDone()],
}


def drain(dsn: str, n: int, plugins: list[object]) -> float:
    """Seconds for the serving thread to take ``n`` queued notifications through."""
    channel = f"bench_{uuid.uuid4().hex[:12]}"
    gate = f"{channel}_gate"
    parked, release, done = threading.Event(), threading.Event(), threading.Event()
    count = 0

    def on_gate(notify: Any) -> None:
        parked.set()
        release.wait(WAIT)

    def on_notify(notify: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    listener = Listener(
        lambda: psycopg.connect(dsn, autocommit=True),
        max_workers=0,
        ping_period=0,
        autoload_plugins=False,
        plugins=plugins,
    )
    listener.add_callback(on_notify, channel)
    added = listener.add_callback(on_gate, gate)
    with listener, psycopg.connect(dsn, autocommit=True) as conn:
        added.result(WAIT)
        conn.execute("SELECT pg_notify(%s, '')", (gate,))
        assert parked.wait(WAIT), "the gate callback never ran"
        conn.execute(
            "SELECT pg_notify(%s, i::text) FROM generate_series(1, %s) AS i",
            (channel, n),
        )
        started = time.perf_counter()
        release.set()
        assert done.wait(WAIT), f"only {count} of {n} notifications arrived"
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, DEFAULT_DSN))
    args = parser.parse_args(argv)

    drain(args.dsn, min(args.n, 10_000), [])  # warm up imports and the server
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeat):
        for name, plugins in VARIANTS.items():
            times[name].append(drain(args.dsn, args.n, plugins))

    base = statistics.median(times["none"])
    print(f"drain of {args.n:,} notifications, max_workers=0, {args.repeat} runs each")
    print(f"{'plugin':<15}{'median s':>10}{'min s':>9}{'notif/s':>12}{'vs none':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<15}{median:>10.3f}{min(values):>9.3f}"
            f"{args.n / median:>12,.0f}{(median / base - 1) * 100:>+8.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Volume: nothing lost, nothing doubled, memory bounded by ``max_backlog``.

Heavy (seconds each, not milliseconds): marked ``slow``; CI runs them in a
step of their own. The figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener.testing import WAIT

pytestmark = pytest.mark.slow

# Unique to this run: another run on the same server must not add to the counts.
CHANNELS = [f"vol_{uuid.uuid4().hex[:8]}_{x}" for x in "abcd"]
BATCH = 10_000
"""Notifications per statement: one round trip each, not one per notification."""


def send(conn: psycopg.Connection[Any], total: int, payload_size: int = 0) -> None:
    """Send ``total`` numbered notifications round-robin over ``CHANNELS``.

    Payloads are ``"<n>"`` (padded to ``payload_size``): unique, so that
    PostgreSQL's folding of duplicates within a transaction drops none. The
    server makes them, so the sender adds nothing to this process's memory.
    """
    for start in range(0, total, BATCH):
        conn.execute(
            "SELECT pg_notify((%s::text[])[n %% %s + 1],"
            " rpad(n::text, greatest(%s, length(n::text)), '.'))"
            " FROM generate_series(%s::int, %s::int) AS n",
            (
                CHANNELS,
                len(CHANNELS),
                payload_size,
                start,
                min(start + BATCH, total) - 1,
            ),
        )


@pytest.mark.parametrize("max_workers", [0, 4], ids=["inline", "pool"])
def test_exactly_once_while_connected(make_listener, conn, max_workers):
    total = 100_000
    lock = threading.Lock()
    arrived: dict[str, list[int]] = defaultdict(list)
    count = 0
    done = threading.Event()

    def callback(notify: Notify) -> None:
        nonlocal count
        with lock:
            arrived[notify.channel].append(int(notify.payload))
            count += 1
            if count == total:
                done.set()

    listener = make_listener(max_workers=max_workers)
    futures = [listener.add_callback(callback, c) for c in CHANNELS]
    listener.start()
    for future in futures:
        future.result(WAIT)

    began = time.monotonic()
    send(conn, total)
    assert done.wait(WAIT * 5), f"{count} of {total} arrived"
    took = time.monotonic() - began
    print(f"\n{total:,} notifications, max_workers={max_workers}: {took:.2f} s")
    listener.stop()
    listener.join(WAIT)

    assert count == total
    for i, c in enumerate(CHANNELS):
        expected = list(range(i, total, len(CHANNELS)))
        if max_workers == 0:
            assert arrived[c] == expected  # exactly once, in order
        else:
            assert sorted(arrived[c]) == expected  # exactly once


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0) so it measures this test, not earlier ones."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def test_burst_with_slow_callback_stays_bounded(make_listener, conn):
    total, max_backlog, payload_size = 200_000, 200, 100
    # One byte per notification: a dict would grow by more than the bound.
    seen = bytearray(total)
    count = 0
    lock = threading.Lock()
    done = threading.Event()
    peak_backlog = 0

    def slow(notify: Notify) -> None:
        nonlocal peak_backlog, count
        time.sleep(0.0002)
        with lock:
            number = int(notify.payload.rstrip("."))
            if not seen[number]:
                count += 1
            seen[number] = min(seen[number] + 1, 255)
            peak_backlog = max(peak_backlog, listener.backlog)
            if count == total:
                done.set()

    listener = make_listener(max_workers=8, max_backlog=max_backlog)
    futures = [listener.add_callback(slow, c) for c in CHANNELS]
    listener.start()
    for future in futures:
        future.result(WAIT)

    # Sample the resident set while the burst goes through.
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append(_kib("VmRSS"))
            sampling.wait(0.01)

    baseline = _kib("VmRSS")
    hwm_reset = _reset_peak()
    sampler = threading.Thread(target=sample, name="rss-sampler")
    sampler.start()
    began = time.monotonic()
    try:
        send(conn, total, payload_size)
        sent = time.monotonic() - began
        assert done.wait(WAIT * 5), f"{count} of {total} arrived"
    finally:
        sampling.set()
        sampler.join(WAIT)
    took = time.monotonic() - began
    listener.stop()
    listener.join(WAIT)

    peak = max([*samples, _kib("VmHWM") if hwm_reset else 0])
    growth = peak - baseline
    # What the data would take if the listener read it all: the payload
    # strings alone, before any Notify object, tuple or list around them.
    unbounded_kib = total * (payload_size + 49) // 1024
    # What a bounded listener may hold: the backlog (a few KiB each, counted
    # very generously) plus one socket read's worth of libpq buffers and
    # parsed notifications (libpq reads 16 KiB at a time), plus the
    # allocator's and the threads' slack.
    bound_kib = max_backlog * 4 + 4 * 1024
    print(
        f"\nburst of {total:,} x {payload_size} B, max_backlog={max_backlog}:"
        f" sent in {sent:.2f} s, delivered in {took:.2f} s,"
        f" peak backlog {peak_backlog}, RSS {baseline:,} KiB -> peak {peak:,} KiB"
        f" (+{growth:,} KiB; bound {bound_kib:,} KiB; all read at once would"
        f" be > {unbounded_kib:,} KiB)"
    )
    assert count == total, "notifications were dropped"
    assert set(seen) == {1}, "notifications were doubled"
    assert peak_backlog <= max_backlog
    assert growth < bound_kib < unbounded_kib

"""I/O-bound callbacks: how the pool scales with ``max_workers``.

    python bench/scaling.py [--n 2000] [--sleep 0.001] [--repeat 3]

Each callback sleeps (``--sleep``, 1 ms: a query, an HTTP call), which
releases the GIL as I/O does. N notifications are committed in one
transaction; the clock runs from the commit to the N-th callback. Inline
(``max_workers=0``) runs them one after the other: the yardstick.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid

import psycopg

from classic.pg.listener import Listener

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
NOTIFY_SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p"
WORKERS = (0, 1, 4, 16, 32)


def drain(dsn: str, workers: int, n: int, sleep: float) -> float:
    """Notifications per second through a Listener with ``workers``."""
    channel = f"scaling_{uuid.uuid4().hex[:12]}"
    done = threading.Event()
    lock = threading.Lock()
    count = 0

    def callback(_: object) -> None:
        nonlocal count
        time.sleep(sleep)
        with lock:
            count += 1
            if count == n:
                done.set()

    listener = Listener(
        lambda: psycopg.connect(dsn, autocommit=True),
        max_workers=workers,
        autoload_plugins=False,
    )
    future = listener.add_callback(callback, channel)
    with listener:
        future.result(30)
        with psycopg.connect(dsn) as conn:
            conn.execute(NOTIFY_SQL, (channel, [str(i) for i in range(n)]))
            conn.commit()
            started = time.perf_counter()
        if not done.wait(600):
            raise TimeoutError(f"max_workers={workers}: {count} of {n}")
        return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("CLASSIC_PG_LISTENER_TEST_DSN", DEFAULT_DSN)
    )
    parser.add_argument("--n", type=int, default=2_000)
    parser.add_argument("--sleep", type=float, default=0.001)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rates: dict[int, list[float]] = {w: [] for w in WORKERS}
    for rep in range(args.repeat):
        for workers in WORKERS:
            # Inline takes n * sleep: a tenth of n is enough for its rate.
            n = max(100, args.n // 10) if workers <= 1 else args.n
            rates[workers].append(drain(args.dsn, workers, n, args.sleep))
            print(f"[{rep + 1}/{args.repeat}] max_workers={workers}", file=sys.stderr)
    inline = statistics.median(rates[0])
    print(
        f"callbacks sleeping {args.sleep * 1000:g} ms, N={args.n:,},"
        f" median of {args.repeat}"
    )
    print(f"{'max_workers':<14}{'notif/s':>10}{'x inline':>10}")
    for workers in WORKERS:
        rate = statistics.median(rates[workers])
        label = "0 (inline)" if workers == 0 else str(workers)
        print(f"{label:<14}{rate:>10,.0f}{rate / inline:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

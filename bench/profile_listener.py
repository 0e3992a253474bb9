"""Drain a backlog through one Listener, for a profiler to watch.

    py-spy record -r 1000 -f raw -o /tmp/listener.txt -- \\
        python bench/profile_listener.py --workers 0 --n 1000000

A second connection in this process sends every notification in one
transaction: PostgreSQL delivers them only at commit, so the listener then
drains a full queue while the sender is idle, and the profile shows the
receive path alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time

import psycopg

from classic.pg.listener import Listener

SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "CLASSIC_PG_LISTENER_TEST_DSN", "host=127.0.0.1 dbname=test user=postgres"
        ),
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=-1, help="-1: default pool")
    args = parser.parse_args()
    n, channel = args.n, f"profile_{os.getpid()}"
    done = threading.Event()
    counter = itertools.count(1)

    def callback(_: object) -> None:
        if next(counter) == n:
            done.set()

    listener = Listener(
        lambda: psycopg.connect(args.dsn, autocommit=True),
        max_workers=None if args.workers < 0 else args.workers,
        autoload_plugins=False,
    )
    future = listener.add_callback(callback, channel)
    listener.start()
    future.result(10)
    with psycopg.connect(args.dsn) as conn:  # one transaction: delivered at commit
        for start in range(0, n, 5_000):
            batch = [str(i) for i in range(start, min(start + 5_000, n))]
            conn.execute(SQL, (channel, batch), prepare=True)
        conn.commit()
        started = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - started
    listener.stop()
    listener.join()
    print(f"{n:,} in {elapsed:.2f} s: {n / elapsed:,.0f}/s")


if __name__ == "__main__":
    main()

"""Messages per second through the durable outbox with 1, 2 and 4 consumer processes.

    python bench/outbox.py [--n 20000] [--repeat 3] [--consumers 1,2,4] [--dsn DSN]

Each round: a fresh outbox table and effects table; the consumer processes
(``plugins/classic-pg-listener-outbox/tests/outbox_proc.py consume``, the
ones the tests run: a Listener, an Outbox, a handler inserting one row per
message in its own table) start and report ``ready``; then N messages are
sent over 4 channels in one transaction, so they appear at one instant, the
commit; the clock runs from the commit until the N-th effect is visible.
Figures are medians over ``--repeat`` rounds, and each is given as a ratio to
one consumer measured in the same run, since the machine's speed (and what
else runs on it) moves the absolute numbers; the last column is the median
of each repetition's own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from classic_pg_listener_outbox import install, send_many
from psycopg import sql

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
PROC = (
    Path(__file__)
    .resolve()
    .parent.parent.joinpath(
        "plugins", "classic-pg-listener-outbox", "tests", "outbox_proc.py"
    )
)
CHANNELS = 4
TIMEOUT = 300.0


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        raise RuntimeError(f"consumer {proc.pid} did not start: {line!r}")


def one_round(dsn: str, consumers: int, n: int, batch_size: int, workers: int) -> float:
    """Messages per second for ``consumers`` processes draining ``n`` messages."""
    suffix = uuid.uuid4().hex[:12]
    table, effects = f"bench_outbox_{suffix}", f"bench_effects_{suffix}"
    channels = [f"bench_{suffix}_{i}" for i in range(CHANNELS)]
    procs: list[subprocess.Popen[str]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        install(conn, table)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, channel text NOT NULL,"
                " payload text NOT NULL, pid int NOT NULL, seq bigserial)"
            ).format(sql.Identifier(effects))
        )
        try:
            for _ in range(consumers):
                args = ["consume", dsn, table, effects, ",".join(channels)]
                args += ["--batch-size", str(batch_size), "--workers", str(workers)]
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(PROC), *args],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for proc in procs:
                _wait_ready(proc)
            with conn.transaction():
                for i, channel in enumerate(channels):
                    payloads = [str(j) for j in range(i, n, CHANNELS)]
                    send_many(conn, channel, payloads, table=table)
            started = time.monotonic()
            while _count(conn, effects) < n:
                if time.monotonic() - started > TIMEOUT:
                    raise TimeoutError(f"{consumers} consumers: not drained")
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            if _count(conn, table):
                raise RuntimeError("messages left in the outbox (dead or retried)")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
                if proc.stdout is not None:
                    proc.stdout.close()
            for name in (table, effects):
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure")
    parser.add_argument("--consumers", default="1,2,4", help="process counts")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="threads per process")
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, DEFAULT_DSN))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.consumers.split(",")]

    rates: dict[int, list[float]] = {c: [] for c in counts}
    for round_ in range(args.repeat):
        for c in counts:  # interleaved: a slow minute hurts every figure alike
            rate = one_round(args.dsn, c, args.n, args.batch_size, args.workers)
            rates[c].append(rate)
            print(
                f"round {round_ + 1}: {c} consumers {rate:,.0f} msg/s", file=sys.stderr
            )

    medians = {c: statistics.median(r) for c, r in rates.items()}
    base = medians[counts[0]]
    # Rounds of one repetition run seconds apart, under about the same load
    # from the rest of the machine: their ratios are steadier than the rates.
    first = rates[counts[0]]
    round_ratios = {
        c: statistics.median(r / b for r, b in zip(rates[c], first, strict=True))
        for c in counts
    }
    print(
        f"outbox drain, N={args.n:,}, batch_size={args.batch_size},"
        f" workers={args.workers} per process,"
    )
    print(f"median of {args.repeat}, on {os.cpu_count()} CPUs")
    print(
        f"| consumers | messages/s | ratio to {counts[0]} |"
        f" median of per-round ratios |"
    )
    print("|----------:|-----------:|-----------:|-----------:|")
    for c in counts:
        print(
            f"| {c} | {medians[c]:,.0f} | {medians[c] / base:.2f} |"
            f" {round_ratios[c]:.2f} |"
        )
    if args.json:
        figures = {"rates": rates, "medians": medians, "round_ratios": round_ratios}
        Path(args.json).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Instructions per notification in the receiving process, counted by callgrind.

    python bench/instructions.py                       # every receiver, table
    python bench/instructions.py --check bench/instructions-baseline.json
    python bench/instructions.py --write-baseline bench/instructions-baseline.json

Wall-clock figures on a shared 2-core machine swing by a factor of two; the
instructions a process executes do not. Each receiver runs under
``valgrind --tool=callgrind`` twice, draining N1 and N2 notifications that
were committed in one transaction (so they arrive as one queue, read in full
socket buffers whatever the speed); the slope ``(I(N2) - I(N1)) / (N2 - N1)``
is the cost of one notification, start-up, imports and teardown cancelled.

``--check`` fails (exit status 1) when the Listener inline's or the pool's
figure grows more than ``--tolerance`` (10%) over the committed baseline:
a regression shows up in CI even on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import Notify

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
NOTIFY_SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p"

KINDS = (
    "raw psycopg",
    "pgconn floor",
    "Listener(0)",
    "Listener(pool)",
    "Listener(ordered)",
    "AsyncListener",
    "asyncpg",
)
"""The receivers, in the order of the table; the first is the yardstick."""

CHECKED = ("Listener(0)", "Listener(pool)")
"""The receivers ``--check`` holds to the baseline."""


# -- the receivers (run under valgrind, in a process of their own) ------------------


class Counter:
    """The no-op callback: counts, and sets ``done`` at the n-th call."""

    def __init__(self, n: int):
        self.n = n
        self.count = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *_: object) -> None:
        # A lock: pool workers call it from several threads.
        with self._lock:
            self.count += 1
            if self.count == self.n:
                self.done.set()


def receive(kind: str, dsn: str, channel: str, n: int) -> None:
    """Listen on ``channel``, say ``ready`` on stdout, take ``n`` notifications."""
    counter = Counter(n)
    if kind == "raw psycopg":
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'LISTEN "{channel}"')
            _ready()
            for notify in conn.notifies(stop_after=n):
                counter(notify)
    elif kind == "pgconn floor":
        _pgconn_floor(dsn, channel, counter)
    elif kind == "asyncpg":
        asyncio.run(_asyncpg(dsn, channel, counter))
    elif kind == "AsyncListener":
        asyncio.run(_async_listener(dsn, channel, counter))
    else:
        from classic.pg.listener import Listener

        options: dict[str, Any] = {"max_workers": 0} if kind == "Listener(0)" else {}
        if kind == "Listener(ordered)":
            options["order_by"] = "channel"
        listener = Listener(
            lambda: psycopg.connect(dsn, autocommit=True),
            autoload_plugins=False,
            **options,
        )
        future = listener.add_callback(counter, channel)
        listener.start()
        future.result(60)
        _ready()
        counter.done.wait()
        listener.stop()
        listener.join()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _pgconn_floor(dsn: str, channel: str, callback: Counter) -> None:
    """The naive libpq-level loop: ``consume_input()``, then ``notifies()``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'LISTEN "{channel}"')
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        _ready()
        with selectors.DefaultSelector() as selector:
            selector.register(pgconn.socket, selectors.EVENT_READ)
            while not callback.done.is_set():
                selector.select()
                pgconn.consume_input()
                while (pgnotify := pgconn.notifies()) is not None:
                    callback(
                        Notify(
                            pgnotify.relname.decode(encoding),
                            pgnotify.extra.decode(encoding),
                            pgnotify.be_pid,
                        )
                    )


async def _async_listener(dsn: str, channel: str, callback: Counter) -> None:
    from classic.pg.listener import AsyncListener

    async with AsyncListener(
        lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
        autoload_plugins=False,
    ) as listener:
        await listener.add_callback(callback, channel)
        _ready()
        await asyncio.get_running_loop().run_in_executor(None, callback.done.wait)


async def _asyncpg(dsn: str, channel: str, callback: Counter) -> None:
    import asyncpg  # type: ignore[import-untyped]

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    conn = await asyncpg.connect(
        host=params.get("host"),
        port=params.get("port"),
        user=params.get("user"),
        database=params.get("dbname"),
    )
    done = asyncio.Event()

    def on_notify(*args: object) -> None:
        callback(*args)
        if callback.count == callback.n:
            done.set()

    await conn.add_listener(channel, on_notify)
    _ready()
    await done.wait()
    await conn.close()


# -- the driver ---------------------------------------------------------------------


def count_instructions(kind: str, dsn: str, n: int) -> int:
    """Instructions (callgrind's Ir) of one receiver process taking ``n``."""
    channel = f"instr_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        command = [
            *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
            *(sys.executable, __file__, "--receive", kind),
            *("--dsn", dsn, "--channel", channel, "--n", str(n)),
        ]
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as receiver:
            assert receiver.stdout is not None
            line = receiver.stdout.readline()
            if line.strip() != "ready":
                receiver.kill()
                _, stderr = receiver.communicate()
                raise RuntimeError(f"{kind}: receiver failed: {stderr}")
            _send(dsn, channel, n)
            _, stderr = receiver.communicate(timeout=600)
        if receiver.returncode != 0:
            raise RuntimeError(
                f"{kind}: receiver exited {receiver.returncode}: {stderr}"
            )
        with open(out) as f:
            totals = re.search(r"^(?:totals|summary): (\d+)", f.read(), re.MULTILINE)
        if totals is None:
            raise RuntimeError(f"{kind}: no totals in callgrind's output")
        return int(totals.group(1))


def _send(dsn: str, channel: str, n: int) -> None:
    """``n`` unique payloads in one transaction: delivered at once, at commit."""
    with psycopg.connect(dsn) as conn:
        for start in range(0, n, 5_000):
            batch = [str(i) for i in range(start, min(start + 5_000, n))]
            conn.execute(NOTIFY_SQL, (channel, batch))


def measure(
    kinds: tuple[str, ...], dsn: str, n1: int, n2: int, jobs: int
) -> dict[str, float]:
    """Instructions per notification for each kind: the slope between n1 and n2."""
    runs = [(kind, n) for kind in kinds for n in (n1, n2)]
    counts: dict[tuple[str, int], int] = {}

    def one(run: tuple[str, int]) -> None:
        counts[run] = count_instructions(run[0], dsn, run[1])
        print(f"  {run[0]} N={run[1]:,}: {counts[run]:,} Ir", file=sys.stderr)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, runs))
    return {kind: (counts[kind, n2] - counts[kind, n1]) / (n2 - n1) for kind in kinds}


def render(per_notification: dict[str, float]) -> str:
    base = per_notification.get(KINDS[0])
    inline = per_notification.get("Listener(0)")
    header = f"{'receiver':<36}{'instructions/notif':>20}{'x raw':>8}{'x inline':>10}"
    lines = [header, "-" * len(header)]
    for kind, value in per_notification.items():
        x_raw = f"{value / base:.2f}" if base else ""
        x_inline = f"{value / inline:.2f}" if inline else ""
        lines.append(f"{kind:<36}{value:>20,.0f}{x_raw:>8}{x_inline:>10}")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "machine": platform.machine(),
    }


def check(
    per_notification: dict[str, float], baseline_path: str, tolerance: float
) -> list[str]:
    """The receivers that grew more than ``tolerance`` over the baseline."""
    with open(baseline_path) as f:
        baseline = json.load(f)
    if baseline["environment"] != environment():
        print(
            f"note: baseline taken on {baseline['environment']},"
            f" this run on {environment()}",
            file=sys.stderr,
        )
    failures = []
    for kind in CHECKED:
        old, new = baseline["per_notification"][kind], per_notification[kind]
        verdict = "FAIL" if new > old * (1 + tolerance) else "ok"
        print(
            f"[{verdict}] {kind}: {new:,.0f} vs baseline {old:,.0f} ({new / old:.2f}x)"
        )
        if verdict == "FAIL":
            failures.append(kind)
    return failures


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, DEFAULT_DSN))
    parser.add_argument("--n1", type=int, default=2_000)
    parser.add_argument("--n2", type=int, default=8_000)
    parser.add_argument("--kinds", help="comma-separated receivers (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="receivers run at once")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the lowest wins")
    parser.add_argument("--check", metavar="BASELINE", help="fail on a regression")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--write-baseline", metavar="PATH")
    parser.add_argument("--receive", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.receive:
        receive(args.receive, args.dsn, args.channel, args.n)
        return 0
    kinds = KINDS if args.kinds is None else tuple(args.kinds.split(","))
    if args.check:
        kinds = tuple(dict.fromkeys((*kinds, *CHECKED))) if args.kinds else CHECKED
    unknown = set(kinds) - set(KINDS)
    if unknown:
        print(f"unknown receivers: {sorted(unknown)}; known: {KINDS}", file=sys.stderr)
        return 2
    runs = [
        measure(kinds, args.dsn, args.n1, args.n2, args.jobs)
        for _ in range(args.repeat)
    ]
    # The lowest of the runs: the pool's figure moves by a few percent with
    # the order in which valgrind runs its threads, never below the cost.
    per_notification = {kind: min(run[kind] for run in runs) for kind in kinds}
    print(
        f"instructions per notification, slope between N={args.n1:,} and"
        f" {args.n2:,}, lowest of {args.repeat}"
    )
    print(render(per_notification))
    if args.write_baseline:
        with open(args.write_baseline, "w") as f:
            json.dump(
                {
                    "environment": environment(),
                    "n": [args.n1, args.n2],
                    "per_notification": {
                        k: round(v) for k, v in per_notification.items()
                    },
                },
                f,
                indent=1,
            )
            f.write("\n")
    if args.check:
        return 1 if check(per_notification, args.check, args.tolerance) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale: many channels, idle listeners, many listeners in one process.

    python bench/scale.py [--channels 10000,100000] [--listeners 100] [--idle 10]

- LISTEN to C channels with one Listener: the time until every
  ``add_callback`` future resolved, and the memory of the server process
  serving the session (its private RSS, from /proc: the server is local).
- The cost per notification as C grows: N notifications on one of the C
  channels, committed at once, drained inline; wall time per notification
  and the serving thread's CPU per notification.
- An idle listener (pool mode, one channel): threads and RSS it adds.
- 100 idle listeners in one process: their CPU per idle minute.

By default on a throwaway server of its own (``initdb`` in a temporary
directory, as the tests' ``fix_server.py`` makes, with
``max_connections=250``): a hundred listeners would not fit in a shared
server's connections, and 100,000 channels are no one else's business.
``--dsn`` uses a given server instead. Linux only (it reads /proc); the
server must be local, and readable in /proc (root, or the postgres user).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
import uuid
from typing import Any

import psycopg

from classic.pg.listener import Listener

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from fix_server import ThrowawayServer

NOTIFY_SQL = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p"


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/<pid>/status, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_private_mb(pid: int) -> float:
    """What the backend holds of its own: anonymous RSS (shared buffers excluded)."""
    return rss_mb(pid, "RssAnon")


def make(dsn: str, **kwargs: Any) -> Listener:
    return Listener(
        lambda: psycopg.connect(dsn, autocommit=True), autoload_plugins=False, **kwargs
    )


def many_channels(dsn: str, count: int, n: int) -> dict[str, float]:
    prefix = f"scale_{uuid.uuid4().hex[:8]}_"
    got = threading.Event()
    seen = 0

    def callback(_: object) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            got.set()

    listener = make(dsn, max_workers=0)
    listener.start()
    try:
        while listener.backend_pid is None:
            time.sleep(0.01)
        pid = listener.backend_pid
        before = server_private_mb(pid)
        started = time.perf_counter()
        channels = [f"{prefix}{i}" for i in range(count)]
        futures = [listener.add_callback(callback, ch) for ch in channels]
        for future in futures:
            future.result(600)
        listen_s = time.perf_counter() - started
        after = server_private_mb(pid)
        serving = next(t for t in threading.enumerate() if t.name == listener.name)
        cpu0 = _thread_cpu(serving)
        with psycopg.connect(dsn) as conn:
            # The last one listened to: PostgreSQL up to 16 looks each
            # notification's channel up in a list of the session's channels.
            conn.execute(NOTIFY_SQL, (channels[-1], [str(i) for i in range(n)]))
            conn.commit()
            started = time.perf_counter()
        if not got.wait(600):
            raise TimeoutError(f"{seen} of {n}")
        drain_s = time.perf_counter() - started
        cpu = _thread_cpu(serving) - cpu0
    finally:
        listener.stop()
        listener.join()
    return {
        "listen_s": listen_s,
        "server_mb": after - before,
        "us_per_notification": drain_s / n * 1e6,
        "cpu_us_per_notification": cpu / n * 1e6,
    }


def _thread_cpu(thread: threading.Thread) -> float:
    """The CPU seconds of one thread of this process (Linux: /proc/self/task)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def idle_listener(dsn: str) -> dict[str, float]:
    threads0, rss0 = threading.active_count(), rss_mb()
    listener = make(dsn)
    listener.add_callback(print, f"scale_idle_{uuid.uuid4().hex[:8]}")
    listener.start()
    try:
        while listener.backend_pid is None:
            time.sleep(0.01)
        time.sleep(0.2)
        return {
            "threads": threading.active_count() - threads0,
            "rss_mb": rss_mb() - rss0,
        }
    finally:
        listener.stop()
        listener.join()


def many_idle_listeners(dsn: str, count: int, seconds: float) -> dict[str, float]:
    listeners = [make(dsn) for _ in range(count)]
    futures = [
        listener.add_callback(print, f"scale_many_{uuid.uuid4().hex[:8]}")
        for listener in listeners
    ]
    for listener in listeners:
        listener.start()
    try:
        for future in futures:
            future.result(60)
        threads = threading.active_count()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(seconds)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
        return {"threads": threads, "cpu_s_per_min": cpu * 60 / seconds}
    finally:
        for listener in listeners:
            listener.stop()
        for listener in listeners:
            listener.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a server to use (default: a throwaway one)")
    parser.add_argument("--channels", default="1,1000,10000,100000")
    parser.add_argument("--n", type=int, default=100_000, help="notifications drained")
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds")
    args = parser.parse_args(argv)
    if args.dsn:
        return report(args)
    server = ThrowawayServer()
    try:
        server.start()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_connections = 250")
        server.restart()
        args.dsn = server.dsn
        return report(args)
    finally:
        server.destroy()


def report(args: argparse.Namespace) -> int:
    with psycopg.connect(args.dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    print(f"PostgreSQL {row[0] if row else '?'}")
    print(f"LISTEN C channels, then drain {args.n:,} on one of them (inline)")
    print(
        f"{'channels':>10}{'LISTEN s':>10}{'server MB':>11}"
        f"{'us/notif':>10}{'CPU us/notif':>14}"
    )
    for count in map(int, args.channels.split(",")):
        r = many_channels(args.dsn, count, args.n)
        print(
            f"{count:>10,}{r['listen_s']:>10.2f}{r['server_mb']:>11.1f}"
            f"{r['us_per_notification']:>10.2f}{r['cpu_us_per_notification']:>14.2f}",
            flush=True,
        )
    r = idle_listener(args.dsn)
    print(
        f"\nidle Listener (default pool, one channel): +{r['threads']:.0f} thread(s),"
        f" +{r['rss_mb']:.1f} MB RSS"
    )
    r = many_idle_listeners(args.dsn, args.listeners, args.idle)
    print(
        f"{args.listeners} idle Listeners in one process: {r['threads']:.0f} threads,"
        f" {r['cpu_s_per_min']:.3f} CPU s per idle minute"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

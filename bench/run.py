"""Benchmark the Listener against a raw psycopg loop and asyncpg, on one stream.

    python bench/run.py [--n 200000] [--repeat 3] [--quick] [--dsn DSN]

See bench/README.md for what each figure means and how it is taken.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Any

import psycopg

from _procs import COLLECT_TIMEOUT, KINDS, receiver_main, sender_main

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"

# Spawn, not fork: each receiver starts from a clean interpreter, imports only
# what it uses, and owns its RSS.
_mp = multiprocessing.get_context("spawn")


@dataclass
class Figure:
    """One row of the table: its unit, and whether more is better."""

    label: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"


FIGURES = {
    "drain": Figure("throughput, backlog drain (notif/s)", True),
    "live": Figure("throughput, live stream (notif/s)", True),
    "cpu": Figure("receiver CPU s per 100,000 (drain)", False, "{:.3f}"),
    "p50": Figure("latency send->callback p50 (us)", False),
    "p99": Figure("latency send->callback p99 (us)", False),
    "idle": Figure("idle CPU s per idle minute", False, "{:.4f}"),
    "stop_join": Figure("stop() -> join() (ms)", False, "{:.1f}"),
    "burst_rss": Figure("burst: peak RSS (MB)", False, "{:.1f}"),
    "burst_growth": Figure("burst: RSS growth over idle (MB)", False, "{:.1f}"),
    "burst_taken": Figure("burst: notifications taken in", False),
    "burst_stop_join": Figure("burst: stop() -> join() (ms)", False, "{:.1f}"),
}


@dataclass
class Results:
    values: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    sender: list[float] = field(default_factory=list)

    def add(self, key: str, kind: str, value: float | None) -> None:
        if value is not None:
            self.values[key, kind].append(value)


# -- processes -------------------------------------------------------------------


class Child:
    """A child process spoken to over a pipe; killed if the run is cut short."""

    def __init__(self, target: Any, *args: Any):
        self.pipe, child_end = _mp.Pipe()
        self.process: SpawnProcess = _mp.Process(
            target=target, args=(*args, child_end), daemon=True
        )
        self.process.start()
        child_end.close()

    def ask(self, *command: Any, timeout: float = COLLECT_TIMEOUT) -> Any:
        self.pipe.send(command)
        return self.answer(timeout)

    def answer(self, timeout: float = COLLECT_TIMEOUT) -> Any:
        if not self.pipe.poll(timeout):
            raise TimeoutError(
                f"child {self.process.pid} did not answer in {timeout} s"
            )
        return self.pipe.recv()

    def close(self) -> None:
        with suppress(BrokenPipeError, OSError):  # it may have died already
            self.pipe.send(("exit",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextmanager
def child(target: Any, *args: Any) -> Iterator[Child]:
    process = Child(target, *args)
    try:
        yield process
    finally:
        process.close()


def new_channel() -> str:
    return f"bench_{uuid.uuid4().hex[:12]}"


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """Freeze a receiver (SIGSTOP) while a backlog builds up in the server."""
    os.kill(pid, signal.SIGSTOP)
    try:
        while _state(pid) not in ("T", "t"):
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# -- measurements ----------------------------------------------------------------


def rotated(turn: int) -> tuple[str, ...]:
    """The receivers in the order of round ``turn``: rotated, so that slow
    drift of the machine hits all alike."""
    return KINDS[turn % len(KINDS) :] + KINDS[: turn % len(KINDS)]


def in_rounds(dsn: str, what: str, rounds: int) -> Iterator[list[tuple[str, Child]]]:
    """Every receiver once per round, each in a process of its own kept for
    the whole phase (idle while the others run)."""
    with ExitStack() as stack:
        receivers = {
            kind: stack.enter_context(child(receiver_main, kind, dsn)) for kind in KINDS
        }
        for turn in range(rounds):
            print(f"{what}, round {turn + 1}/{rounds} ...", file=sys.stderr)
            yield [(kind, receivers[kind]) for kind in rotated(turn)]


PAIRED = {
    "raw psycopg": "drain_x_raw",
    "asyncpg": "drain_x_asyncpg",
    "Listener(0)": "drain_x_inline",
}
"""The drain ratios taken round by round: to the yardstick, and to the receivers
the targets compare with."""


def measure_drains(
    dsn: str, sender: Child, args: argparse.Namespace, results: Results
) -> None:
    """Backlog drains, every receiver once per round, for ``args.rounds`` rounds.

    The receiver is frozen while the sender fills the server's queue, so the
    two never compete for a core; the clock starts at SIGCONT and stops at
    the n-th callback. Every receiver has a process of its own for the whole
    phase (idle while the others run) and the rounds follow one another
    closely, so the ratios of one round are taken within seconds: on a
    machine whose speed drifts, the median of those ratios holds better than
    the ratio of two medians taken minutes apart.
    """
    n = args.n
    for receivers in in_rounds(dsn, "drains", args.rounds):
        drains: dict[str, float] = {}
        for kind, receiver in receivers:
            channel = new_channel()
            _, pid = receiver.ask("setup", "count", channel, n, 0.0)
            with paused(pid):
                sent_from, sent_to = sender.ask("burst", channel, n)
                thawed = time.monotonic()
            _, r = receiver.ask("collect", True)
            results.sender.append(n / (sent_to - sent_from))
            drains[kind] = n / (r["t_end"] - thawed)
            results.add("drain", kind, drains[kind])
            results.add("cpu", kind, r["cpu"] * 100_000 / n)
            results.add("stop_join", kind, _ms(r["stop_join"]))
        for base, key in PAIRED.items():
            for kind, drain in drains.items():
                results.add(key, kind, drain / drains[base])


LATENCY_PAIRED = {
    "raw psycopg": "p50_over_raw",
    "asyncpg": "p50_over_asyncpg",
    "Listener(0)": "p50_over_inline",
}
"""The p50 differences taken round by round, in microseconds."""


def measure_latencies(
    dsn: str, sender: Child, args: argparse.Namespace, results: Results
) -> None:
    """Send-to-callback latency at a paced rate, every receiver once per round.

    As for the drains, each receiver keeps its process for the phase and the
    targets hold the median of the differences taken round by round.
    """
    for receivers in in_rounds(dsn, "latency", args.rounds):
        p50s: dict[str, float] = {}
        for kind, receiver in receivers:
            # Payloads carry the send time.
            channel = new_channel()
            receiver.ask("setup", "latency", channel, args.latency_n, 0.0)
            sender.ask("paced", channel, args.latency_n, args.rate)
            _, r = receiver.ask("collect", True)
            p50s[kind] = r["p50"]
            results.add("p50", kind, r["p50"])
            results.add("p99", kind, r["p99"])
            results.add("stop_join", kind, _ms(r["stop_join"]))
        for base, key in LATENCY_PAIRED.items():
            for kind, p50 in p50s.items():
                results.add(key, kind, p50 - p50s[base])


def measure_live(
    kind: str, dsn: str, sender: Child, args: argparse.Namespace, results: Results
) -> None:
    """A live stream: sender and receiver run together; the clock runs from
    the first statement sent to the n-th callback."""
    with child(receiver_main, kind, dsn) as receiver:
        channel = new_channel()
        receiver.ask("setup", "count", channel, args.n, 0.0)
        sent_from, _ = sender.ask("burst", channel, args.n)
        _, r = receiver.ask("collect", True)
        results.add("live", kind, args.n / (r["t_end"] - sent_from))
        results.add("stop_join", kind, _ms(r["stop_join"]))


def measure_idle(dsn: str, seconds: float, results: Results) -> None:
    """Every receiver listening, nothing sent: CPU per idle minute, together.

    Idle receivers do not compete, so the four share one wait.
    """
    receivers = [Child(receiver_main, kind, dsn) for kind in KINDS]
    try:
        for receiver in receivers:
            receiver.ask("setup", "count", new_channel(), 1, 0.0)
        time.sleep(seconds)
        for kind, receiver in zip(KINDS, receivers, strict=True):
            _, r = receiver.ask("collect", False)
            results.add("idle", kind, r["cpu"] * 60 / seconds)
            results.add("stop_join", kind, _ms(r["stop_join"]))
    finally:
        for receiver in receivers:
            receiver.close()


def measure_burst(
    kind: str, dsn: str, sender: Child, args: argparse.Namespace, results: Results
) -> None:
    """A burst far beyond the backlog limit, taken in by a callback that sleeps."""
    with child(receiver_main, kind, dsn) as receiver:
        channel = new_channel()
        receiver.ask("setup", "burst", channel, args.burst, args.burst_sleep)
        sender.ask("burst", channel, args.burst)
        time.sleep(args.burst_settle)
        _, r = receiver.ask("collect", False)
        results.add("burst_rss", kind, r["peak_rss"])
        results.add("burst_growth", kind, r["peak_rss"] - r["rss0"])
        results.add("burst_taken", kind, r["received"])
        results.add("burst_stop_join", kind, _ms(r["stop_join"]))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- report ----------------------------------------------------------------------


def machine_info(dsn: str) -> list[str]:
    import asyncpg  # type: ignore[import-untyped]

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    with psycopg.connect(dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; {platform.platform()}",
        f"Python {platform.python_version()}; psycopg {psycopg.__version__}"
        f" ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()});"
        f" asyncpg {asyncpg.__version__}; PostgreSQL {server[0] if server else '?'}",
    ]


def render(results: Results, args: argparse.Namespace, info: list[str]) -> str:
    lines = [*info]
    lines.append(
        f"N={args.n:,} per throughput run, repeat={args.repeat}, latency at"
        f" {args.rate:,.0f}/s x {args.latency_n:,}, idle {args.idle:g} s,"
        f" burst {args.burst:,}"
        + (f" (callback sleeps {args.burst_sleep * 1000:g} ms)" if args.burst else "")
    )
    if results.sender:
        lines.append(
            "sender ceiling (one connection, batches of 5,000, receiver frozen):"
            f" {_stats(results.sender, '{:,.0f}')} notif/s"
        )
    header = f"{'figure':<38}{'receiver':<16}{'median':>12}{'min':>12}{'max':>12}"
    lines += ["", header + f"{'x raw':>8}", "-" * (len(header) + 8)]
    for key, figure in FIGURES.items():
        first = True
        base = results.values.get((key, KINDS[0]))
        for kind in KINDS:
            values = results.values.get((key, kind))
            label = figure.label if first else ""
            first = False
            if not values:
                lines.append(f"{label:<38}{kind:<16}{'n/a':>12}")
                continue
            med = statistics.median(values)
            cells = [figure.fmt.format(v) for v in (med, min(values), max(values))]
            ratio = ""
            paired = (
                results.values.get(("drain_x_raw", kind)) if key == "drain" else None
            )
            if paired:
                ratio = f"{statistics.median(paired):.2f}"
            elif base and statistics.median(base):
                ratio = f"{med / statistics.median(base):.2f}"
            lines.append(
                f"{label:<38}{kind:<16}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}"
                f"{ratio:>8}"
            )
    lines += ["", "targets:", *targets(results, args)]
    return "\n".join(lines)


def _stats(values: list[float], fmt: str) -> str:
    med = fmt.format(statistics.median(values))
    return f"{med} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def targets(results: Results, args: argparse.Namespace) -> list[str]:
    def med(key: str, kind: str) -> float | None:
        values = results.values.get((key, kind))
        return statistics.median(values) if values else None

    def check(name: str, ok: bool | None, detail: str) -> str:
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        return f"  [{verdict}] {name}: {detail}"

    out = []
    # Throughput targets: medians of the ratios taken round by round.
    for kind, floor in (("Listener(0)", 0.95), ("Listener(pool)", 0.6)):
        x_raw, x_apg = med("drain_x_raw", kind), med("drain_x_asyncpg", kind)
        if x_raw is not None and x_apg is not None:
            out.append(
                check(
                    f"{kind} throughput >= {floor} x raw and > asyncpg",
                    x_raw >= floor and x_apg > 1,
                    f"{x_raw:.2f} x raw, {x_apg:.2f} x asyncpg",
                )
            )
    for kind, floor in (("Listener(pool)", 0.9), ("Listener(ordered)", 0.8)):
        x_inline = med("drain_x_inline", kind)
        if x_inline is not None:
            out.append(
                check(
                    f"{kind} throughput >= {floor} x Listener(0)",
                    x_inline >= floor,
                    f"{x_inline:.2f} x Listener(0)",
                )
            )

    def paired(key: str, kind: str) -> str:
        rounds = results.values[(key, kind)]
        return (
            f"{statistics.median(rounds):+.0f} us (median of {len(rounds)} rounds,"
            f" {min(rounds):+.0f} to {max(rounds):+.0f})"
        )

    # Latency targets: medians of the p50 differences taken round by round.
    over = med("p50_over_inline", "Listener(pool)")
    if over is not None:
        out.append(
            check(
                "Listener(pool) p50 <= Listener(0) p50 + 20 us",
                over <= 20,
                paired("p50_over_inline", "Listener(pool)"),
            )
        )
    # asyncio services compare with what they would use otherwise: asyncpg.
    for kind in ("AsyncListener(0)", "AsyncListener"):
        x_apg = med("drain_x_asyncpg", kind)
        if x_apg is not None:
            rounds = results.values[("drain_x_asyncpg", kind)]
            best = max(results.values[("drain", kind)]) / max(
                results.values[("drain", "asyncpg")]
            )
            out.append(
                check(
                    f"{kind} throughput >= 1.5 x asyncpg",
                    x_apg >= 1.5,
                    f"{x_apg:.2f} x asyncpg (median of {len(rounds)} rounds,"
                    f" {min(rounds):.2f} to {max(rounds):.2f}; best drains"
                    f" {best:.2f})",
                )
            )
        over = med("p50_over_asyncpg", kind)
        if over is not None:
            out.append(
                check(
                    f"{kind} p50 <= asyncpg p50 + 20 us",
                    over <= 20,
                    paired("p50_over_asyncpg", kind),
                )
            )
    for kind in (k for k in KINDS[2:] if k != "psycopg async"):
        added = med("p50_over_raw", kind)
        if added is not None:
            out.append(
                check(
                    f"{kind} added p50 <= 50 us",
                    added <= 50,
                    paired("p50_over_raw", kind),
                )
            )
        idle = med("idle", kind)
        out.append(
            check(
                f"{kind} idle < 0.05 CPU s/min",
                None if idle is None else idle < 0.05,
                "not measured" if idle is None else f"{idle:.4f}",
            )
        )
        stops = results.values.get(("stop_join", kind))
        out.append(
            check(
                f"{kind} stop->join <= 100 ms",
                None if not stops else max(stops) <= 100,
                "not measured" if not stops else f"max {max(stops):.1f} ms",
            )
        )
    growth = med("burst_growth", "Listener(pool)")
    taken = med("burst_taken", "Listener(pool)")
    out.append(
        check(
            "Listener(pool) burst RSS bounded by the backlog",
            None if growth is None or taken is None else taken < args.burst,
            "not measured"
            if growth is None or taken is None
            else f"took in {taken:,.0f} of {args.burst:,} (max_backlog 10,000 plus"
            f" what the {args.burst_sleep * 1000:g} ms callbacks finished),"
            f" RSS +{growth:.1f} MB",
        )
    )
    return out


# -- main ------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, DEFAULT_DSN))
    parser.add_argument("--n", type=int, default=200_000, help="per throughput run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, help="backlog drain rounds (default 3 x --repeat)"
    )
    parser.add_argument("--quick", action="store_true", help="short idle, no burst")
    parser.add_argument("--rate", type=float, default=5_000, help="latency send rate")
    parser.add_argument("--latency-n", type=int, help="notifications for latency")
    parser.add_argument("--idle", type=float, help="idle seconds (default 30)")
    parser.add_argument("--burst", type=int, help="burst size (0: skip)")
    parser.add_argument("--burst-sleep", type=float, default=0.001)
    parser.add_argument("--burst-settle", type=float, default=2.0)
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 * args.repeat
    if args.latency_n is None:
        args.latency_n = 1_000 if args.quick else 20_000
    if args.idle is None:
        args.idle = 1.0 if args.quick else 30.0
    if args.burst is None:
        args.burst = 0 if args.quick else 1_000_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(args.dsn)
    results = Results()
    with child(sender_main, args.dsn) as sender:
        measure_drains(args.dsn, sender, args, results)
        measure_latencies(args.dsn, sender, args, results)
        for rep in range(args.repeat):
            for kind in rotated(rep):
                print(f"[{rep + 1}/{args.repeat}] {kind} live ...", file=sys.stderr)
                measure_live(kind, args.dsn, sender, args, results)
        if args.idle > 0:
            print(f"idle {args.idle:g} s ...", file=sys.stderr)
            measure_idle(args.dsn, args.idle, results)
        if args.burst > 0:
            for kind in KINDS:
                print(f"burst {args.burst:,} {kind} ...", file=sys.stderr)
                measure_burst(kind, args.dsn, sender, args, results)
    print(render(results, args, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "info": info,
                    "sender": results.sender,
                    "values": {
                        f"{k}|{kind}": v for (k, kind), v in results.values.items()
                    },
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several consumer processes on one outbox: exactly once, in order, through kills.

Every process is real (``outbox_proc.py``, run with ``subprocess``). Proof of
exactly-once is in the database: the handler's table has the message id as
primary key, so a second effect of a message would fail its handler and
leave the message dead in the outbox; at the end the outbox must be empty
and the effects must be exactly the messages sent.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from classic.pg.listener.testing import WAIT, wait_until

PROC = [sys.executable, str(Path(__file__).with_name("outbox_proc.py"))]
DRAIN_TIMEOUT = 120.0
"""30,000 messages take seconds; the bound is for a machine shared with others."""


class Procs:
    """Start processes; kill whatever is left at the end of the test."""

    def __init__(self, dsn: str, table: str, effects: str):
        self.dsn, self.table, self.effects = dsn, table, effects
        self.started: list[subprocess.Popen[str]] = []

    def consumer(self, channels: list[str], *options: str) -> subprocess.Popen[str]:
        args = ["consume", self.dsn, self.table, self.effects, ",".join(channels)]
        return self._start([*args, *options])

    def sender(self, channels: list[str], n: int) -> subprocess.Popen[str]:
        return self._start(["send", self.dsn, self.table, ",".join(channels), str(n)])

    def _start(self, args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*PROC, *args], stdout=subprocess.PIPE, text=True)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The process's next line of stdout, or fail after ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args} within {timeout} s"
    return proc.stdout.readline().strip()


@pytest.fixture
def procs(dsn, table, effects) -> Iterator[Procs]:
    procs = Procs(dsn, table, effects)
    yield procs
    procs.stop_all()


def count(conn: psycopg.Connection[Any], table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def wait_drained(conn, table, effects, n: int, timeout=DRAIN_TIMEOUT) -> None:
    wait_until(
        lambda: count(conn, effects) >= n and count(conn, table) == 0,
        f"{n} effects and an empty outbox",
        timeout,
    )


def expected_payloads(channels: list[str], n: int) -> set[str]:
    return {f"{channels[i % len(channels)]}:{i}" for i in range(n)}


def check_exactly_once(conn, table, effects, channels, n) -> list[tuple[Any, ...]]:
    """Every message sent has one effect, nothing else has any, nothing is left."""
    rows = conn.execute(
        sql.SQL("SELECT channel, payload, pid, seq FROM {} ORDER BY seq").format(
            sql.Identifier(effects)
        )
    ).fetchall()
    payloads = [row[1] for row in rows]
    assert len(payloads) == n  # with the primary key: no message twice
    assert set(payloads) == expected_payloads(channels, n)  # none lost
    assert count(conn, table) == 0  # no message dead or waiting for a retry
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_three_consumers_handle_30000_messages_exactly_once(
    procs, conn, table, effects, channel, ordered
):
    channels = [f"{channel}_{i}" for i in range(6)]
    n = 30_000
    options = ["--ordered"] if ordered else []
    consumers = [procs.consumer(channels, *options) for _ in range(3)]
    for consumer in consumers:
        assert read_line(consumer) == "ready"

    sender = procs.sender(channels, n)
    assert read_line(sender, DRAIN_TIMEOUT) == "sent"
    wait_drained(conn, table, effects, n)

    rows = check_exactly_once(conn, table, effects, channels, n)
    pids = {row[2] for row in rows}
    assert pids == {consumer.pid for consumer in consumers}  # all three shared it
    if ordered:
        for ch in channels:
            # Commit order (seq) is send order (i) within each channel.
            handled = [int(payload.split(":")[1]) for c, payload, *_ in rows if c == ch]
            assert handled == sorted(handled)


@pytest.mark.slow
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_consumer_killed_mid_handler_loses_and_doubles_nothing(
    procs, conn, table, effects, channel, ordered
):
    channels = [channel]
    n = 10_000
    options = ["--ordered"] if ordered else []
    trap = f"{channel}:120"  # in the victim's third batch of 50
    sender = procs.sender(channels, n)
    assert read_line(sender) == "sent"

    victim = procs.consumer(channels, "--trap", trap, *options)
    # Its worker starts with its listener: "trapped" may come before "ready".
    assert {read_line(victim), read_line(victim)} == {"ready", "trapped"}
    # The victim is inside a handler, its batch locked, its writes uncommitted.
    survivors = [procs.consumer(channels, *options) for _ in range(2)]
    for survivor in survivors:
        assert read_line(survivor) == "ready"
    if ordered:
        # The victim holds the channel: nobody else may take a message of it.
        assert count(conn, effects) == 100
    else:
        # The survivors do everything but the victim's batch of 50, then idle.
        wait_until(lambda: count(conn, effects) == n - 50, "the rest", DRAIN_TIMEOUT)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL

    # Taken over without waiting for the poll (30 s): nobody sends anything.
    wait_drained(conn, table, effects, n, timeout=WAIT)
    rows = check_exactly_once(conn, table, effects, channels, n)
    # Alone at first, the victim committed two batches of 50; the third, with
    # the trap, died with it and was handled by the survivors.
    by_victim = {
        int(payload.split(":")[1]) for _, payload, pid, _ in rows if pid == victim.pid
    }
    assert by_victim == set(range(100))
    (trapped,) = [row for row in rows if row[1] == trap]
    assert trapped[2] in {survivor.pid for survivor in survivors}
    if ordered:
        handled = [int(payload.split(":")[1]) for _, payload, *_ in rows]
        assert handled == list(range(n))


def test_messages_sent_while_consumers_are_down_are_handled_when_they_start(
    procs, conn, table, effects, channel
):
    channels = [f"{channel}_a", f"{channel}_b"]
    n = 1_000
    sender = procs.sender(channels, n)
    assert read_line(sender) == "sent"
    assert sender.wait(10) == 0
    assert count(conn, table) == n  # nobody listened: all still there

    for _ in range(3):
        procs.consumer(channels)
    wait_drained(conn, table, effects, n)
    check_exactly_once(conn, table, effects, channels, n)


@pytest.mark.slow
def test_bench_runs(dsn):
    """bench/outbox.py, tiny, so that it does not rot."""
    bench = Path(__file__).parents[3] / "bench" / "outbox.py"
    done = subprocess.run(
        [
            sys.executable,
            str(bench),
            "--n",
            "200",
            "--repeat",
            "1",
            "--consumers",
            "1,2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CLASSIC_PG_LISTENER_TEST_DSN": dsn},
    )
    assert done.returncode == 0, done.stderr
    assert "| 2 |" in done.stdout

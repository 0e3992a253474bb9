"""``exclusive=NAME``: one process of several runs the callbacks, with fail-over.

Real processes, each with its own listener and session, against the real
server; the active one is killed with SIGKILL, as a crash would.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from classic.pg.listener.testing import WAIT, notify

PING_PERIOD = 0.3
PING_TIMEOUT = 0.5

CHILD = (
    textwrap.dedent(
        """
    import sys, psycopg
    from classic.pg.listener import Listener, hookimpl

    dsn, name, channel, table = sys.argv[1:]
    sink = psycopg.connect(dsn, autocommit=True)

    class Report:
        @hookimpl
        def listener_active_changed(self, active):
            print("active" if active else "standby", flush=True)

        @hookimpl
        def listener_connected(self):
            print("connected", flush=True)

        @hookimpl
        def listener_ping(self):
            print("ping", flush=True)  # a standby's ping also tries the lock

    def handle(notify):
        sink.execute(
            f"INSERT INTO {table} (n, pid) VALUES (%s, pg_backend_pid())",
            (int(notify.payload),),
        )

    listener = Listener(
        lambda: psycopg.connect(dsn, autocommit=True),
        max_workers=0,
        ping_period=PING_PERIOD,
        ping_timeout=PING_TIMEOUT,
        exclusive=name,
        plugins=[Report()],
        autoload_plugins=False,
    )
    listener.add_callback(handle, channel)
    listener.run()
    """
    )
    .replace("PING_PERIOD", repr(PING_PERIOD))
    .replace("PING_TIMEOUT", repr(PING_TIMEOUT))
)


class Child:
    def __init__(self, dsn: str, name: str, channel: str, table: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, dsn, name, channel, table],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.active = threading.Event()
        self.pinged = threading.Event()
        self.became_active_at = 0.0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line == "active":
                self.became_active_at = time.monotonic()
                self.active.set()
            elif line == "ping":
                self.pinged.set()
            self.lines.put(line)

    def wait_for(self, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the child never said {what!r}"
            if self.lines.get(timeout=remaining) == what:
                return


@pytest.fixture
def table(conn: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"handled_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE TABLE {name} (n int PRIMARY KEY, pid int NOT NULL)")
    yield name
    conn.execute(f"DROP TABLE {name}")


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in made:
        try:
            child.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
        if child.proc.stdout is not None:
            child.proc.stdout.close()


def handled(conn: psycopg.Connection[Any], table: str) -> dict[int, int]:
    return dict(conn.execute(f"SELECT n, pid FROM {table}").fetchall())


def wait_handled(conn: psycopg.Connection[Any], table: str, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while len(handled(conn, table)) < count:
        assert time.monotonic() < deadline, f"{len(handled(conn, table))} of {count}"
        time.sleep(0.01)


def test_one_active_of_three_and_fail_over_after_sigkill(
    dsn, conn, channel, table, children
):
    name = f"exclusive-{channel}"
    for _ in range(3):
        children.append(Child(dsn, name, channel, table))
    for child in children:
        child.wait_for("connected")
    # Each has taken the lock, or tried it again on a ping and failed.
    for child in children:
        assert child.pinged.wait(WAIT)
    active = [child for child in children if child.active.is_set()]
    assert len(active) == 1, "exactly one process is active"
    (first,) = active

    notify(conn, channel, *(str(n) for n in range(100)))
    wait_handled(conn, table, 100)
    assert len(set(handled(conn, table).values())) == 1, "only the active one handles"

    first.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait(WAIT)
    deadline = killed_at + PING_PERIOD + PING_TIMEOUT + 2.0
    while not any(c.active.is_set() for c in children if c is not first):
        assert time.monotonic() < deadline, "no standby took over"
        time.sleep(0.01)
    (second,) = [c for c in children if c is not first and c.active.is_set()]
    took_over = second.became_active_at - killed_at
    print(f"fail-over after SIGKILL: {took_over:.3f} s")
    assert took_over <= PING_PERIOD + PING_TIMEOUT

    notify(conn, channel, *(str(n) for n in range(100, 200)))
    wait_handled(conn, table, 200)
    by_pid = handled(conn, table)
    after = {by_pid[n] for n in range(100, 200)}
    before = {by_pid[n] for n in range(100)}
    assert len(after) == 1, "one process alone handles"
    assert after != before, "and it is the new active one"
    # The third is still a standby.
    (third,) = [c for c in children if c not in (first, second)]
    assert not third.active.is_set()


def test_exclusive_needs_a_ping_period(make_listener):
    with pytest.raises(ValueError, match="ping_period"):
        make_listener(exclusive="x", ping_period=0)
    with pytest.raises(ValueError, match="exclusive"):
        make_listener(exclusive="")

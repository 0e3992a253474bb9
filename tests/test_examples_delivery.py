"""The documented delivery pattern (docs/delivery.md), run as written.

The example is taken from the page itself, so that the code a reader copies
is the code proved here. Only what a test must change is replaced, each
exactly once: the DSN, the table and channel names (unique: the server is
shared), and the listener's construction (a fast backoff, since the test
kills the backend 50 times in a few seconds, and a factory the test can hold
back to make a disconnection last).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from classic.pg.listener import hookimpl
from classic.pg.listener.testing import WAIT, HookWaiter, wait_until

PAGE = Path(__file__).parent.parent / "docs" / "delivery.md"
KILLS = 50


def example_source() -> str:
    """The first Python block after the pattern's heading."""
    text = PAGE.read_text()
    section = text.split("## The pattern", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no Python example under 'The pattern' in docs/delivery.md"
    return match.group(1)


def replace_once(source: str, old: str, new: str) -> str:
    count = source.count(old)
    assert count >= 1, f"{old!r} is no longer in the documented example"
    return source.replace(old, new)


class Disconnects:
    """Counts disconnections, so the test waits on them rather than sleeping."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    @hookimpl
    def listener_disconnected(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count, WAIT)


def test_documented_pattern_processes_every_row_across_50_kills(
    dsn, conn, record_property
):
    token = uuid.uuid4().hex[:10]
    source = example_source()
    source = re.sub(r'DSN = ".*"', f"DSN = {dsn!r}", source, count=1)
    source = replace_once(source, "app_events", f"app_events_{token}")
    source = replace_once(source, "app_cursor", f"app_cursor_{token}")
    source = replace_once(
        source,
        "Listener(connect)",
        "Listener(held(connect), reconnect_delay=0.01, max_reconnect_delay=0.05)",
    )

    processed: Counter[int] = Counter()
    lock = threading.Lock()
    may_connect = threading.Event()
    may_connect.set()

    def handle(event_id: int, payload: str) -> None:
        with lock:
            processed[event_id] += 1

    def held(connect: Callable[[], Any]) -> Callable[[], Any]:
        def factory() -> Any:
            assert may_connect.wait(WAIT)
            return connect()

        return factory

    namespace: dict[str, Any] = {"held": held, "__name__": "delivery_example"}
    exec(compile(source, str(PAGE), "exec"), namespace)
    namespace["handle"] = handle  # the example's print(), counted instead
    listener = namespace["listener"]
    send: Callable[[psycopg.Connection[Any], str], None] = namespace["send"]
    waiter = HookWaiter()
    disconnects = Disconnects()
    listener.register_plugin(waiter)
    listener.register_plugin(disconnects)

    stop = threading.Event()
    sent: list[int] = []

    def sender() -> None:
        with psycopg.connect(dsn) as producer:
            while not stop.is_set():
                send(producer, f"event {len(sent)}")
                sent.append(len(sent))
                stop.wait(0.002)  # pacing the load, not synchronising

    thread = threading.Thread(target=sender, name="test-sender")
    try:
        # Connected: set up, every channel listened to (the hooks were
        # registered after start(), and may have missed the first one).
        wait_until(lambda: listener.stats().connected, "the first connection")
        thread.start()
        for kill in range(1, KILLS + 1):
            # Each reconnection is awaited through the hooks: 50 real
            # reconnections, each with its catch-up, while rows keep coming.
            conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            waiter.wait("listener_reconnected", kill)
        stop.set()
        thread.join(WAIT)

        # The last rows are inserted while the listener cannot reconnect: no
        # notification of theirs is ever delivered; the catch-up alone finds them.
        may_connect.clear()
        conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        disconnects.wait(KILLS + 1)
        with psycopg.connect(dsn) as producer:
            for n in range(5):
                send(producer, f"while disconnected {n}")
        may_connect.set()
        waiter.wait("listener_reconnected", KILLS + 1)

        table = f"app_events_{token}"
        ids = [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
        assert len(ids) == len(sent) + 5
        wait_until(
            lambda: set(processed) >= set(ids), "every row to be processed", WAIT
        )
    finally:
        stop.set()
        may_connect.set()
        if thread.is_alive():
            thread.join(WAIT)
        listener.stop()
        listener.join(WAIT)
        conn.execute(f"DROP TABLE IF EXISTS app_events_{token}, app_cursor_{token}")

    assert listener.exception is None
    assert listener.reconnects == KILLS + 1
    duplicates = sum(count - 1 for count in processed.values())
    record_property("rows", len(ids))
    record_property("duplicates", duplicates)
    print(
        f"\ndelivery pattern: {len(ids)} rows, {KILLS + 1} backends terminated,"
        f" every row processed, {duplicates} duplicates"
    )
    assert set(processed) == set(ids)

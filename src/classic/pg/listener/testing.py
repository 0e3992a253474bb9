"""pytest fixtures to test listeners and plugins against a real PostgreSQL.

Our own suite and the plugins' use them; so can yours::

    # conftest.py
    pytest_plugins = ["classic.pg.listener.testing"]

The server comes from ``CLASSIC_PG_LISTENER_TEST_DSN``; without it, from
testcontainers (``pip install testcontainers[postgres]``) when Docker
answers; without either the session fails with a message saying how to
provide one. It never skips: a green run must have talked to PostgreSQL.

Fixtures: ``dsn``, ``factory``, ``conn``, ``channel``, ``make_listener``,
``hook_waiter``. Helpers: ``notify()``, ``wait_until()``, ``HookWaiter``, ``WAIT``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from .hookspecs import hookimpl
from .listener import Listener

DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
WAIT = 10.0
"""Seconds any test waits for something that should take milliseconds."""


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """For state no event reports (a counter, a row on the server): poll briefly."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def dsn() -> Iterator[str]:
    if value := os.environ.get(DSN_ENV):
        yield value
        return
    if _docker_available():
        from testcontainers.postgres import (  # type: ignore[import-untyped,unused-ignore]
            PostgresContainer,
        )

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    pytest.fail(
        f"no PostgreSQL for the tests: set {DSN_ENV} (for example"
        f" {DSN_ENV}='host=127.0.0.1 dbname=test user=postgres') or make Docker"
        " reachable for testcontainers",
        pytrace=False,
    )


@pytest.fixture(scope="session", autouse=True)
def _server_reachable(dsn: str) -> None:
    """Fail the whole session at once, clearly, when the server does not answer."""
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as ex:
        pytest.fail(f"PostgreSQL at {dsn!r} does not answer: {ex}", pytrace=False)


@pytest.fixture
def factory(dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    """A connection factory as the specification asks for one."""
    return lambda: psycopg.connect(dsn, autocommit=True)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A second connection, to send notifications and inspect the server."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses."""
    return f"test_{uuid.uuid4().hex[:12]}"


def notify(conn: psycopg.Connection[Any], channel: str, *payloads: str) -> None:
    """Send notifications in one statement (batched: ~50x one NOTIFY each)."""
    conn.execute(
        "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
        (channel, list(payloads) or [""]),
    )


@pytest.fixture
def make_listener(
    factory: Callable[[], psycopg.Connection[Any]],
) -> Iterator[Callable[..., Listener]]:
    """Build listeners that are stopped, and must stop promptly, after the test."""
    made: list[Listener] = []

    def make(*args: Any, **kwargs: Any) -> Listener:
        if not args:
            args = (factory,)
        listener = Listener(*args, **kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop()
    for listener in made:
        if listener.is_alive():
            listener.join(WAIT)
            assert not listener.is_alive(), f"{listener} did not stop"


class HookWaiter:
    """A plugin that counts the lifecycle hooks, so tests wait on events, not sleeps.

    Pass it in ``plugins=`` and call ``wait("listener_connected")``: once the
    connected hook ran, every channel, plugins' included, is listened to. It
    runs after the other plugins (``trylast``).
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._changed = threading.Condition()

    def _count(self, hook: str) -> None:
        with self._changed:
            self.counts[hook] = self.counts.get(hook, 0) + 1
            self._changed.notify_all()

    def wait(self, hook: str, count: int = 1, timeout: float = WAIT) -> None:
        """Wait until ``hook`` was called ``count`` times in all."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: self.counts.get(hook, 0) >= count, timeout
            ), f"{hook}: {self.counts.get(hook, 0)} calls, expected {count}"

    @hookimpl(trylast=True)
    def listener_connected(self) -> None:
        self._count("listener_connected")

    @hookimpl(trylast=True)
    def listener_reconnected(self) -> None:
        self._count("listener_reconnected")

    @hookimpl(trylast=True)
    def listener_disconnected(self) -> None:
        self._count("listener_disconnected")

    @hookimpl(trylast=True)
    def listener_ping(self) -> None:
        self._count("listener_ping")

    @hookimpl(trylast=True)
    def listener_callback_done(self) -> None:
        self._count("listener_callback_done")

    @hookimpl(trylast=True)
    def listener_stopped(self) -> None:
        self._count("listener_stopped")


@pytest.fixture
def hook_waiter() -> HookWaiter:
    return HookWaiter()

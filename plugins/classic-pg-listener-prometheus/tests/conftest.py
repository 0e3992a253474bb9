"""Fixtures for the plugin's tests: a real PostgreSQL server, as the core's tests use.

Self-contained, so that the tests also run on their own, outside the core's
suite; run together with it, these fixtures take precedence in this folder.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from classic.pg.listener import Listener, hookimpl

# An installed plugin must join only the listeners that ask for it.
os.environ["CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"] = "1"

DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
WAIT = 10.0


@pytest.fixture(scope="session")
def dsn() -> str:
    value = os.environ.get(DSN_ENV)
    if not value:
        pytest.fail(f"set {DSN_ENV} to a PostgreSQL server's DSN", pytrace=False)
    return value


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def channel() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_listener(dsn: str) -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(**kwargs: Any) -> Listener:
        listener = Listener(lambda: psycopg.connect(dsn, autocommit=True), **kwargs)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop()
        if listener.is_alive():
            listener.join(WAIT)
            assert not listener.is_alive()


@pytest.fixture
def notify(conn: psycopg.Connection[Any]) -> Callable[..., None]:
    """``notify(channel, *payloads)``: one statement sends them all, in order."""

    def send(channel: str, *payloads: str) -> None:
        conn.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
            (channel, list(payloads)),
        )

    return send


class Waiter:
    """A plugin that counts hook calls; ``trylast``: it runs after the others."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._cond = threading.Condition()

    def _count(self, hook: str) -> None:
        with self._cond:
            self.counts[hook] = self.counts.get(hook, 0) + 1
            self._cond.notify_all()

    def wait(self, hook: str, count: int = 1) -> None:
        with self._cond:
            assert self._cond.wait_for(
                lambda: self.counts.get(hook, 0) >= count, WAIT
            ), f"{hook}: {self.counts.get(hook, 0)} calls, expected {count}"

    @hookimpl(trylast=True)
    def listener_connected(self) -> None:
        self._count("listener_connected")

    @hookimpl(trylast=True)
    def listener_reconnected(self) -> None:
        self._count("listener_reconnected")

    @hookimpl(trylast=True)
    def listener_ping(self) -> None:
        self._count("listener_ping")

    @hookimpl(trylast=True)
    def listener_callback_done(self) -> None:
        self._count("listener_callback_done")


@pytest.fixture
def waiter() -> Waiter:
    return Waiter()


def _noop(notify: object) -> None:
    pass


@pytest.fixture
def settle() -> Callable[[Listener], None]:
    """Wait until every callback change queued so far is applied (LISTEN sent).

    Changes are applied in order: once one more resolves, all earlier have.
    """

    def wait(listener: Listener) -> None:
        listener.add_callback(_noop, f"settle_{uuid.uuid4().hex[:12]}").result(WAIT)

    return wait

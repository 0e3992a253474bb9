"""``pg-listener doctor`` against real servers: the test server, a PgBouncer in
transaction mode, a throwaway server with its settings changed, and the same
server started as a standby."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest

from classic.pg.listener import doctor
from fix_server import ThrowawayServer

MODULE = [sys.executable, "-m", "classic.pg.listener"]


def run(dsn: str, **kwargs) -> dict[str, doctor.Check]:
    checks = doctor.run_checks(
        lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=5), **kwargs
    )
    by_name = {check.name: check for check in checks}
    assert len(by_name) == len(checks), "check names are unique"
    return by_name


def statuses(checks: dict[str, doctor.Check]) -> dict[str, str]:
    return {name: check.status for name, check in checks.items()}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODULE, "doctor", *args], capture_output=True, text=True, timeout=60
    )


def test_test_server_passes(dsn):
    checks = run(dsn)
    # The shared server's own keepalives, and other people's sessions, are
    # not this test's to decide.
    shared = {"keepalives (server)", "sessions idle in transaction", "queue usage"}
    assert {n: s for n, s in statuses(checks).items() if n not in shared} == {
        name: "ok" for name in checks if name not in shared
    }, "\n".join(map(str, checks.values()))
    assert checks["server version"].message.startswith("PostgreSQL 1")
    assert "kept across statements" in checks["session"].message
    assert "shorter than 8000 bytes (tried)" in checks["payload limit"].message
    assert "the listener sets its own" in checks["keepalives (DSN)"].message
    assert doctor.exit_status(list(checks.values())) == 0


def test_command_prints_one_line_per_check(dsn):
    result = cli("--dsn", dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(run(dsn))
    assert all(line.split()[0] in ("ok", "warn") for line in lines), lines
    assert "\nok    session: kept across statements" in result.stdout
    assert lines[0].startswith("ok    server version: PostgreSQL")


def test_command_cannot_connect():
    result = cli("--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "cannot connect to PostgreSQL" in result.stderr


def test_pgbouncer_in_transaction_mode_fails(pgbouncer):
    checks = run(pgbouncer.dsn)
    assert checks["session"].status == "fail", checks["session"]
    assert "transaction or statement mode" in checks["session"].message
    assert "session mode" in checks["session"].advice
    assert checks["LISTEN round trip"].status == "fail"
    # The rest still answers through the pooler.
    assert checks["server version"].status == "ok"
    assert checks["payload limit"].status == "ok"

    result = cli("--dsn", pgbouncer.dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "\nfail  session: not kept across statements" in result.stdout


def test_pgbouncer_in_session_mode_passes(make_pgbouncer, dsn):
    bouncer = make_pgbouncer(dsn, "session")
    checks = run(bouncer.dsn)
    assert checks["session"].status == "ok"
    assert f"port {bouncer.port}" in checks["session"].message, "names the proxy"
    assert checks["LISTEN round trip"].status == "ok"


def test_pgbouncer_in_statement_mode_fails(make_pgbouncer, dsn):
    checks = run(make_pgbouncer(dsn, "statement").dsn)
    assert checks["session"].status == "fail"
    assert "statement mode" in checks["session"].message


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayServer]:
    """A server of this module's own: its settings change, then it becomes a standby."""
    server = ThrowawayServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def primary(cluster: ThrowawayServer) -> ThrowawayServer:
    signal = cluster.data / "standby.signal"
    if signal.exists():
        cluster.stop()
        signal.unlink()
    if not cluster.is_running():
        cluster.start()
    return cluster


def test_changed_settings(primary):
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        for name, value in [
            ("idle_session_timeout", "10min"),
            ("idle_in_transaction_session_timeout", "30s"),
            ("tcp_keepalives_idle", "60"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "6"),
        ]:
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    # A session that listens, then sits in a transaction: the queue cannot
    # advance past it while notifications keep coming.
    with (
        psycopg.connect(primary.dsn) as stuck,
        psycopg.connect(primary.dsn, autocommit=True) as sender,
    ):
        stuck.execute("LISTEN doctor_stuck")
        stuck.commit()
        stuck.execute("SELECT 1")  # idle in transaction from here on
        sender.execute(
            "SELECT pg_notify('doctor_stuck', i || repeat('x', 100))"
            " FROM generate_series(1, 2000) AS i"
        )
        checks = run(primary.dsn + " keepalives=0", idle_in_transaction_after=0)
        stuck_pid = stuck.info.backend_pid

    assert checks["idle_session_timeout"].status == "fail"
    assert checks["idle_session_timeout"].message.startswith("10 min:")
    assert "idle_session_timeout = 0" in checks["idle_session_timeout"].advice
    assert checks["idle_in_transaction_session_timeout"].message.startswith("30 s:")
    assert checks["keepalives (server)"].status == "ok"
    assert "within about 2 min" in checks["keepalives (server)"].message
    assert checks["keepalives (DSN)"].status == "warn"
    assert checks["keepalives (DSN)"].message.startswith("keepalives=0: off")
    idle = checks["sessions idle in transaction"]
    assert idle.status == "warn"
    assert f"pid {stuck_pid} (postgres@postgres" in idle.message
    usage = checks["queue usage"]
    assert usage.status == "ok"
    assert not usage.message.startswith("0.0000%"), usage.message
    assert doctor.exit_status(list(checks.values())) == 1


def test_slow_dsn_keepalives_warn(primary):
    checks = run(primary.dsn + " keepalives_idle=3600")
    assert checks["keepalives (DSN)"].status == "warn"
    assert "keepalives_idle=3600: the listener keeps them" in (
        checks["keepalives (DSN)"].message
    )
    fast = run(primary.dsn + " keepalives_idle=5 keepalives_interval=1")
    assert fast["keepalives (DSN)"].status == "ok"


def test_standby_fails(cluster):
    if cluster.is_running():
        cluster.stop()
    # No primary to follow: the server replays nothing and waits, a hot
    # standby that accepts read-only sessions, which is all the doctor needs.
    (cluster.data / "standby.signal").touch()
    cluster.start()
    checks = run(cluster.dsn)
    assert checks["in recovery"].status == "fail"
    assert "standby" in checks["in recovery"].message
    assert "target_session_attrs=read-write" in checks["in recovery"].advice
    assert checks["LISTEN round trip"].status == "fail"
    assert "during recovery" in checks["LISTEN round trip"].message
    assert "(computed; a standby sends none)" in checks["payload limit"].message

    result = cli("--dsn", cluster.dsn)
    assert result.returncode == 1
    assert "\nfail  in recovery: the server is a standby" in result.stdout


def test_seconds_read_as_people_read_them():
    assert doctor._seconds(7875) == "2 h 11 min 15 s"
    assert doctor._seconds(600) == "10 min"
    assert doctor._seconds(1.5) == "1.5 s"


def test_command_explains_itself():
    result = subprocess.run(
        [*MODULE, "doctor", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "ok, warn or fail" in result.stdout
    assert "DATABASE_URL" in result.stdout


def test_idle_session_timeout_fails_for_a_reason(primary, make_listener, hook_waiter):
    # What the check's message says: notifications flowing to the session do
    # not count as activity, so the server ends it all the same.
    dsn = primary.dsn + " options='-c idle_session_timeout=1000'"
    assert run(dsn)["idle_session_timeout"].status == "fail"
    received: list[object] = []
    listener = make_listener(
        lambda: psycopg.connect(dsn, autocommit=True),
        max_workers=0,
        plugins=[hook_waiter],
    )
    listener.add_callback(received.append, "doctor_flow")
    listener.start()
    hook_waiter.wait("listener_connected")
    stop = threading.Event()

    def send() -> None:
        with psycopg.connect(primary.dsn, autocommit=True) as sender:
            while not stop.wait(0.1):
                sender.execute("NOTIFY doctor_flow")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        hook_waiter.wait("listener_disconnected")
    finally:
        stop.set()
        sender.join()
    assert received, "notifications were flowing when the server ended the session"

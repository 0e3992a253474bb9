"""``pg-listener doctor``: check an environment before a listener is deployed there.

Each check asks the server (or the pooler in front of it) one question a
listener depends on and answers ok, warn or fail, with advice. The checks
run on connections the caller's factory opens, exactly as a listener's
would be, so a DSN that goes through a pooler is checked through it.
Nothing is changed on the server: the only writes are two notifications on
a channel of the doctor's own that nobody listens to.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any, Literal

import psycopg

from . import _keepalive

Status = Literal["ok", "warn", "fail"]
ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]

ROUND_TRIP_TIMEOUT = 2.0
"""Seconds the doctor waits for its own notification to come back."""
IDLE_IN_TRANSACTION_AFTER = 60.0
"""Sessions idle in transaction for longer than this are named."""
QUEUE_WARN = 0.1
QUEUE_FAIL = 0.5
"""Queue usage from which the doctor warns, and fails: the server warns in its
log from half full, and commits that NOTIFY fail once it is full."""
SLOW_DETECTION = 600.0
"""Keepalive settings that detect a dead peer more slowly than this (seconds)
are reported."""


@dataclass(frozen=True)
class Check:
    """The answer to one question: ``status``, what was found, what to do."""

    name: str
    status: Status
    message: str
    advice: str = ""

    def __str__(self) -> str:
        line = f"{self.status:<4}  {self.name}: {self.message}"
        return f"{line}; {self.advice}" if self.advice else line


def run_checks(
    connect: ConnectionFactory,
    *,
    idle_in_transaction_after: float = IDLE_IN_TRANSACTION_AFTER,
) -> list[Check]:
    """Run every check on connections made by ``connect``, in the order printed.

    ``connect`` is called twice (a second session is needed to tell whether
    the first one is kept); what it raises is not caught.
    """
    with _session(connect) as conn:
        in_recovery = bool(_value(conn, "SELECT pg_is_in_recovery()"))
        checks = [
            _guard("server version", _server_version, conn),
            _recovery(in_recovery),
            _guard("session", _session_kept, conn, connect),
            _guard("LISTEN round trip", _round_trip, conn, connect),
            _guard("idle_session_timeout", _idle_session_timeout, conn),
            _guard("idle_in_transaction_session_timeout", _idle_in_transaction, conn),
            _guard("keepalives (DSN)", _dsn_keepalives, conn),
            _guard("keepalives (server)", _server_keepalives, conn),
            _guard("max_notify_queue_pages", _queue_pages, conn),
            _guard("queue usage", _queue_usage, conn),
            _guard(
                "sessions idle in transaction",
                _idle_sessions,
                conn,
                idle_in_transaction_after,
            ),
            _guard("payload limit", _payload_limit, conn, in_recovery),
        ]
    return checks


def exit_status(checks: Sequence[Check]) -> int:
    """0, or 1 when any check failed."""
    return 1 if any(check.status == "fail" for check in checks) else 0


def print_checks(checks: Sequence[Check], file: IO[str] | None = None) -> None:
    """One line per check: status, name, finding, advice."""
    out = file if file is not None else sys.stdout
    for check in checks:
        out.write(f"{check}\n")


def add_command(
    commands: Any, parents: list[argparse.ArgumentParser], epilog: str
) -> None:
    """Add ``doctor`` to the command line's subcommands."""
    doctor = commands.add_parser(
        "doctor",
        parents=parents,
        help="check an environment before deploying a listener there",
        description=textwrap.fill(
            "Check the server (or the pooler) the DSN names for what a listener"
            " needs: one line per check, ok, warn or fail, with advice. Exit"
            " status 0, or 1 when a check fails (2 when the server cannot be"
            " reached).",
            width=78,
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    # Imported here: the command line imports this module to build its parser.
    from .cli import connect, resolve_dsn

    dsn = resolve_dsn(args.dsn)
    checks = run_checks(lambda: connect(dsn))
    print_checks(checks)
    return exit_status(checks)


# -- helpers -------------------------------------------------------------------


def _session(connect: ConnectionFactory) -> psycopg.Connection[Any]:
    conn = connect()
    conn.autocommit = True
    # Named prepared statements do not survive a pooler in transaction mode.
    conn.prepare_threshold = None
    return conn


def _value(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _setting(conn: psycopg.Connection[Any], name: str) -> float | None:
    """A numeric setting in its base unit (ms, s, pages), ``None`` if absent."""
    value = _value(conn, "SELECT setting FROM pg_settings WHERE name = %s", (name,))
    return None if value is None else float(value)


def _guard(name: str, check: Callable[..., Check], *args: Any) -> Check:
    """Run one check; a statement the server refuses makes that check fail only."""
    try:
        return check(*args)
    except psycopg.Error as ex:
        return Check(name, "fail", f"the check itself failed: {_one_line(ex)}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _seconds(value: float) -> str:
    """``7875`` -> ``2 h 11 min 15 s``: durations as people read them."""
    if value < 60:
        return f"{value:g} s"
    total = round(value)
    parts = [(total // 3600, "h"), (total % 3600 // 60, "min"), (total % 60, "s")]
    return " ".join(f"{amount} {unit}" for amount, unit in parts if amount)


# -- the checks ------------------------------------------------------------------


def _server_version(conn: psycopg.Connection[Any]) -> Check:
    name = "server version"
    version = _value(conn, "SHOW server_version")
    major = conn.info.server_version // 10000
    if major < 10:
        return Check(
            name,
            "fail",
            f"PostgreSQL {version}",
            "psycopg 3 needs PostgreSQL 10 or later: upgrade the server",
        )
    # Each major version is supported for five years, until November.
    end = date(2012 + major, 11, 30)
    if date.today() > end:
        return Check(
            name,
            "warn",
            f"PostgreSQL {version}, no longer supported since {end:%B %Y}",
            "upgrade: fixes, LISTEN/NOTIFY's included, no longer reach it",
        )
    return Check(name, "ok", f"PostgreSQL {version}")


def _recovery(in_recovery: bool) -> Check:
    if in_recovery:
        return Check(
            "in recovery",
            "fail",
            "the server is a standby: it refuses LISTEN, and notifications"
            " are not replicated to it",
            "point the listener at the primary (with several hosts in the DSN,"
            " add target_session_attrs=read-write)",
        )
    return Check("in recovery", "ok", "no: a primary, which accepts LISTEN")


def _session_kept(conn: psycopg.Connection[Any], connect: ConnectionFactory) -> Check:
    """Whether the session survives across statements and transactions.

    A second session holds a transaction open meanwhile: behind a pooler in
    transaction mode the first session's next statement must then run on
    another server connection, where its pid and its settings differ.
    """
    name = "session"
    token = uuid.uuid4().hex
    setting = "classic_pg_listener.doctor"
    probe = f"SELECT pg_backend_pid(), current_setting('{setting}', true)"
    conn.execute("SELECT set_config(%s, %s, false)", (setting, token))
    seen = [conn.execute(probe).fetchone()]
    with _session(connect) as other:
        try:
            with other.transaction():
                other.execute("SELECT pg_backend_pid()")
                seen.append(conn.execute(probe).fetchone())
        except psycopg.Error as ex:
            return Check(
                name,
                "fail",
                f"a transaction block was refused ({_one_line(ex)}): a pooler in"
                " statement mode, which does not keep a session",
                "connect the listener to PostgreSQL directly, or through a pool"
                " in session mode",
            )
    seen.append(conn.execute(probe).fetchone())
    pids = {row[0] for row in seen if row is not None}
    kept = len(pids) == 1 and all(row is not None and row[1] == token for row in seen)
    if not kept:
        return Check(
            name,
            "fail",
            f"not kept across statements (backend pids {sorted(pids)}, a session"
            " setting lost): a pooler in transaction or statement mode; LISTEN"
            " would stay behind on a server connection the listener no longer has",
            "connect the listener to PostgreSQL directly, or through a pool in"
            " session mode (pool_mode = session); senders may keep the pooler",
        )
    message = "kept across statements and transactions"
    server_port = _value(conn, "SELECT inet_server_port()")
    client_port = conn.info.port
    if server_port is not None and client_port and int(server_port) != client_port:
        message += (
            f" (through a proxy or pooler: port {client_port}, the server's"
            f" {server_port}; it must stay in session mode)"
        )
    return Check(name, "ok", message)


def _round_trip(conn: psycopg.Connection[Any], connect: ConnectionFactory) -> Check:
    name = "LISTEN round trip"
    channel = f"pg_listener_doctor_{uuid.uuid4().hex[:12]}"
    conn.execute(f'LISTEN "{channel}"')
    try:
        with _session(connect) as other:
            other.execute("SELECT pg_notify(%s, 'doctor')", (channel,))
        got = list(conn.notifies(timeout=ROUND_TRIP_TIMEOUT, stop_after=1))
    finally:
        conn.execute(f'UNLISTEN "{channel}"')
    if not got:
        return Check(
            name,
            "fail",
            f"a notification sent from another session did not arrive within"
            f" {ROUND_TRIP_TIMEOUT:g} s",
            "the session that ran LISTEN is not the one the connection reads:"
            " see the session check",
        )
    return Check(name, "ok", "a notification from another session arrived")


def _idle_session_timeout(conn: psycopg.Connection[Any]) -> Check:
    name = "idle_session_timeout"
    value = _setting(conn, name)
    if value is None:
        return Check(name, "ok", "not in this server version (before 14)")
    if value == 0:
        return Check(name, "ok", "0 (off)")
    return Check(
        name,
        "fail",
        f"{_seconds(value / 1000)}: the server ends a session that sends no"
        " statement for that long, even while notifications flow to it; the"
        " listener then reconnects and misses what was sent meanwhile",
        "turn it off for the listener's role (ALTER ROLE ... SET"
        " idle_session_timeout = 0, or options='-c idle_session_timeout=0' in"
        " its DSN)",
    )


def _idle_in_transaction(conn: psycopg.Connection[Any]) -> Check:
    name = "idle_in_transaction_session_timeout"
    value = _setting(conn, name)
    if not value:
        return Check(
            name,
            "ok",
            "0 (off): a session left idle in transaction is never ended; if it"
            " listens, it holds the notification queue back all that time"
            " (the listener itself runs in autocommit, never idle in transaction)",
        )
    return Check(
        name,
        "ok",
        f"{_seconds(value / 1000)}: sessions idle in transaction longer are"
        " ended, which bounds how long one can hold the notification queue back",
    )


def _system_default(name: str, fallback: int) -> int:
    """Linux's keepalive defaults (``tcp_keepalive_<name>``), which apply where
    the DSN sets nothing."""
    try:
        return int(Path("/proc/sys/net/ipv4", f"tcp_keepalive_{name}").read_text())
    except (OSError, ValueError):
        return fallback


def _dsn_keepalives(conn: psycopg.Connection[Any]) -> Check:
    name = "keepalives (DSN)"
    host = conn.info.host
    if host.startswith(("/", "@")):
        return Check(name, "ok", "a Unix-domain socket: no network to watch")
    options = _keepalive.dsn_keepalive_options(conn.pgconn)
    if not options:
        bound = _keepalive.detection_bound()
        return Check(
            name,
            "ok",
            "none set: the listener sets its own (idle"
            f" {_keepalive.KEEPALIVE_IDLE} s, {_keepalive.KEEPALIVE_COUNT} probes"
            f" {_keepalive.KEEPALIVE_INTERVAL} s apart, tcp_user_timeout"
            f" {_keepalive.USER_TIMEOUT_MS} ms): a silent server is detected"
            f" within {_seconds(bound)}, unless tcp_keepalive=False",
        )
    shown = " ".join(f"{key}={value}" for key, value in options.items())
    if options.get("keepalives") == "0":
        return Check(
            name,
            "warn",
            f"{shown}: off, so only the ping detects a silent server, and with"
            " ping_period=0 nothing does",
            "remove keepalives=0 from the DSN and let the listener set its own",
        )
    idle = options.get("keepalives_idle") or _system_default("time", 7200)
    interval = options.get("keepalives_interval") or _system_default("intvl", 75)
    count = options.get("keepalives_count") or _system_default("probes", 9)
    user_timeout = options.get("tcp_user_timeout") or 0
    bound = _keepalive.detection_bound(
        float(idle), float(interval), int(count), float(user_timeout)
    )
    status: Status = "warn" if bound > SLOW_DETECTION else "ok"
    advice = (
        "lower keepalives_idle, or drop these options and let the listener set its own"
        if status == "warn"
        else ""
    )
    return Check(
        name,
        status,
        f"{shown}: the listener keeps them; a silent server is detected within"
        f" about {_seconds(bound)}",
        advice,
    )


def _server_keepalives(conn: psycopg.Connection[Any]) -> Check:
    name = "keepalives (server)"
    idle = _setting(conn, "tcp_keepalives_idle") or 0
    interval = _setting(conn, "tcp_keepalives_interval") or 0
    count = _setting(conn, "tcp_keepalives_count") or 0
    user_timeout = _setting(conn, "tcp_user_timeout") or 0
    if not idle:
        return Check(name, "ok", "this session reaches the server over a Unix socket")
    bound = _keepalive.detection_bound(idle, interval, int(count), user_timeout)
    shown = (
        f"tcp_keepalives_idle={idle:g} tcp_keepalives_interval={interval:g}"
        f" tcp_keepalives_count={count:g} tcp_user_timeout={user_timeout:g}"
    )
    if bound > SLOW_DETECTION:
        return Check(
            name,
            "warn",
            f"{shown}: a listener that vanishes without closing its connection"
            f" keeps its server session for about {_seconds(bound)}, and can hold"
            " the notification queue back meanwhile",
            "set tcp_keepalives_idle (60), tcp_keepalives_interval (10) and"
            " tcp_keepalives_count (6) on the server",
        )
    return Check(
        name,
        "ok",
        f"{shown}: the server drops a vanished client's session within about"
        f" {_seconds(bound)}",
    )


def _queue_pages(conn: psycopg.Connection[Any]) -> Check:
    name = "max_notify_queue_pages"
    pages = _setting(conn, name)
    if pages is None:
        return Check(
            name, "ok", "not in this server version (before 17): the queue holds 8 GB"
        )
    block = _setting(conn, "block_size") or 8192
    size = pages * block
    shown = f"{pages:g} pages: the queue holds {size / 2**30:.3g} GB"
    if size < 2**30:
        return Check(
            name,
            "warn",
            shown,
            "a small queue fills fast when a listener falls behind, and then"
            " commits that NOTIFY fail cluster-wide: raise it",
        )
    return Check(name, "ok", shown)


def _queue_usage(conn: psycopg.Connection[Any]) -> Check:
    name = "queue usage"
    usage = float(_value(conn, "SELECT pg_notification_queue_usage()"))
    shown = f"{usage:.4%} of the notification queue in use"
    if usage >= QUEUE_WARN:
        return Check(
            name,
            "fail" if usage >= QUEUE_FAIL else "warn",
            shown + "; when it is full, commits that NOTIFY fail cluster-wide",
            "find the listening session that does not read: see the sessions"
            " idle in transaction, and the server log, which names it",
        )
    return Check(name, "ok", shown)


def _idle_sessions(conn: psycopg.Connection[Any], older_than: float) -> Check:
    name = "sessions idle in transaction"
    rows = conn.execute(
        "SELECT pid, datname, usename, extract(epoch FROM now() - xact_start)"
        " FROM pg_stat_activity"
        " WHERE state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
        " AND now() - xact_start >= make_interval(secs => %s)"
        " ORDER BY xact_start",
        (older_than,),
    ).fetchall()
    if not rows:
        return Check(name, "ok", f"none for longer than {_seconds(older_than)}")
    shown = ", ".join(
        f"pid {pid} ({user}@{db}, {_seconds(math.floor(float(age)))})"
        for pid, db, user, age in rows[:5]
    )
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return Check(
        name,
        "warn",
        f"{len(rows)}: {shown}{more}; one that listens holds the notification"
        " queue back until it ends its transaction",
        "end them (pg_terminate_backend(pid)) or set"
        " idle_in_transaction_session_timeout",
    )


def _payload_limit(conn: psycopg.Connection[Any], in_recovery: bool) -> Check:
    name = "payload limit"
    block = int(_setting(conn, "block_size") or 8192)
    identifier = int(_setting(conn, "max_identifier_length") or 63)
    # NOTIFY_PAYLOAD_MAX_LENGTH: BLCKSZ - NAMEDATALEN - 128, exclusive.
    limit = block - (identifier + 1) - 128
    shown = f"payloads must be shorter than {limit} bytes"
    advice = "send an identifier and let the callback read the data from a table"
    if in_recovery:
        return Check(name, "ok", shown + " (computed; a standby sends none)", advice)
    channel = f"pg_listener_doctor_{uuid.uuid4().hex[:12]}"
    query = "SELECT pg_notify(%s, repeat('x', %s))"
    conn.execute(query, (channel, limit - 1))
    try:
        conn.execute(query, (channel, limit))
    except psycopg.errors.InvalidParameterValue as ex:
        if re.search("too long", str(ex)):
            return Check(name, "ok", shown + " (tried)", advice)
        raise
    return Check(
        name, "warn", f"a payload of {limit} bytes was accepted: a patched server?"
    )

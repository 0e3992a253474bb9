"""A real PgBouncer in front of a test server, for tests of what poolers do.

Debian's ``pgbouncer`` binary (CI installs it), started by the test on a
free port with an ini file of its own: ``auth_type = any`` (the shared
server trusts loopback) and a wildcard database entry, so every database of
the target is reachable under its own name. PgBouncer refuses to run as
root, so as root it runs as ``postgres``, like the throwaway servers. One
process per pool mode and target, for the whole session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from classic.pg.listener.testing import wait_until
from fix_server import _free_port

_RUN_AS = "postgres"


class PgBouncer:
    """A PgBouncer process on 127.0.0.1:``port`` pooling ``target``'s server."""

    def __init__(self, target: str, pool_mode: str = "transaction") -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            raise RuntimeError(
                "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
            )
        params = conninfo_to_dict(target)
        self.pool_mode = pool_mode
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-listener-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        server = make_conninfo(
            host=str(params.get("host", "127.0.0.1")),
            port=str(params.get("port", "5432")),
            user=str(params.get("user", "postgres")),
        )
        (self.root / "pgbouncer.ini").write_text(
            f"[databases]\n* = {server}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {pool_mode}\n"
            f"logfile = {self.log}\n"
            "max_client_conn = 100\ndefault_pool_size = 10\n"
        )
        self.dsn = make_conninfo(
            target, host="127.0.0.1", port=str(self.port), hostaddr=None
        )
        # -q: the log goes to the log file only, never to a pipe that fills.
        command = [binary, "-q", str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.root, _RUN_AS, _RUN_AS)
            command = ["runuser", "-u", _RUN_AS, "--", *command]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_until(self._accepts, f"pgbouncer on port {self.port}", timeout=15)
        except BaseException:
            self.close()
            raise

    def _accepts(self) -> bool:
        if self._process.poll() is not None:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pgbouncer exited ({self._process.returncode}):\n{log}")
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def close(self) -> None:
        if self._process.poll() is None:
            # runuser passes SIGTERM on to pgbouncer.
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def make_pgbouncer() -> Iterator[Callable[..., PgBouncer]]:
    """``make_pgbouncer(target_dsn, pool_mode="transaction")``: one per pair."""
    started: dict[tuple[str, str], PgBouncer] = {}

    def make(target: str, pool_mode: str = "transaction") -> PgBouncer:
        key = (target, pool_mode)
        if key not in started:
            started[key] = PgBouncer(target, pool_mode)
        return started[key]

    try:
        yield make
    finally:
        for bouncer in started.values():
            bouncer.close()


@pytest.fixture(scope="session")
def pgbouncer(make_pgbouncer: Callable[..., PgBouncer], dsn: str) -> PgBouncer:
    """A PgBouncer in ``pool_mode = transaction`` in front of the test server."""
    return make_pgbouncer(dsn, "transaction")

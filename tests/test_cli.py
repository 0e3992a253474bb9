"""The ``pg-listener`` command, driven as a user drives it: real processes, real server.

Every command runs as a subprocess, through ``python -m classic.pg.listener``
or the installed ``pg-listener`` script. Tests synchronise on the lines the
command prints (the "listening on" status line on stderr, notifications on
stdout), never on sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

import pytest
from psycopg.conninfo import conninfo_to_dict

from classic.pg.listener.testing import WAIT, notify

SCRIPT = Path(sys.executable).parent / "pg-listener"
MODULE = [sys.executable, "-m", "classic.pg.listener"]
AUTOLOAD_OFF = "CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any connection setting of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") and key != "DATABASE_URL"
    }
    env.update(extra)
    return env


class Command:
    """A running ``pg-listener``, whose output lines can be awaited."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else clean_env(),
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: queue.Queue[str] = queue.Queue()
        self.stderr_seen: list[str] = []
        for stream, into in (
            (self.proc.stdout, self.stdout),
            (self.proc.stderr, self.stderr),
        ):
            threading.Thread(
                target=self._pump, args=(stream, into), daemon=True
            ).start()

    @staticmethod
    def _pump(stream: IO[str] | None, into: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            into.put(line.rstrip("\n"))

    def line(self) -> str:
        """The next line on stdout."""
        try:
            return self.stdout.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no output within {WAIT} s; stderr: {self.stderr_seen}")

    def wait_stderr(self, text: str) -> str:
        """Read stderr until a line containing ``text``; return that line."""
        deadline = time.monotonic() + WAIT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.stderr.get(timeout=remaining)
            except queue.Empty:
                break
            self.stderr_seen.append(line)
            if text in line:
                return line
        pytest.fail(f"no {text!r} on stderr within {WAIT} s: {self.stderr_seen}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=WAIT)


@pytest.fixture
def start() -> Iterator[Callable[..., Command]]:
    started: list[Command] = []

    def start(*args: str, env: dict[str, str] | None = None, script: bool = False):
        command = Command([str(SCRIPT), *args] if script else [*MODULE, *args], env)
        started.append(command)
        return command

    yield start
    for command in started:
        if command.proc.poll() is None:
            command.proc.kill()
        command.proc.wait(timeout=WAIT)
        for stream in (command.proc.stdin, command.proc.stdout, command.proc.stderr):
            if stream is not None:
                stream.close()


def run_cli(*args: str, env: dict[str, str] | None = None, script: bool = False):
    """Run a command to its end, well within a test's few seconds."""
    return subprocess.run(
        [str(SCRIPT), *args] if script else [*MODULE, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=WAIT,
    )


@pytest.fixture
def dead_dsn() -> str:
    """A DSN whose port refuses connections: a port just bound, then freed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"host=127.0.0.1 port={port} dbname=test user=postgres connect_timeout=3"


# -- listen and notify -------------------------------------------------------------


def test_listen_prints_what_notify_sends(start, dsn, channel):
    other = channel + "_b"
    listen = start("listen", "--dsn", dsn, channel, other, script=True)
    ready = listen.wait_stderr("listening on")
    assert f"{channel}, {other}" in ready
    assert session_of(dsn) in ready

    for chan, payload in ((channel, "hello world"), (other, "second")):
        sent = run_cli("notify", "--dsn", dsn, chan, payload, script=True)
        assert (sent.returncode, sent.stdout, sent.stderr) == (0, "", "")
        line = listen.line()
        assert f" {chan} (pid " in line
        assert line.endswith(f"): {payload}")
    assert listen.stop() == 0


def test_listen_json_lines(start, dsn, conn, channel):
    listen = start("listen", "--json", "--dsn", dsn, channel)
    listen.wait_stderr("listening on")
    payload = 'quotes " and\nnewline, ünïcode'
    notify(conn, channel, payload)

    event = json.loads(listen.line())
    assert event.keys() == {"channel", "payload", "pid", "time"}
    assert event["channel"] == channel
    assert event["payload"] == payload
    assert event["pid"] == conn.info.backend_pid
    assert datetime.fromisoformat(event["time"]).tzinfo is not None
    assert listen.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_listen_stops_cleanly_on_signal(start, dsn, channel, signum):
    listen = start("listen", "--dsn", dsn, channel)
    listen.wait_stderr("listening on")
    started = time.monotonic()
    assert listen.stop(signum) == 0
    assert time.monotonic() - started < 3
    listen.wait_stderr(f"{signal.Signals(signum).name} received, stopping")


@pytest.mark.parametrize("command", [["listen", "ch"], ["run"], ["notify", "ch", "p"]])
def test_unreachable_server_fails_fast_with_one_line(command, dead_dsn):
    started = time.monotonic()
    result = run_cli(*command, "--dsn", dead_dsn)
    assert time.monotonic() - started < 5
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pg-listener: cannot connect to PostgreSQL:")
    assert "Connection refused" in lines[0]


def test_malformed_dsn_is_one_line_too():
    result = run_cli("notify", "--dsn", "not a dsn", "ch")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "cannot connect to PostgreSQL" in result.stderr


def test_database_url_and_libpq_variables(dsn, conn, channel, dead_dsn):
    conn.execute(f'LISTEN "{channel}"')

    def received() -> list[str]:
        return [n.payload for n in conn.notifies(timeout=WAIT, stop_after=1)]

    result = run_cli("notify", channel, "via url", env=clean_env(DATABASE_URL=dsn))
    assert result.returncode == 0, result.stderr
    assert received() == ["via url"]

    # --dsn wins over DATABASE_URL, which wins over the PG* variables.
    result = run_cli(
        "notify", "--dsn", dsn, channel, "via dsn", env=clean_env(DATABASE_URL=dead_dsn)
    )
    assert result.returncode == 0, result.stderr
    assert received() == ["via dsn"]
    result = run_cli("notify", channel, "lost", env=clean_env(DATABASE_URL=dead_dsn))
    assert result.returncode == 2

    libpq = {
        f"PG{key.upper()}": str(value)
        for key, value in conninfo_to_dict(dsn).items()
        if key in ("host", "port", "dbname", "user", "password")
    }
    libpq["PGDATABASE"] = libpq.pop("PGDBNAME", "")
    result = run_cli("notify", channel, "via env", env=clean_env(**libpq))
    assert result.returncode == 0, result.stderr
    assert received() == ["via env"]


def session_of(dsn: str) -> str:
    """How the CLI names the session the DSN opens: a mismatch must show (#10)."""
    given = conninfo_to_dict(dsn)
    return f"database {given['dbname']}, user {given['user']}, host {given['host']}"


def test_notify_verbose_names_the_session(dsn, conn, channel):
    conn.execute(f'LISTEN "{channel}"')
    result = run_cli("notify", "-v", "--dsn", dsn, channel, "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"pg-listener: notified {channel} (")
    assert session_of(dsn) in line
    assert [n.payload for n in conn.notifies(timeout=WAIT, stop_after=1)] == ["hi"]


def test_notify_reports_a_refused_payload(dsn):
    result = run_cli("notify", "--dsn", dsn, "ch", "x" * 9000)
    assert result.returncode == 1
    assert result.stderr.startswith("pg-listener: error:")
    assert "payload string too long" in result.stderr


def test_bad_channel_is_a_usage_error():
    result = run_cli("listen", "x" * 64)
    assert result.returncode == 2
    assert "PostgreSQL allows at most 63" in result.stderr


@pytest.mark.parametrize("command", ["listen", "run", "plugins", "notify"])
def test_every_command_explains_itself(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    if command != "plugins":
        assert "DATABASE_URL" in result.stdout
        assert "PGHOST" in result.stdout


# -- plugins and run ---------------------------------------------------------------

GOOD_PLUGIN = """
import sys
from classic.pg.listener import hookimpl

def on_notify(notify):
    print("begin", notify.payload, flush=True)
    if notify.payload == "wait":
        sys.stdin.readline()  # the test says when this callback may end
    print("end", notify.payload, flush=True)

@hookimpl
def listener_register_callbacks(register):
    register(on_notify, {channel!r})

@hookimpl
def listener_connected(listener):
    pass
"""

RAISING_PLUGIN = """
from classic.pg.listener import hookimpl

@hookimpl
def listener_register_callbacks(register):
    raise RuntimeError("no channel for you")
"""


SLOW_PLUGIN = """
import sys
import time
from classic.pg.listener import hookimpl

def slow(notify):
    # One write per line: the two workers print side by side.
    sys.stdout.write(f"begin {{notify.payload}}\\n")
    sys.stdout.flush()
    time.sleep(3)

@hookimpl
def listener_register_callbacks(register):
    register(slow, {channel!r})
"""

# stderr as BufferedWriter guards it: a write that a signal handler interrupts
# and re-enters raises "reentrant call". The signal comes in the middle of the
# main thread's "listening on" line, deterministically.
REENTRANCY_PLUGIN = """
import signal
import sys


class Guarded:
    def __init__(self, stream):
        self.stream = stream
        self.busy = False

    def write(self, text):
        if self.busy:
            raise RuntimeError("reentrant call inside <stderr>")
        self.busy = True
        try:
            if "listening on" in text:
                signal.raise_signal(signal.SIGINT)  # its handler runs here
            return self.stream.write(text)
        finally:
            self.busy = False

    def __getattr__(self, name):
        return getattr(self.stream, name)


sys.stderr = Guarded(sys.stderr)
"""


def write_plugins(path: Path, channel: str, **modules: str) -> dict[str, str]:
    """Install plugin modules as one distribution under ``path``: entry-point
    names made unique per test, module source by name."""
    names = {name: f"{name}_{uuid.uuid4().hex[:8]}" for name in modules}
    dist = path / "fake_cli_plugins-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-cli-plugins\nVersion: 1.2\n"
    )
    lines = ["[classic_pg_listener]"]
    for name, source in modules.items():
        (path / f"{names[name]}.py").write_text(source.format(channel=channel))
        lines.append(f"{names[name]} = {names[name]}")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return names


def plugin_env(path: Path, names: dict[str, str], **extra: str) -> dict[str, str]:
    """Autoload on, only our plugins, found through PYTHONPATH."""
    env = clean_env(
        PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]),
        CLASSIC_PG_LISTENER_LOAD_PLUGINS=",".join(names.values()),
        **extra,
    )
    env.pop(AUTOLOAD_OFF, None)
    return env


def test_plugins_lists_loaded_and_broken_ones(tmp_path, channel):
    names = write_plugins(
        tmp_path,
        channel,
        good=GOOD_PLUGIN,
        broken="raise ImportError('missing dependency: frobnicate')",
        raising=RAISING_PLUGIN,
    )
    env = plugin_env(tmp_path, names)

    result = run_cli("plugins", "--json", env=env, script=True)
    assert result.returncode == 1  # some plugin is broken
    assert "Traceback" not in result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[names["good"]] == {
        "name": names["good"],
        "distribution": "fake-cli-plugins",
        "version": "1.2",
        "hooks": ["listener_connected", "listener_register_callbacks"],
        "channels": [channel],
        "error": None,
    }
    broken = rows[names["broken"]]
    assert (
        "failed to load: ImportError: missing dependency: frobnicate" in broken["error"]
    )
    assert "RuntimeError: no channel for you" in rows[names["raising"]]["error"]

    result = run_cli("plugins", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    assert f"{names['good']} (fake-cli-plugins 1.2)" in out
    assert f"  channels: {channel}" in out
    assert "  hooks: listener_connected, listener_register_callbacks" in out
    assert "  error: entry point" in out
    assert "missing dependency: frobnicate" in out


def test_plugins_without_any():
    env = clean_env(CLASSIC_PG_LISTENER_LOAD_PLUGINS="")
    result = run_cli("plugins", "--json", env=env)
    assert (result.returncode, json.loads(result.stdout)) == (0, [])
    result = run_cli("plugins", env=env)
    assert result.stdout.startswith("no plugins found")


def test_run_serves_plugins_and_lets_callbacks_finish(
    start, tmp_path, dsn, conn, channel
):
    names = write_plugins(tmp_path, channel, good=GOOD_PLUGIN)
    run = start("run", "--dsn", dsn, "--workers", "2", env=plugin_env(tmp_path, names))
    ready = run.wait_stderr("listening on")
    assert f"listening on {channel}" in ready
    assert f"plugins: {names['good']}" in ready

    notify(conn, channel, "quick")
    assert [run.line(), run.line()] == ["begin quick", "end quick"]

    # A callback still running when SIGTERM comes is waited for.
    notify(conn, channel, "wait")
    assert run.line() == "begin wait"
    run.proc.send_signal(signal.SIGTERM)
    run.wait_stderr("SIGTERM received, stopping")
    assert run.proc.poll() is None
    assert run.proc.stdin is not None
    run.proc.stdin.write("go on\n")
    run.proc.stdin.flush()
    assert run.line() == "end wait"
    assert run.proc.wait(timeout=WAIT) == 0


def test_second_ctrl_c_exits_at_once_with_status_130(
    start, tmp_path, dsn, conn, channel
):
    names = write_plugins(tmp_path, channel, slow=SLOW_PLUGIN)
    run = start("run", "--dsn", dsn, "--workers", "2", env=plugin_env(tmp_path, names))
    run.wait_stderr("listening on")
    # Two callbacks of 3 s running, four queued behind them: 6 s of backlog.
    notify(conn, channel, *(str(i) for i in range(6)))
    assert [run.line()[:6], run.line()[:6]] == ["begin ", "begin "]

    run.proc.send_signal(signal.SIGINT)
    run.wait_stderr("SIGINT received, stopping")
    interrupted = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=WAIT) == 130
    # "About a second" on a loaded machine; waiting for the backlog takes 6 s.
    assert time.monotonic() - interrupted < 1.5
    run.wait_stderr("interrupted")


def test_signal_handler_does_no_io(start, tmp_path, dsn, channel):
    # The first SIGINT arrives while the main thread writes to stderr: a
    # handler that printed would re-enter that write and crash the command.
    names = write_plugins(tmp_path, channel, guard=REENTRANCY_PLUGIN)
    run = start("run", "--dsn", dsn, env=plugin_env(tmp_path, names))
    run.wait_stderr("SIGINT received, stopping")
    assert run.proc.wait(timeout=WAIT) == 0, run.stderr_seen
    assert not any("Traceback" in line for line in run.stderr_seen)


def test_plugins_listing_creates_no_file(tmp_path, channel):
    path = tmp_path / "out.jsonl"
    env = clean_env(
        CLASSIC_PG_LISTENER_LOAD_PLUGINS="jsonl",
        CLASSIC_PG_LISTENER_JSONL_CHANNELS=channel,
        CLASSIC_PG_LISTENER_JSONL_PATH=str(path),
    )
    env.pop(AUTOLOAD_OFF, None)
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert (row["name"], row["channels"]) == ("jsonl", [channel])
    assert not path.exists()


def test_run_blocks_plugins_by_name(start, tmp_path, dsn, channel):
    names = write_plugins(tmp_path, channel, good=GOOD_PLUGIN)
    env = plugin_env(tmp_path, names)
    run = start("run", "--dsn", dsn, "--block", names["good"], env=env)
    assert run.wait_stderr("listening on").endswith("plugins: none")
    assert run.stop(signal.SIGINT) == 0

    run = start("run", "--dsn", dsn, "--no-autoload", "--ping-period", "0", env=env)
    assert run.wait_stderr("listening on").endswith("plugins: none")
    assert run.stop() == 0


def test_run_refuses_a_broken_plugin_unless_blocked(start, tmp_path, dsn, channel):
    names = write_plugins(tmp_path, channel, broken="import no_such_module_here")
    env = plugin_env(tmp_path, names)
    result = run_cli("run", "--dsn", dsn, env=env)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "failed to load: ModuleNotFoundError" in lines[0]

    # Blocking it by name is how a user gets past it.
    run = start("run", "--dsn", dsn, "--block", names["broken"], env=env)
    assert run.wait_stderr("listening on").endswith("plugins: none")
    assert run.stop() == 0


def test_module_and_script_are_the_same_command():
    assert SCRIPT.exists(), "the console script is installed with the package"
    by_module = run_cli("--help")
    by_script = run_cli("--help", script=True)
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout == by_script.stdout

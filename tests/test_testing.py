"""classic.pg.listener.testing as users get it: a pytest11 plugin that does
nothing until asked, and the fixtures it gives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from classic.pg.listener import Listener, notify
from classic.pg.listener.testing import DSN_ENV, Recorder

ENTRY_POINT = "classic.pg.listener.testing"


def run_pytest(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """pytest in a project of its own: no conftest of ours, only what is installed."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.pop(DSN_ENV, None)
    env.update(extra)
    return env


def test_installed_plugin_does_nothing_unless_asked(tmp_path):
    """No DSN, no binaries, no Docker: a session that uses no fixture still passes,
    so the plugin started nothing and tried nothing."""
    (tmp_path / "test_plain.py").write_text(
        textwrap.dedent(
            f"""
            def test_plain(request):
                assert request.config.pluginmanager.has_plugin({ENTRY_POINT!r})
            """
        )
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    env = bare_env(
        CLASSIC_PG_LISTENER_PGBIN=str(tmp_path / "no-binaries-here"),
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
        TMPDIR=str(temp),
    )
    result = run_pytest(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert not list(temp.glob("pg-listener-tests-*"))


def test_a_fixture_without_a_server_fails_never_skips(tmp_path):
    (tmp_path / "test_uses.py").write_text("def test_uses(conn):\n    pass\n")
    env = bare_env(
        CLASSIC_PG_LISTENER_PGBIN=str(tmp_path / "no-binaries-here"),
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
    )
    result = run_pytest(tmp_path, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "no PostgreSQL for the tests" in result.stdout
    assert "skipped" not in result.stdout


def test_users_fixtures_without_pytest_plugins(tmp_path, dsn):
    """A user's suite: the entry point gives the fixtures, no conftest needed."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            from classic.pg.listener import notify

            def test_orders(listener, recorder, conn, channel):
                notify(conn, channel, "order 1")
                notify(conn, channel, "order 2")
                assert [n.payload for n in recorder.wait(2)] == ["order 1", "order 2"]
                assert listener.backend_pid is not None
            """
        )
    )
    result = run_pytest(tmp_path, bare_env(**{DSN_ENV: dsn}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_embedded_server_for_a_session_without_dsn(tmp_path):
    """No DSN, no Docker: the session starts an embedded server (as an
    unprivileged user when run as root), and stops and removes it at the end."""
    (tmp_path / "test_embedded.py").write_text(
        textwrap.dedent(
            """
            import os
            from pathlib import Path

            def test_server(conn, dsn):
                Path("dsn.txt").write_text(dsn)
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                status = Path(f"/proc/{pid}/status").read_text()
                uid = int(status.split("Uid:")[1].split()[0])
                Path("uid.txt").write_text(str(uid))
                version = conn.execute("SHOW server_version_num").fetchone()[0]
                Path("version.txt").write_text(version)
            """
        )
    )
    env = bare_env(DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    result = run_pytest(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    if os.geteuid() == 0:
        assert int((tmp_path / "uid.txt").read_text()) != 0
    assert int((tmp_path / "version.txt").read_text()) >= 160000
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect((tmp_path / "dsn.txt").read_text(), connect_timeout=2)


def test_listener_fixture_is_running(listener: Listener, channel):
    assert listener.is_alive()
    assert listener.backend_pid is not None
    assert listener.channels == {}


def test_recorder_waits_for_n(recorder, conn, channel):
    notify(conn, channel, "a")
    notify(conn, channel, "b")
    notify(conn, channel, "c")
    assert [n.payload for n in recorder.wait(2)] == ["a", "b"]
    assert [n.payload for n in recorder.wait(3)] == ["a", "b", "c"]
    assert recorder.payloads == ["a", "b", "c"]


def test_recorder_counts_per_channel(listener, conn, channel):
    got = Recorder()
    other = f"{channel}_other"
    listener.add_callback(got, channel).result()
    listener.add_callback(got, other).result()
    notify(conn, other, "there")
    notify(conn, channel, "here")
    assert [n.payload for n in got.wait(1, channel=channel)] == ["here"]
    assert [n.payload for n in got.wait(1, channel=other)] == ["there"]


def test_recorder_wait_fails_after_timeout(channel):
    got = Recorder()
    with pytest.raises(
        AssertionError, match=r"0 notification\(s\) on '.*' after 0.01 s, expected 1"
    ):
        got.wait(1, 0.01, channel=channel)

"""The JSON-lines plugin against a real server: registered in code, and installed."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import classic_pg_listener_jsonl as jsonl
from classic_pg_listener_jsonl import JsonlPlugin, JsonlWriter
from psycopg import Notify

from classic.pg.listener.testing import WAIT, notify, wait_until


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_writes_configured_channels_as_whole_lines(
    make_listener, conn, channel, hook_waiter, tmp_path
):
    path = tmp_path / "out.jsonl"
    other = f"{channel}_b"
    before = datetime.now(timezone.utc)
    listener = make_listener(
        max_workers=4, plugins=[JsonlPlugin([channel, other], path), hook_waiter]
    )
    listener.start()
    hook_waiter.wait("listener_connected")
    payloads = [f"ü-{i}-" + "x" * 200 for i in range(300)]

    notify(conn, channel, *payloads)
    notify(conn, other, "last")
    notify(conn, f"{channel}_not_configured", "ignored")

    hook_waiter.wait("listener_callback_done", 301)
    lines = read_lines(path)
    assert len(lines) == 301
    assert sorted(line["payload"] for line in lines if line["channel"] == channel) == (
        sorted(payloads)
    )
    assert [line["payload"] for line in lines if line["channel"] == other] == ["last"]
    for line in lines:
        assert set(line) == {"channel", "payload", "pid", "received"}
        assert line["pid"] == conn.info.backend_pid
        assert before <= datetime.fromisoformat(line["received"])


def test_writes_to_stdout_by_default(make_listener, conn, channel, hook_waiter, capsys):
    listener = make_listener(
        max_workers=0, plugins=[JsonlPlugin([channel]), hook_waiter]
    )
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, '{"id": 1}')
    hook_waiter.wait("listener_callback_done")
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["payload"] == '{"id": 1}'


def test_configured_by_environment(
    make_listener, conn, channel, hook_waiter, tmp_path, monkeypatch
):
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv(jsonl.ENV_CHANNELS, f" {channel} ,")
    monkeypatch.setenv(jsonl.ENV_PATH, str(path))
    listener = make_listener(plugins=[jsonl, hook_waiter])
    (info,) = [p for p in listener.plugins if p.name == jsonl.__name__]
    assert info.channels == (channel,)
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, "from env")
    hook_waiter.wait("listener_callback_done")
    listener.stop()
    listener.join()
    assert [line["payload"] for line in read_lines(path)] == ["from env"]


def test_no_channels_registers_nothing(make_listener, monkeypatch):
    monkeypatch.delenv(jsonl.ENV_CHANNELS, raising=False)
    listener = make_listener(plugins=[jsonl])
    assert listener.plugins[0].channels == ()
    assert listener.channels == {}


def test_installed_plugin_is_autoloaded(
    make_listener, conn, channel, hook_waiter, tmp_path, monkeypatch
):
    path = tmp_path / "installed.jsonl"
    monkeypatch.delenv("CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("CLASSIC_PG_LISTENER_LOAD_PLUGINS", "jsonl")
    monkeypatch.setenv(jsonl.ENV_CHANNELS, channel)
    monkeypatch.setenv(jsonl.ENV_PATH, str(path))
    listener = make_listener(plugins=[hook_waiter])
    (info,) = [p for p in listener.plugins if p.name == "jsonl"]
    assert info.distribution == "classic-pg-listener-jsonl"
    assert info.channels == (channel,)
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, "installed")
    hook_waiter.wait("listener_callback_done")
    assert [line["payload"] for line in read_lines(path)] == ["installed"]


def is_open(path: Path) -> bool:
    """Whether this process holds a descriptor on ``path``."""
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


def test_registering_opens_no_file(make_listener, channel, hook_waiter, tmp_path):
    # Listing plugins (pg-listener plugins) registers them into a listener
    # that never starts: that must leave no file behind.
    path = tmp_path / "out.jsonl"
    listener = make_listener(plugins=[JsonlPlugin([channel], path)])
    assert not path.exists()
    listener.register_plugin(hook_waiter)
    listener.start()
    hook_waiter.wait("listener_connected")
    assert path.exists()  # opened when the listener started


def test_a_missing_directory_is_reported_at_registration(
    make_listener, channel, tmp_path, caplog
):
    path = tmp_path / "no-such-dir" / "out.jsonl"
    listener = make_listener(plugins=[JsonlPlugin([channel], path)])
    assert listener.plugins[0].channels == ()
    assert "no-such-dir" in caplog.text


def test_file_closed_after_unregister_and_at_stop(
    make_listener, conn, channel, hook_waiter, tmp_path, monkeypatch
):
    path = tmp_path / "out.jsonl"
    monkeypatch.setenv(jsonl.ENV_CHANNELS, channel)
    monkeypatch.setenv(jsonl.ENV_PATH, str(path))
    listener = make_listener(max_workers=2, plugins=[hook_waiter])
    # The module, as the entry point loads it, configured by the environment.
    name = listener.register_plugin(jsonl, "jsonl-env")
    assert name is not None
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, "one")
    hook_waiter.wait("listener_callback_done")
    assert is_open(path)

    removed = listener.unregister_plugin(name)
    assert not is_open(path)  # closed by listener_unregistered, at once
    removed.result(WAIT)
    assert [line["payload"] for line in read_lines(path)] == ["one"]

    # Registered again, it appends; stopping the listener closes the file.
    listener.register_plugin(JsonlPlugin([channel], path), "jsonl-b")
    wait_until(lambda: channel in listener.channels, "the registration")
    # Registered is not listened to yet; a later LISTEN's answer is the barrier.
    listener.add_callback(print, f"{channel}_barrier").result(WAIT)
    notify(conn, channel, "two")
    hook_waiter.wait("listener_callback_done", 2)
    listener.stop()
    listener.join(WAIT)
    assert not is_open(path)
    assert [line["payload"] for line in read_lines(path)] == ["one", "two"]


def test_a_line_in_flight_after_close_is_still_written(tmp_path):
    # unregister_plugin() closes the file before the callback is removed: a
    # notification read meanwhile is appended, and no descriptor stays open.
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path)
    writer.open()
    writer(Notify("ch", "before", 1))
    writer.close()
    writer(Notify("ch", "in flight", 1))
    assert not is_open(path)
    assert [line["payload"] for line in read_lines(path)] == ["before", "in flight"]

"""The JSON-lines plugin against a real server: registered in code, and installed."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import classic_pg_listener_jsonl as jsonl
from classic_pg_listener_jsonl import JsonlPlugin

from classic.pg.listener.testing import notify


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

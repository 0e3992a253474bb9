"""Plugins: discovery from installed distributions, switches, errors, listing.

Discovery runs for real: ``install_plugin`` (fix_plugins.py) writes a
distribution's ``*.dist-info`` and module onto ``sys.path``, and the listener
finds it through ``importlib.metadata`` as it would after ``pip install``.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import pytest
from psycopg import Notify

from classic.pg.listener import Listener, PluginError, PluginInfo, hookimpl
from classic.pg.listener import plugins as plugins_module
from classic.pg.listener.testing import WAIT, notify

HANDLER = """
import threading
from classic.pg.listener import hookimpl

received = []
futures = []
event = threading.Event()

def on_notify(notify):
    received.append(notify)
    event.set()

@hookimpl
def listener_register_callbacks(register):
    for channel in {channels!r}:
        futures.append(register(on_notify, channel))
"""


def handler(*channels: str) -> str:
    return HANDLER.format(channels=list(channels))


def names(listener: Listener) -> list[str]:
    return [info.name for info in listener.plugins]


class Recorder:
    """A plugin object registered in code: no distribution needed."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.received: list[Notify] = []
        self.event = threading.Event()
        self.futures: list[Any] = []

    def on_notify(self, notify: Notify) -> None:
        self.received.append(notify)
        self.event.set()

    @hookimpl
    def listener_register_callbacks(self, register):
        self.futures.append(register(self.on_notify, self.channel))


# -- discovery ---------------------------------------------------------------


def test_installed_plugin_handles_notifications(
    install_plugin, make_listener, conn, channel
):
    dist = install_plugin(handler(channel))
    listener = make_listener()
    module = sys.modules[dist.module]
    listener.start()
    module.futures[0].result(WAIT)

    notify(conn, channel, "hello")

    assert module.event.wait(WAIT)
    assert [(n.channel, n.payload) for n in module.received] == [(channel, "hello")]
    assert module.received[0].pid == conn.info.backend_pid


def test_autoload_loads_every_entry_point_when_not_filtered(
    install_plugin, make_listener, monkeypatch
):
    first, second = install_plugin(), install_plugin()
    monkeypatch.delenv(plugins_module.ENV_LOAD_PLUGINS)
    # Plugins installed in the environment load too; ours must be among them.
    assert {first.name, second.name} <= set(names(make_listener()))


def test_autoload_off_by_argument(install_plugin, make_listener, monkeypatch):
    dist = install_plugin("raise RuntimeError('must not be imported')")
    listener = make_listener(autoload_plugins=False)
    assert listener.plugins == []
    assert dist.module not in sys.modules


def test_autoload_off_by_env(install_plugin, make_listener, monkeypatch):
    dist = install_plugin()
    monkeypatch.setenv(plugins_module.ENV_DISABLE_AUTOLOAD, "1")
    assert make_listener().plugins == []
    assert dist.module not in sys.modules
    # The argument wins over the environment.
    assert names(make_listener(autoload_plugins=True)) == [dist.name]


def test_load_plugins_allowlist(install_plugin, make_listener, monkeypatch):
    first, second, third = install_plugin(), install_plugin(), install_plugin()
    monkeypatch.setenv(plugins_module.ENV_LOAD_PLUGINS, f" {first.name} ,{third.name}")
    assert sorted(names(make_listener())) == sorted([first.name, third.name])
    assert second.module not in sys.modules

    monkeypatch.setenv(plugins_module.ENV_LOAD_PLUGINS, "")
    assert make_listener().plugins == []


def test_blocked_by_argument_is_never_imported(install_plugin, make_listener):
    broken = install_plugin("raise RuntimeError('must not be imported')")
    fine = install_plugin()
    listener = make_listener(blocked_plugins=[broken.name])
    assert names(listener) == [fine.name]
    assert broken.module not in sys.modules


def test_blocked_by_env(install_plugin, make_listener, monkeypatch, channel):
    broken = install_plugin("raise RuntimeError('must not be imported')")
    fine = install_plugin()
    monkeypatch.setenv(plugins_module.ENV_BLOCKED_PLUGINS, f"other,{broken.name}")
    assert names(make_listener()) == [fine.name]
    assert broken.module not in sys.modules


def test_blocked_name_is_refused_in_code(make_listener, channel):
    recorder = Recorder(channel)
    listener = make_listener(blocked_plugins=["recorder"])
    assert listener.register_plugin(recorder, "recorder") is None
    assert listener.plugins == []
    assert recorder.futures == []


# -- errors, before any connection ----------------------------------------------


def _factory_never_called():
    raise AssertionError("no connection may be opened for a broken plugin")


def test_import_failure_names_distribution_and_entry_point(install_plugin):
    dist = install_plugin("import classic_pg_listener_no_such_module\n")
    with pytest.raises(PluginError) as info:
        Listener(_factory_never_called)
    message = str(info.value)
    assert repr(dist.name) in message
    assert f"{dist.distribution} {dist.version}" in message
    assert "classic_pg_listener_no_such_module" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_attribute_is_an_import_failure(install_plugin):
    dist = install_plugin("", value="{module}:nothing_here")
    with pytest.raises(PluginError, match=f"{dist.name}.*failed to load"):
        Listener(_factory_never_called)


def test_bad_hookimpl_signature(install_plugin):
    dist = install_plugin(
        """
        from classic.pg.listener import hookimpl

        @hookimpl
        def listener_ping(listener, latency):
            pass
        """
    )
    with pytest.raises(PluginError) as info:
        Listener(_factory_never_called)
    message = str(info.value)
    assert repr(dist.name) in message
    assert dist.distribution in message
    assert "listener_ping" in message
    assert "latency" in message


def test_unknown_hook_name(install_plugin):
    dist = install_plugin(
        """
        from classic.pg.listener import hookimpl

        @hookimpl
        def listener_notifcation(notify):
            pass
        """
    )
    with pytest.raises(PluginError) as info:
        Listener(_factory_never_called)
    assert repr(dist.name) in str(info.value)
    assert "listener_notifcation" in str(info.value)


def test_duplicate_entry_point_names(install_plugin):
    install_plugin(name="same_name_twice")
    install_plugin(name="same_name_twice")
    with pytest.raises(PluginError, match="must be unique"):
        Listener(_factory_never_called)


def test_invalid_plugin_in_code_is_refused_and_not_kept(make_listener):
    class Typo:
        @hookimpl
        def listener_startd(self, listener):
            pass

    class Wrapper:
        @hookimpl(wrapper=True)
        def listener_started(self, listener):
            yield

    listener = make_listener()
    with pytest.raises(PluginError, match="listener_startd"):
        listener.register_plugin(Typo(), "typo")
    with pytest.raises(PluginError, match="wrapper"):
        listener.register_plugin(Wrapper(), "wrapper")
    with pytest.raises(PluginError, match="listener_startd"):
        make_listener(plugins=[Typo()])
    assert listener.plugins == []


def test_same_plugin_twice_is_refused(make_listener, channel):
    recorder = Recorder(channel)
    listener = make_listener(plugins=[recorder])
    with pytest.raises(PluginError, match="cannot be registered"):
        listener.register_plugin(recorder)


# -- a raising plugin ----------------------------------------------------------


def test_raising_hookimpl_is_logged_and_delivery_goes_on(
    make_listener, conn, channel, caplog
):
    seen: list[str] = []

    class Broken:
        @hookimpl
        def listener_notification(self, notify):
            raise ValueError("broken plugin")

    class Working:
        @hookimpl
        def listener_notification(self, notify):
            seen.append(notify.payload)

    recorder = Recorder(channel)
    listener = make_listener(max_workers=0)
    listener.register_plugin(Working(), "working")
    listener.register_plugin(Broken(), "broken")
    listener.register_plugin(recorder, "recorder")
    listener.start()
    recorder.futures[0].result(WAIT)

    notify(conn, channel, "a", "b")

    while len(recorder.received) < 2:
        assert recorder.event.wait(WAIT)
        recorder.event.clear()
    assert [n.payload for n in recorder.received] == ["a", "b"]
    assert seen == ["a", "b"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    for record in errors:
        assert "'broken'" in record.getMessage()
        assert "listener_notification" in record.getMessage()
        assert record.name == "classic.pg.listener"
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], ValueError)


def test_raising_register_callbacks_keeps_the_plugin(make_listener):
    class Broken:
        @hookimpl
        def listener_register_callbacks(self, register):
            raise RuntimeError("cannot configure")

    listener = make_listener(plugins=[Broken()])
    assert len(listener.plugins) == 1


def test_trace_logs_every_hook_call(make_listener, monkeypatch, caplog, channel):
    monkeypatch.setenv(plugins_module.ENV_TRACE_PLUGINS, "1")
    caplog.set_level(logging.DEBUG, logger="classic.pg.listener")
    make_listener(plugins=[Recorder(channel)])
    traced = [r.getMessage() for r in caplog.records if "hook " in r.getMessage()]
    assert any("listener_register_callbacks" in m for m in traced)


# -- listing and unregistering ---------------------------------------------------


def test_plugins_lists_what_is_loaded(install_plugin, make_listener, channel):
    other = f"{channel}_2"
    dist = install_plugin(
        handler(channel, other)
        + """
@hookimpl
def listener_ping(duration):
    pass
"""
    )
    listener = make_listener(plugins=[Recorder(channel)])
    listener.register_plugin(Recorder(other), "in_code")
    infos = {info.name: info for info in listener.plugins}

    assert infos[dist.name] == PluginInfo(
        name=dist.name,
        distribution=dist.distribution,
        version=dist.version,
        hooks=("listener_ping", "listener_register_callbacks"),
        channels=(channel, other),
    )
    assert infos["in_code"] == PluginInfo(
        name="in_code",
        distribution=None,
        version=None,
        hooks=("listener_register_callbacks",),
        channels=(other,),
    )
    assert len(infos) == 3


def test_unregister_plugin_removes_its_callbacks(make_listener, conn, channel):
    recorder = Recorder(channel)
    kept: list[Notify] = []
    listener = make_listener(max_workers=0)
    listener.register_plugin(recorder, "recorder")
    sentinel = f"{channel}_sentinel"
    arrived = threading.Event()

    def on_sentinel(n: Notify) -> None:
        kept.append(n)
        arrived.set()

    listener.start()
    recorder.futures[0].result(WAIT)

    assert listener.unregister_plugin("recorder").result(WAIT) is None
    listener.add_callback(on_sentinel, sentinel).result(WAIT)

    assert listener.plugins == []
    assert channel not in listener.channels
    notify(conn, channel, "lost")
    notify(conn, sentinel, "kept")
    assert arrived.wait(WAIT)
    assert recorder.received == []
    with pytest.raises(PluginError, match="no plugin named"):
        listener.unregister_plugin("recorder")

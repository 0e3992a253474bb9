"""Every hook: when it fires, in which thread, with what arguments.

One ``test_hook_<name>`` per hook, as datasette's suite has, and meta-tests
that keep the hookspecs, their documentation and these tests in step.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import Notify

from classic.pg.listener import ReconnectFailed, hookimpl, hookspecs
from classic.pg.listener.plugins import HOOK_NAMES
from classic.pg.listener.testing import WAIT, notify

ROOT = Path(__file__).resolve().parent.parent


class Call:
    """One hook call as the recorder saw it."""

    def __init__(self, hook: str, kwargs: dict[str, Any]) -> None:
        self.hook = hook
        self.kwargs = kwargs
        self.thread = threading.current_thread()

    def __getattr__(self, name: str) -> Any:
        try:
            return self.kwargs[name]
        except KeyError:
            raise AttributeError(name) from None


class Recorder:
    """Implements every hook, recording each call; ``wait()`` for one."""

    def __init__(self, channel: str | None = None) -> None:
        self.channel = channel
        self.calls: list[Call] = []
        self.cond = threading.Condition()
        self.futures: list[Any] = []
        self.received: list[Notify] = []
        self.on_call: dict[str, Any] = {}
        """Called with the ``Call`` (or, for ``"callback"``, the notification)."""

    def _record(self, hook: str, **kwargs: Any) -> None:
        call = Call(hook, kwargs)
        if hook in self.on_call:
            self.on_call[hook](call)
        with self.cond:
            self.calls.append(call)
            self.cond.notify_all()

    def wait(self, hook: str, count: int = 1) -> list[Call]:
        """The first ``count`` calls of ``hook``, waiting up to WAIT for them."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.of(hook)) >= count, WAIT), (
                f"{hook} called {len(self.of(hook))} times, expected {count}"
            )
            return self.of(hook)[:count]

    def of(self, hook: str) -> list[Call]:
        return [call for call in self.calls if call.hook == hook]

    def on_notify(self, notify: Notify) -> None:
        if "callback" in self.on_call:
            self.on_call["callback"](notify)
        self.received.append(notify)

    @hookimpl
    def listener_register_callbacks(self, listener, register):
        if self.channel is not None:
            self.futures.append(register(self.on_notify, self.channel))
        self._record(
            "listener_register_callbacks", listener=listener, register=register
        )

    @hookimpl
    def listener_started(self, listener):
        self._record("listener_started", listener=listener)

    @hookimpl
    def listener_unregistered(self, listener):
        self._record("listener_unregistered", listener=listener)

    @hookimpl
    def listener_connected(self, listener, connection):
        self._record("listener_connected", listener=listener, connection=connection)

    @hookimpl
    def listener_reconnected(self, listener, connection):
        self._record("listener_reconnected", listener=listener, connection=connection)

    @hookimpl
    def listener_disconnected(self, listener, error):
        self._record("listener_disconnected", listener=listener, error=error)

    @hookimpl
    def listener_ping(self, listener, duration, error):
        self._record("listener_ping", listener=listener, duration=duration, error=error)

    @hookimpl
    def listener_notification(self, listener, notify):
        self._record("listener_notification", listener=listener, notify=notify)

    @hookimpl
    def listener_active_changed(self, listener, active):
        self._record("listener_active_changed", listener=listener, active=active)

    @hookimpl
    def listener_catch_up_done(self, listener, channel, catch_up, duration, error):
        self._record(
            "listener_catch_up_done",
            listener=listener,
            channel=channel,
            catch_up=catch_up,
            duration=duration,
            error=error,
        )

    @hookimpl
    def listener_callback_done(self, listener, callback, notify, duration, error):
        self._record(
            "listener_callback_done",
            listener=listener,
            callback=callback,
            notify=notify,
            duration=duration,
            error=error,
        )

    @hookimpl
    def listener_stopped(self, listener, error):
        self._record("listener_stopped", listener=listener, error=error)


def terminate(conn: psycopg.Connection[Any], pid: int | None) -> None:
    assert pid is not None
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- one test per hook ------------------------------------------------------------


def test_hook_listener_register_callbacks(make_listener, conn, channel):
    at_construction = Recorder(channel)
    listener = make_listener(plugins=[at_construction])
    (call,) = at_construction.of("listener_register_callbacks")
    assert call.thread is threading.current_thread()
    assert call.listener is listener

    later = Recorder(f"{channel}_later")
    listener.register_plugin(later, "later")
    assert len(later.of("listener_register_callbacks")) == 1
    assert len(at_construction.of("listener_register_callbacks")) == 1

    # register() behaves as add_callback: the futures resolve once LISTENed.
    listener.start()
    assert at_construction.futures[0].result(WAIT) is None
    assert later.futures[0].result(WAIT) is None
    assert set(listener.channels) == {channel, f"{channel}_later"}
    notify(conn, channel, "x")
    at_construction.wait("listener_callback_done")
    assert [n.payload for n in at_construction.received] == ["x"]


def test_hook_listener_started(make_listener):
    recorder = Recorder()
    factory_calls: list[int] = []
    started_saw: list[int] = []
    recorder.on_call["listener_started"] = lambda call: started_saw.append(
        len(factory_calls)
    )

    def factory():
        factory_calls.append(1)
        raise psycopg.OperationalError("no server today")

    listener = make_listener(factory, plugins=[recorder], max_reconnect_attempts=1)
    listener.start()
    (call,) = recorder.wait("listener_started")
    assert call.thread.name == listener.name
    assert call.listener is listener
    assert started_saw == [0], "called before the first connection attempt"


def test_hook_listener_connected(make_listener, channel):
    recorder = Recorder(channel)
    pids: list[int | None] = []
    recorder.on_call["listener_connected"] = lambda call: pids.append(
        call.listener.backend_pid
    )
    listener = make_listener(plugins=[recorder])
    listener.start()
    (call,) = recorder.wait("listener_connected")
    assert call.thread.name == listener.name
    assert call.listener is listener
    assert isinstance(call.connection, psycopg.Connection)
    assert call.connection.autocommit
    assert pids == [call.connection.info.backend_pid]
    assert recorder.of("listener_reconnected") == []


def test_hook_listener_disconnected(make_listener, conn):
    recorder = Recorder()
    pids: list[int | None] = []
    recorder.on_call["listener_disconnected"] = lambda call: pids.append(
        call.listener.backend_pid
    )
    listener = make_listener(plugins=[recorder])
    listener.start()
    (connected,) = recorder.wait("listener_connected")
    old_pid = connected.connection.info.backend_pid

    terminate(conn, old_pid)

    (call,) = recorder.wait("listener_disconnected")
    assert call.thread.name == listener.name
    assert call.listener is listener
    assert isinstance(call.error, psycopg.OperationalError)
    assert pids == [None], "the connection is closed when the hook runs"
    listener.stop()
    listener.join(WAIT)
    assert len(recorder.of("listener_disconnected")) == 1, "not called by stop()"


def test_hook_listener_reconnected(make_listener, conn, channel):
    recorder = Recorder(channel)
    listener = make_listener(plugins=[recorder], reconnect_delay=0.01)
    listener.start()
    recorder.futures[0].result(WAIT)
    first = listener.backend_pid

    terminate(conn, first)

    (call,) = recorder.wait("listener_reconnected")
    assert call.thread.name == listener.name
    assert call.listener is listener
    assert call.connection.info.backend_pid not in (None, first)
    hooks = [c.hook for c in recorder.calls]
    assert hooks.index("listener_reconnected") == len(hooks) - 1
    assert hooks[-4:] == [
        "listener_connected",
        "listener_disconnected",
        "listener_connected",
        "listener_reconnected",
    ]
    # Every channel is listened to again when the hook runs.
    assert listener.reconnects == 1
    notify(conn, channel, "after")
    recorder.wait("listener_callback_done")
    assert [n.payload for n in recorder.received] == ["after"]


def test_hook_listener_ping(make_listener):
    recorder = Recorder()
    listener = make_listener(plugins=[recorder], ping_period=0.05, ping_timeout=2)
    listener.start()
    calls = recorder.wait("listener_ping", 2)
    for call in calls:
        assert call.thread.name == listener.name
        assert call.listener is listener
        assert call.error is None
        assert 0 < call.duration < 2
    assert recorder.of("listener_disconnected") == []


def test_hook_listener_ping_failure(proxy, proxy_factory, make_listener):
    recorder = Recorder()
    listener = make_listener(
        proxy_factory,
        plugins=[recorder],
        ping_period=0.05,
        ping_timeout=0.3,
        reconnect_delay=0.01,
    )
    listener.start()
    recorder.wait("listener_ping")
    proxy.blackhole()  # a half-open link: the next ping gets no answer

    (disconnected,) = recorder.wait("listener_disconnected")
    proxy.restore()
    # The failed ping comes right before the disconnection, with its error.
    failed = recorder.calls[recorder.calls.index(disconnected) - 1]
    assert failed.hook == "listener_ping"
    assert failed.thread.name == listener.name
    assert isinstance(failed.error, TimeoutError)
    assert 0.3 <= failed.duration < 0.3 + WAIT
    assert disconnected.error is failed.error
    recorder.wait("listener_reconnected")


def test_hook_listener_notification(make_listener, conn, channel):
    recorder = Recorder(channel)
    order: list[str] = []
    recorder.on_call["listener_notification"] = lambda call: order.append(
        "hook " + call.notify.payload
    )
    recorder.on_call["callback"] = lambda n: order.append("callback " + n.payload)
    listener = make_listener(plugins=[recorder], max_workers=0)
    listener.start()
    recorder.futures[0].result(WAIT)

    notify(conn, channel, "1", "2")

    calls = recorder.wait("listener_notification", 2)
    recorder.wait("listener_callback_done", 2)
    for call, payload in zip(calls, ["1", "2"], strict=True):
        assert call.thread.name == listener.name
        assert call.listener is listener
        assert isinstance(call.notify, Notify)
        assert (call.notify.channel, call.notify.payload) == (channel, payload)
        assert call.notify.pid == conn.info.backend_pid
    # Before dispatch: a notification's hook call precedes its callbacks (the
    # notifications read together are handed over together, after theirs).
    assert sorted(order) == ["callback 1", "callback 2", "hook 1", "hook 2"]
    assert order.index("hook 1") < order.index("callback 1")
    assert order.index("hook 2") < order.index("callback 2")
    assert order.index("hook 1") < order.index("hook 2")


@pytest.mark.parametrize("max_workers", [0, 2])
def test_hook_listener_callback_done(make_listener, conn, channel, max_workers):
    recorder = Recorder()
    ran_for: list[float] = []

    def slow(n: Notify) -> None:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.01:
            pass
        ran_for.append(time.perf_counter() - started)

    def failing(n: Notify) -> None:
        raise ValueError(n.payload)

    listener = make_listener(plugins=[recorder], max_workers=max_workers)
    listener.add_callback(slow, channel)
    added = listener.add_callback(failing, channel)
    listener.start()
    added.result(WAIT)

    notify(conn, channel, "boom")

    done, failed = recorder.wait("listener_callback_done", 2)
    assert done.callback is slow
    assert failed.callback is failing
    for call in (done, failed):
        assert call.listener is listener
        assert call.notify.payload == "boom"
        if max_workers == 0:
            assert call.thread.name == listener.name
        else:
            assert call.thread.name.startswith(f"{listener.name}-callback")
    assert done.error is None
    assert done.duration >= ran_for[0]
    assert isinstance(failed.error, ValueError)
    assert failed.error.args == ("boom",)
    assert failed.duration >= 0


@pytest.mark.parametrize("max_workers", [0, None])
def test_hook_listener_catch_up_done(make_listener, channel, max_workers):
    recorder = Recorder()
    ran: list[tuple[str, str]] = []

    def catch_up(name: str) -> None:
        ran.append((name, threading.current_thread().name))

    def failing(name: str) -> None:
        raise ValueError(name)

    listener = make_listener(plugins=[recorder], max_workers=max_workers)
    listener.add_callback(print, channel, catch_up=catch_up)
    listener.add_callback(repr, channel, catch_up=failing)
    listener.start()

    done, failed = sorted(
        recorder.wait("listener_catch_up_done", 2),
        key=lambda call: call.error is not None,
    )
    assert done.catch_up is catch_up
    assert done.error is None
    assert failed.catch_up is failing
    assert isinstance(failed.error, ValueError)
    for call in (done, failed):
        assert call.listener is listener
        assert call.channel == channel
        assert call.duration >= 0
    assert ran[0][0] == channel
    # The thread that ran it: the serving thread inline, a worker in the pool.
    serving = max_workers == 0
    assert (ran[0][1] == listener.name) is serving
    assert (done.thread.name == listener.name) is serving


def test_hook_listener_active_changed(make_listener, channel):
    name = f"exclusive-{channel}"
    first, second = Recorder(), Recorder()
    holder = make_listener(
        max_workers=0, ping_period=0.2, exclusive=name, plugins=[first]
    )
    holder.start()
    (took,) = first.wait("listener_active_changed")
    assert took.active is True
    assert took.listener is holder
    assert took.thread.name == holder.name

    standby = make_listener(
        max_workers=0, ping_period=0.2, exclusive=name, plugins=[second]
    )
    standby.start()
    second.wait("listener_ping", 2)  # it tried the lock, and failed, twice
    assert not second.of("listener_active_changed")
    assert not standby.is_active

    holder.stop()  # its session, and the lock with it, ends
    (taken,) = second.wait("listener_active_changed")
    assert taken.active is True
    assert standby.is_active


def test_hook_listener_unregistered(make_listener, conn, channel):
    recorder, other = Recorder(channel), Recorder()
    listener = make_listener(max_workers=0, plugins=[other])
    listener.register_plugin(recorder, "recorder")
    listener.start()
    recorder.futures[0].result(WAIT)
    listener.unregister_plugin("recorder").result(WAIT)
    (call,) = recorder.of("listener_unregistered")
    assert call.listener is listener
    assert call.thread is threading.current_thread()
    assert not other.of("listener_unregistered"), "only the plugin that leaves"
    notify(conn, channel, "after")
    listener.stop()
    listener.join()
    assert recorder.calls[-1].hook == "listener_unregistered", "its last hook"
    assert not recorder.of("listener_stopped")
    assert other.of("listener_stopped")


def test_hook_listener_stopped(make_listener, conn, channel):
    recorder = Recorder(channel)
    slow_done: list[bool] = []
    state: list[tuple[int | None, int]] = []
    recorder.on_call["listener_stopped"] = lambda call: state.append(
        (call.listener.backend_pid, len(slow_done))
    )
    finished = threading.Event()

    def slow(n: Notify) -> None:
        finished.wait(WAIT)
        slow_done.append(True)

    listener = make_listener(plugins=[recorder], max_workers=2)
    listener.add_callback(slow, channel)
    listener.start()
    recorder.futures[0].result(WAIT)
    notify(conn, channel, "in flight")
    recorder.wait("listener_notification")

    listener.stop()
    finished.set()
    listener.join(WAIT)

    (call,) = recorder.of("listener_stopped")
    assert call.thread.name == listener.name
    assert call.listener is listener
    assert call.error is None
    assert state == [(None, 1)], "connection closed, callbacks finished"


def test_hook_listener_stopped_with_the_error_that_ended_run(make_listener):
    recorder = Recorder()

    def factory():
        raise psycopg.OperationalError("no server today")

    listener = make_listener(factory, plugins=[recorder], max_reconnect_attempts=1)
    with pytest.raises(ReconnectFailed):
        listener.run()
    (call,) = recorder.of("listener_stopped")
    assert call.thread is threading.current_thread(), "run() serves in the caller"
    assert isinstance(call.error, ReconnectFailed)


# -- order -------------------------------------------------------------------


def test_hooks_fire_in_lifecycle_order(make_listener, conn, channel):
    recorder = Recorder(channel)
    listener = make_listener(plugins=[recorder], reconnect_delay=0.01)
    listener.start()
    recorder.futures[0].result(WAIT)
    notify(conn, channel, "before")
    recorder.wait("listener_callback_done")
    terminate(conn, listener.backend_pid)
    recorder.wait("listener_reconnected")
    notify(conn, channel, "after")
    recorder.wait("listener_callback_done", 2)
    listener.stop()
    listener.join(WAIT)

    assert [c.hook for c in recorder.calls] == [
        "listener_register_callbacks",
        "listener_started",
        "listener_connected",
        "listener_notification",
        "listener_callback_done",
        "listener_disconnected",
        "listener_connected",
        "listener_reconnected",
        "listener_notification",
        "listener_callback_done",
        "listener_stopped",
    ]


# -- meta-tests ------------------------------------------------------------------


def test_hook_names_are_the_hookspecs():
    specs = {
        name
        for name, value in vars(hookspecs).items()
        if hasattr(value, hookspecs.PROJECT_NAME + "_spec")
    }
    assert set(HOOK_NAMES) == specs
    assert set(HOOK_NAMES) <= {name for name in vars(Recorder) if name in specs}


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hookspec_docstring_names_every_argument(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert doc, f"{name} has no docstring"
    for arg in inspect.signature(spec).parameters:
        assert f":param {arg}:" in doc, f"{name}'s docstring misses :param {arg}:"
    assert "thread" in doc, f"{name}'s docstring must say in which thread it runs"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_is_documented(name):
    text = (ROOT / "docs" / "hooks.md").read_text()
    rendered = re.search(r"^::: classic\.pg\.listener\.hookspecs\s*$", text, re.M)
    assert rendered or f"`{name}`" in text, f"docs/hooks.md does not document {name}"
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert name in guide, f"docs/plugins.md does not mention {name}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_has_a_test(name):
    assert callable(globals().get(f"test_hook_{name}")), f"no test_hook_{name}"

"""The Prometheus plugin against a real server: registered in code, and installed."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import classic_pg_listener_prometheus as prom
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg import Notify

from classic.pg.listener import hookimpl
from classic.pg.listener.testing import WAIT, notify, wait_until

P = "classic_pg_listener_"


def ok(notify: Notify) -> None:
    pass


def failing(notify: Notify) -> None:
    raise ValueError(notify.payload)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def hooks_of(listener) -> set[str]:
    return {hook for plugin in listener.plugins for hook in plugin.hooks}


def test_metrics_read_at_scrape_time(make_listener, conn, channel, hook_waiter):
    listener = make_listener(
        max_workers=2,
        ping_period=0.05,
        reconnect_delay=0.01,
        plugins=[prom, hook_waiter],
    )
    registry = prom.registry(listener)
    listener.add_callback(ok, channel)
    listener.add_callback(failing, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    assert sample(registry, "connected") == 1
    assert sample(registry, "active") == 1

    notify(conn, channel, "1", "2", "3")
    hook_waiter.wait("listener_callback_done", 6)
    wait_until(
        lambda: sample(registry, "delivered_total", channel=channel) == 3, "delivery"
    )
    assert sample(registry, "notifications_total", channel=channel) == 3
    assert sample(registry, "callback_errors_total", channel=channel) == 3
    assert sample(registry, "backlog") == 0
    assert sample(registry, "last_notification_timestamp_seconds") <= time.time()
    assert sample(registry, "connected_since_seconds") <= time.time()

    hook_waiter.wait("listener_ping")
    assert (sample(registry, "ping_duration_seconds_count") or 0) >= 1
    assert sample(registry, "ping_errors_total") == 0
    assert sample(registry, "last_ping_duration_seconds") > 0
    assert 0 <= sample(registry, "queue_usage_ratio") < 1

    conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    hook_waiter.wait("listener_reconnected")
    assert sample(registry, "reconnects_total") == 1
    assert sample(registry, "disconnects_total") == 1
    assert sample(registry, "connected") == 1

    listener.stop()
    listener.join()
    assert sample(registry, "connected") == 0
    assert prom.server_address(listener) is None, "no port configured: no server"


def test_no_per_notification_hook_by_default(make_listener, monkeypatch):
    monkeypatch.delenv(prom.ENV_CALLBACK_HISTOGRAM, raising=False)
    listener = make_listener(plugins=[prom])
    hooks = hooks_of(listener)
    assert "listener_notification" not in hooks
    assert "listener_callback_done" not in hooks


def test_series_of_channels_no_longer_listened_to_disappear(
    make_listener, conn, channel, hook_waiter, monkeypatch
):
    monkeypatch.setenv(prom.ENV_CALLBACK_HISTOGRAM, "1")
    listener = make_listener(max_workers=0, plugins=[prom, hook_waiter])
    assert "listener_callback_done" in hooks_of(listener)
    registry = prom.registry(listener)
    other = channel + "_other"
    listener.add_callback(ok, channel)
    added = listener.add_callback(ok, other)
    listener.start()
    added.result(WAIT)
    notify(conn, channel, "a")
    notify(conn, other, "b", "c")
    hook_waiter.wait("listener_callback_done", 3)
    assert sample(registry, "notifications_total", channel=other) == 2
    assert sample(registry, "callback_duration_seconds_count", channel=other) == 2

    listener.remove_callback(ok, other).result(WAIT)
    for name in ("notifications_total", "delivered_total", "callback_errors_total",
                 "callback_duration_seconds_count"):  # fmt: skip
        assert sample(registry, name, channel=other) is None, name
        assert sample(registry, name, channel=channel) is not None, name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def serving(monkeypatch) -> int:
    port = free_port()
    monkeypatch.setenv(prom.ENV_PORT, str(port))
    monkeypatch.delenv(prom.ENV_ADDRESS, raising=False)
    return port


def test_installed_plugin_serves_metrics_over_http(
    make_listener, conn, channel, hook_waiter, monkeypatch
):
    port = serving(monkeypatch)
    monkeypatch.delenv("CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("CLASSIC_PG_LISTENER_LOAD_PLUGINS", "prometheus")
    listener = make_listener(max_workers=2, plugins=[hook_waiter])
    (info,) = [p for p in listener.plugins if p.name == "prometheus"]
    assert info.distribution == "classic-pg-listener-prometheus"
    listener.add_callback(ok, channel)
    listener.add_callback(failing, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    assert prom.server_address(listener) == ("127.0.0.1", port)

    notify(conn, channel, "a", "b")
    hook_waiter.wait("listener_callback_done", 4)

    metrics = scrape(port)
    by_channel = (("channel", channel),)
    assert metrics[(P + "notifications_total", by_channel)] == 2
    assert metrics[(P + "callback_errors_total", by_channel)] == 2
    assert metrics[(P + "connected", ())] == 1
    assert metrics[(P + "reconnects_total", ())] == 0

    listener.stop()
    listener.join()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


class Gate:
    """An inline callback that holds the serving thread until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, notify: Notify) -> None:
        self.entered.set()
        self.release.wait(WAIT)


def test_livez_and_readyz(make_listener, conn, channel, hook_waiter, monkeypatch):
    port = serving(monkeypatch)
    gate = Gate()
    listener = make_listener(max_workers=0, plugins=[prom, hook_waiter])
    listener.add_callback(gate, channel)
    listener.start()
    hook_waiter.wait("listener_connected")

    status, body = get(port, "/readyz")
    assert status == 200
    ready = json.loads(body)
    assert ready["connected"] is True
    assert ready["channels"] == [channel]
    assert ready["backend_pid"] == listener.backend_pid
    status, body = get(port, "/livez")
    assert (status, json.loads(body)["status"]) == (200, "ok")

    # An inline callback that does not return: the loop is stuck, not alive.
    notify(conn, channel, "hold")
    assert gate.entered.wait(WAIT)
    status, body = get(port, "/livez")
    assert status == 503
    assert json.loads(body)["status"] == "unresponsive"
    gate.release.set()
    wait_until(lambda: get(port, "/livez")[0] == 200, "/livez answering again")

    conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    hook_waiter.wait("listener_disconnected")
    # Reconnected by now, or not: /readyz says which, with the status to match.
    status, body = get(port, "/readyz")
    assert (status == 200) is json.loads(body)["connected"]


class StopTimer:
    def __init__(self) -> None:
        self.stopped_at = 0.0

    @hookimpl
    def listener_stopped(self) -> None:
        self.stopped_at = time.perf_counter()


def test_server_closes_at_once(make_listener, hook_waiter, monkeypatch):
    port = serving(monkeypatch)
    # Hooks run last registered first: ``before`` sees listener_stopped just
    # before the plugin's, ``after`` just after it.
    after, before = StopTimer(), StopTimer()
    listener = make_listener(plugins=[after, prom, before, hook_waiter])
    listener.start()
    hook_waiter.wait("listener_connected")
    assert get(port, "/livez")[0] == 200
    server = prom._get(listener).server
    assert server is not None
    server_thread = server._thread

    listener.stop()
    listener.join()
    assert not server_thread.is_alive()
    # socketserver's shutdown() waited for its next poll: 185-500 ms here.
    assert after.stopped_at - before.stopped_at < 0.05
    with pytest.raises(urllib.error.URLError):
        get(port, "/metrics")


def test_unregister_closes_the_server(make_listener, hook_waiter, monkeypatch):
    port = serving(monkeypatch)
    monkeypatch.setenv(prom.ENV_CALLBACK_HISTOGRAM, "1")
    listener = make_listener(plugins=[hook_waiter])
    listener.register_plugin(prom, "prom")
    listener.start()
    hook_waiter.wait("listener_connected")
    assert get(port, "/metrics")[0] == 200
    listener.unregister_plugin("prom").result(WAIT)
    with pytest.raises(urllib.error.URLError):
        get(port, "/metrics")
    assert prom.server_address(listener) is None
    names = {p.name for p in listener.plugins}
    assert not names & {"prom", prom.HISTOGRAM_PLUGIN}, "the histogram half left too"


def test_listeners_have_registries_of_their_own(make_listener, monkeypatch):
    monkeypatch.delenv(prom.ENV_PORT, raising=False)
    first = make_listener(plugins=[prom])
    second = make_listener(plugins=[prom])
    assert prom.registry(first) is not prom.registry(second)
    assert prom.registry(first) is prom.registry(first)


def test_a_collected_listener_yields_nothing() -> None:
    class Gone:
        name = "gone"

    metrics = prom.Metrics(Gone())  # type: ignore[arg-type]
    assert list(metrics.collect()) == []

"""The Prometheus plugin against a real server: registered in code, and installed."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import classic_pg_listener_prometheus as prom
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg import Notify

from classic.pg.listener.testing import notify

P = "classic_pg_listener_"


def ok(notify: Notify) -> None:
    pass


def failing(notify: Notify) -> None:
    raise ValueError(notify.payload)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def test_metrics_from_hooks(make_listener, conn, channel, hook_waiter):
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

    notify(conn, channel, "1", "2", "3")
    hook_waiter.wait("listener_callback_done", 6)

    assert sample(registry, "notifications_total", channel=channel) == 3
    assert sample(registry, "callback_duration_seconds_count", channel=channel) == 6
    assert sample(registry, "callback_errors_total", channel=channel) == 3
    assert sample(registry, "backlog") == 0

    hook_waiter.wait("listener_ping")
    assert (sample(registry, "ping_duration_seconds_count") or 0) >= 1
    assert sample(registry, "ping_errors_total") == 0

    conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    hook_waiter.wait("listener_reconnected")
    assert sample(registry, "reconnects_total") == 1
    assert sample(registry, "disconnects_total") == 1
    assert sample(registry, "connected") == 1

    listener.stop()
    listener.join()
    assert sample(registry, "connected") == 0
    assert prom.server_address(listener) is None, "no port configured: no server"


def test_listeners_have_registries_of_their_own(make_listener, monkeypatch):
    monkeypatch.delenv(prom.ENV_PORT, raising=False)
    first = make_listener(plugins=[prom])
    second = make_listener(plugins=[prom])
    assert prom.registry(first) is not prom.registry(second)
    assert prom.registry(first) is prom.registry(first)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_installed_plugin_serves_metrics_over_http(
    make_listener, conn, channel, hook_waiter, monkeypatch
):
    port = free_port()
    monkeypatch.delenv("CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("CLASSIC_PG_LISTENER_LOAD_PLUGINS", "prometheus")
    monkeypatch.setenv(prom.ENV_PORT, str(port))
    monkeypatch.delenv(prom.ENV_ADDRESS, raising=False)
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
    assert metrics[(P + "callback_duration_seconds_count", by_channel)] == 4
    assert metrics[(P + "connected", ())] == 1
    assert metrics[(P + "backlog", ())] == 0
    assert metrics[(P + "reconnects_total", ())] == 0

    listener.stop()
    listener.join()
    with pytest.raises(urllib.error.URLError):
        scrape(port)

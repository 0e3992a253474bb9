"""The OpenTelemetry plugin against a real server, with in-memory SDK exporters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import classic_pg_listener_opentelemetry as otel
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from psycopg import Notify

from classic.pg.listener.testing import WAIT, notify


def ok(notify: Notify) -> None:
    pass


def failing(notify: Notify) -> None:
    raise ValueError(notify.payload)


@dataclass
class Providers:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:  # the SDK's answer when no instrument has a point
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == otel.PREFIX + "." + name
            for point in metric.data.data_points
        ]

    def value(self, name: str, **attributes: Any) -> Any:
        for point in self.points(name):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                return getattr(point, "value", point)
        return None


@pytest.fixture
def providers(monkeypatch) -> Iterator[Providers]:
    """SDK providers, made global for the plugin only for this test.

    The API sets its globals once per process; the plugin reads them
    through the two getters, which are patched instead.
    """
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: tracer_provider)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: meter_provider)
    yield Providers(spans, reader)
    meter_provider.shutdown()
    tracer_provider.shutdown()


def hooks_of(listener, name: str = "otel") -> tuple[str, ...]:
    (info,) = [p for p in listener.plugins if p.name == name]
    return info.hooks


def test_without_provider_no_per_notification_hook(make_listener):
    assert not otel.tracing_configured()
    assert not otel.metrics_configured()
    listener = make_listener(plugins=[])
    listener.register_plugin(otel, "otel")
    assert [p.name for p in listener.plugins] == ["otel"]
    hooks = hooks_of(listener)
    assert "listener_callback_done" not in hooks
    assert "listener_notification" not in hooks


def test_span_per_callback(make_listener, conn, channel, hook_waiter, providers):
    listener = make_listener(max_workers=0, plugins=[hook_waiter])
    listener.register_plugin(otel, "otel")
    assert "listener_callback_done" not in hooks_of(listener)
    assert hooks_of(listener, otel.CALLBACKS_PLUGIN) == ("listener_callback_done",)
    listener.add_callback(ok, channel)
    listener.add_callback(failing, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, "héllo")
    hook_waiter.wait("listener_callback_done", 2)

    spans = sorted(
        providers.spans.get_finished_spans(),
        key=lambda s: s.attributes["code.function.name"],
    )
    assert [s.name for s in spans] == [f"process {channel}"] * 2
    bad, good = spans
    for span in spans:
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes["messaging.destination.name"] == channel
        assert span.attributes["messaging.message.body.size"] == 6, "bytes, not chars"
        assert (
            span.attributes["classic_pg_listener.sender_pid"] == conn.info.backend_pid
        )
        assert span.attributes["classic_pg_listener.listener"] == listener.name
        assert 0 <= span.end_time - span.start_time < 10**9
    assert good.attributes["code.function.name"] == "ok"
    assert good.status.status_code is StatusCode.UNSET
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.status.description == "ValueError: héllo"
    assert [e.name for e in bad.events] == ["exception"]


def test_metrics(make_listener, conn, channel, hook_waiter, providers):
    listener = make_listener(
        max_workers=2, ping_period=0.05, plugins=[hook_waiter], name="otel-metrics"
    )
    listener.register_plugin(otel, "otel")
    listener.add_callback(ok, channel)
    listener.add_callback(failing, channel)
    listener.start()
    hook_waiter.wait("listener_connected")
    notify(conn, channel, "1", "2", "3")
    hook_waiter.wait("listener_callback_done", 6)
    hook_waiter.wait("listener_ping")

    mine = {"listener": "otel-metrics"}
    assert providers.value("connected", **mine) == 1
    assert providers.value("notifications.received", channel=channel, **mine) == 3
    assert providers.value("callback.errors", channel=channel, **mine) == 3
    assert providers.value("backlog", **mine) == 0
    assert providers.value("reconnects", **mine) == 0
    assert providers.value("queue.usage", **mine) is not None
    assert providers.value("ping.duration", **mine) > 0
    histogram = providers.value("callback.duration", channel=channel, **mine)
    assert histogram.count == 6

    listener.stop()
    listener.join()
    assert providers.value("connected", **mine) is None, "its series end at stop"


def test_installed_plugin_is_discovered(make_listener, monkeypatch, providers):
    monkeypatch.delenv("CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("CLASSIC_PG_LISTENER_LOAD_PLUGINS", "opentelemetry")
    listener = make_listener()
    by_name = {p.name: p for p in listener.plugins}
    assert by_name["opentelemetry"].distribution == "classic-pg-listener-opentelemetry"
    assert "listener_callback_done" in by_name[otel.CALLBACKS_PLUGIN].hooks


def test_unregister_removes_both_halves(make_listener, providers):
    listener = make_listener(name="otel-unregister")
    listener.register_plugin(otel, "otel")
    assert {p.name for p in listener.plugins} == {"otel", otel.CALLBACKS_PLUGIN}
    listener.unregister_plugin("otel").result(WAIT)
    assert listener.plugins == []
    assert providers.value("connected", listener="otel-unregister") is None

"""OpenTelemetry for classic-pg-listener: a span per callback, the listener's metrics.

Built on the OpenTelemetry API alone: the application installs the SDK,
sets the global tracer and meter providers and chooses the exporters; this
plugin only reports to whatever providers are global when it is registered
with a listener.

Free when unused. At registration the plugin looks at the global
providers. If both are the API's defaults (no SDK configured), it
implements no per-notification hook at all, so the listener's hot path
does not even call it; the per-notification hook exists only when a provider
is configured: the module then registers a second plugin,
``opentelemetry.callbacks`` (``Callbacks``), which implements it, and which
leaves with it when the module is unregistered.

Spans (tracer provider configured): one per callback run, made from the
``listener_callback_done`` hook with explicit start and end times, named
``process <channel>``, kind ``CONSUMER``, with the channel, the sender's
pid, the payload size in bytes, the callback, and an error status with the
exception when the callback raised.

Metrics (meter provider configured): the callback-duration histogram from
the same hook, and observable instruments read at collection time from
``Listener.stats()`` (connected, reconnects, received / delivered / callback
errors per channel, backlog, queue usage, last ping duration), which cost
nothing between collections.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from classic.pg.listener import hookimpl

if TYPE_CHECKING:
    from psycopg import Notify

    from classic.pg.listener import Listener

__all__ = [
    "CALLBACKS_PLUGIN",
    "PREFIX",
    "SCOPE",
    "Callbacks",
    "metrics_configured",
    "tracing_configured",
]

SCOPE = "classic_pg_listener_opentelemetry"
"""The instrumentation scope of the tracer and the meter."""
PREFIX = "classic_pg_listener"
"""The prefix of every metric name."""

_VERSION = "0.1.0"


def tracing_configured() -> bool:
    """Whether a real tracer provider is global (not the API's default)."""
    provider = trace.get_tracer_provider()
    return not isinstance(
        provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def metrics_configured() -> bool:
    """Whether a real meter provider is global (not the API's default)."""
    provider = metrics.get_meter_provider()
    # The API's proxy is private: recognise it by name rather than import it.
    return not (
        isinstance(provider, metrics.NoOpMeterProvider)
        or type(provider).__name__ == "_ProxyMeterProvider"
    )


CALLBACKS_PLUGIN = "opentelemetry.callbacks"
"""The name the per-callback half registers under, when a provider is configured."""

_lock = threading.Lock()
# The observable instruments are made once per meter provider; their
# callbacks report every listener in _observed.
_observed: weakref.WeakSet[Any] = weakref.WeakSet()
# Weak keys: an id() could be reused by a later provider.
_meters: weakref.WeakKeyDictionary[Any, metrics.Histogram] = weakref.WeakKeyDictionary()


class Callbacks:
    """The per-callback half: a span and a histogram record per callback run.

    A plugin of its own, registered only when a provider is configured, so
    that a listener without one never calls a per-notification hook of this
    distribution. pluggy reads a plugin's hooks statically when it registers
    it: deciding at registration means registering this, or not.
    """

    def __init__(
        self,
        listener_name: str,
        tracer: trace.Tracer | None,
        duration: metrics.Histogram | None,
    ):
        self._name = listener_name
        self._tracer = tracer
        self._duration = duration

    @hookimpl
    def listener_callback_done(
        self,
        callback: Callable[[Notify], object],
        notify: Notify,
        duration: float,
        error: BaseException | None,
    ) -> None:
        end = time.time_ns()
        channel = notify.channel
        if self._tracer is not None:
            span = self._tracer.start_span(
                "process " + channel,
                kind=SpanKind.CONSUMER,
                start_time=end - int(duration * 1e9),
                attributes={
                    "messaging.system": "postgresql",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": channel,
                    "messaging.message.body.size": len(notify.payload.encode()),
                    "classic_pg_listener.sender_pid": notify.pid,
                    "classic_pg_listener.listener": self._name,
                    "code.function.name": getattr(
                        callback, "__qualname__", type(callback).__qualname__
                    ),
                },
            )
            if error is not None:
                span.record_exception(error, timestamp=end)
                span.set_status(
                    Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
                )
            span.end(end_time=end)
        if self._duration is not None:
            self._duration.record(
                duration, {"listener": self._name, "channel": channel}
            )


# -- hooks -----------------------------------------------------------------------


@hookimpl
def listener_register_callbacks(listener: Listener) -> None:
    tracer = None
    if tracing_configured():
        tracer = trace.get_tracer_provider().get_tracer(SCOPE, _VERSION)
    duration = None
    if metrics_configured():
        duration = _instruments()
        _observed.add(listener)
    if tracer is not None or duration is not None:
        listener.register_plugin(
            Callbacks(listener.name, tracer, duration), CALLBACKS_PLUGIN
        )


@hookimpl
def listener_stopped(listener: Listener) -> None:
    # A stopped listener's series end with it.
    _observed.discard(listener)


@hookimpl
def listener_unregistered(listener: Listener) -> None:
    _observed.discard(listener)
    if any(plugin.name == CALLBACKS_PLUGIN for plugin in listener.plugins):
        listener.unregister_plugin(CALLBACKS_PLUGIN)


# -- metrics -----------------------------------------------------------------------


def _instruments() -> metrics.Histogram:
    """The meter's instruments, made once per provider; returns the histogram."""
    provider = metrics.get_meter_provider()
    with _lock:
        histogram = _meters.get(provider)
        if histogram is not None:
            return histogram
        meter = provider.get_meter(SCOPE, _VERSION)
        histogram = meter.create_histogram(
            f"{PREFIX}.callback.duration",
            unit="s",
            description="Time each callback ran.",
        )
        for name, kind, unit, description, read in _OBSERVABLES:
            kind(meter)(
                f"{PREFIX}.{name}",
                callbacks=[_observer(read)],
                unit=unit,
                description=description,
            )
        _meters[provider] = histogram
        return histogram


Reading = Iterable[tuple[float, dict[str, str]]]


def _observer(
    read: Callable[[Any], Reading],
) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for listener in list(_observed):
            stats = listener.stats()
            for value, attributes in read(stats):
                yield Observation(value, {"listener": stats.name, **attributes})

    return observe


def _per_channel(counts: Any) -> Reading:
    return [(float(n), {"channel": channel}) for channel, n in counts.items()]


def _one(value: float | None) -> Reading:
    return [] if value is None else [(float(value), {})]


def _gauge(meter: metrics.Meter) -> Callable[..., Any]:
    return meter.create_observable_gauge


def _counter(meter: metrics.Meter) -> Callable[..., Any]:
    return meter.create_observable_counter


_OBSERVABLES: list[tuple[str, Any, str, str, Callable[[Any], Reading]]] = [
    ("connected", _gauge, "1", "1 while connected.", lambda s: _one(s.connected)),
    (
        "reconnects",
        _counter,
        "1",
        "Connections re-established after a loss (notifications may be missed).",
        lambda s: _one(s.reconnects),
    ),
    (
        "notifications.received",
        _counter,
        "1",
        "Notifications received, per channel.",
        lambda s: _per_channel(s.received),
    ),
    (
        "notifications.delivered",
        _counter,
        "1",
        "Notifications through their callbacks, per channel.",
        lambda s: _per_channel(s.delivered),
    ),
    (
        "callback.errors",
        _counter,
        "1",
        "Callbacks that raised, per channel.",
        lambda s: _per_channel(s.callback_errors),
    ),
    (
        "backlog",
        _gauge,
        "1",
        "Notifications read but not yet through their callbacks.",
        lambda s: _one(s.backlog),
    ),
    (
        "queue.usage",
        _gauge,
        "1",
        "Fraction of the server's notification queue in use, read by each ping.",
        lambda s: _one(s.queue_usage),
    ),
    (
        "ping.duration",
        _gauge,
        "s",
        "The last ping's round trip.",
        lambda s: _one(s.last_ping_duration),
    ),
]

"""Prometheus metrics and health endpoints for classic-pg-listener, read at scrape time.

Each listener gets its own ``CollectorRegistry`` (``registry(listener)``),
holding one custom collector that reads ``Listener.stats()`` when scraped:
the counters are the listener's own, kept per batch by the serving loop, so
by default this plugin implements no per-notification hook and costs the
hot path nothing. Series of a channel no longer listened to disappear.

The environment decides what it serves:

``CLASSIC_PG_LISTENER_PROMETHEUS_PORT``
    serve ``/metrics``, ``/livez`` and ``/readyz`` on this port from
    ``start()``/``run()`` until the listener stops or the plugin is
    unregistered; unset or empty: no server, expose ``registry(listener)``
    yourself (``prometheus_client.generate_latest(registry(listener))``).
``CLASSIC_PG_LISTENER_PROMETHEUS_ADDRESS``
    the address to bind; ``127.0.0.1`` by default, so that metrics are not
    published beyond the machine by accident.
``CLASSIC_PG_LISTENER_PROMETHEUS_CALLBACK_HISTOGRAM``
    ``1``: also keep ``callback_duration_seconds`` {channel}, a histogram
    observed after every callback. That one costs a hook call and a
    histogram update per callback (see the README for the measured cost).

``/livez`` answers 200 when the serving loop answered a no-op request within
``LIVEZ_TIMEOUT`` seconds (``Listener.responsive()``), else 503; ``/readyz``
200 when connected with every channel listened to, else 503. Both with a
JSON body.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from classic.pg.listener import hookimpl

if TYPE_CHECKING:
    from psycopg import Notify

    from classic.pg.listener import Listener, ListenerStats

ENV_PORT = "CLASSIC_PG_LISTENER_PROMETHEUS_PORT"
ENV_ADDRESS = "CLASSIC_PG_LISTENER_PROMETHEUS_ADDRESS"
ENV_CALLBACK_HISTOGRAM = "CLASSIC_PG_LISTENER_PROMETHEUS_CALLBACK_HISTOGRAM"
DEFAULT_ADDRESS = "127.0.0.1"
PREFIX = "classic_pg_listener"
LIVEZ_TIMEOUT = 1.0
"""Seconds the serving loop has to answer ``/livez``'s no-op request."""
HISTOGRAM_PLUGIN = "prometheus.callback_duration"
"""The name the optional per-callback half registers under."""

__all__ = [
    "DEFAULT_ADDRESS",
    "ENV_ADDRESS",
    "ENV_CALLBACK_HISTOGRAM",
    "ENV_PORT",
    "HISTOGRAM_PLUGIN",
    "LIVEZ_TIMEOUT",
    "Metrics",
    "livez",
    "readyz",
    "registry",
    "server_address",
]

logger = logging.getLogger("classic.pg.listener")


class Metrics(Collector):
    """One listener's metrics: a collector reading ``stats()``, in a registry of
    its own.

    The few counters no snapshot holds (lost connections, failed pings, the
    ping histogram) come from hooks that fire once per ping or connection,
    never per notification.
    """

    def __init__(self, listener: Listener):
        # A weak reference: the registry may outlive the listener in the
        # application's hands.
        self._listener = weakref.ref(listener)
        self.disconnects = 0
        self.ping_errors = 0
        self.ping_duration = Histogram(
            f"{PREFIX}_ping_duration_seconds", "Ping round trips.", registry=None
        )
        self.callback_duration: Histogram | None = None
        self._durations: dict[str, Any] = {}
        self.server: MetricsServer | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # -- at scrape time --------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        listener = self._listener()
        if listener is None:
            return
        stats = listener.stats()
        listened = stats.channels
        yield _gauge(
            "connected",
            "1 while connected, every channel listened to.",
            stats.connected,
        )
        yield _gauge(
            "active",
            "1 while this listener runs the callbacks (0 for an exclusive standby).",
            stats.active,
        )
        if stats.connected_since is not None:
            yield _gauge(
                "connected_since_seconds",
                "When the connection was established (Unix time).",
                stats.connected_since,
            )
        yield _counter(
            "reconnects",
            "Connections re-established after a loss (notifications may be missed).",
            stats.reconnects,
        )
        yield _counter("disconnects", "Connections lost.", self.disconnects)
        yield _counter(
            "ping_errors", "Pings that failed or timed out.", self.ping_errors
        )
        yield from self.ping_duration.collect()
        if stats.last_ping_duration is not None:
            yield _gauge(
                "last_ping_duration_seconds",
                "The last ping's round trip.",
                stats.last_ping_duration,
            )
        yield _per_channel(
            "notifications", "Notifications received.", stats.received, listened
        )
        yield _per_channel(
            "delivered",
            "Notifications through all their callbacks.",
            stats.delivered,
            listened,
        )
        yield _per_channel(
            "callback_errors", "Callbacks that raised.", stats.callback_errors, listened
        )
        yield _gauge(
            "backlog",
            "Notifications read but not yet through their callbacks.",
            stats.backlog,
        )
        if stats.last_notification_at is not None:
            yield _gauge(
                "last_notification_timestamp_seconds",
                "When the last notification was read (Unix time).",
                stats.last_notification_at,
            )
        if stats.queue_usage is not None:
            yield _gauge(
                "queue_usage_ratio",
                "Fraction of the server's"
                " notification queue in use, read by each ping.",
                stats.queue_usage,
            )
        if self.callback_duration is not None:
            self._forget_channels(listened)
            yield from self.callback_duration.collect()

    def _forget_channels(self, listened: Iterable[str]) -> None:
        for channel in self._durations.keys() - set(listened):
            del self._durations[channel]
            self.callback_duration.remove(channel)  # type: ignore[union-attr]

    # -- the optional histogram ---------------------------------------------------

    def enable_callback_histogram(self) -> CallbackDurations:
        self.callback_duration = Histogram(
            f"{PREFIX}_callback_duration_seconds",
            "Time each callback ran.",
            ["channel"],
            registry=None,
        )
        return CallbackDurations(self)

    def duration_of(self, channel: str) -> Any:
        """The channel's histogram child, cached: ``labels()`` costs as much as
        an observation."""
        child = self._durations.get(channel)
        if child is None:
            assert self.callback_duration is not None
            child = self._durations[channel] = self.callback_duration.labels(channel)
        return child

    # -- HTTP ---------------------------------------------------------------------

    def serve(self, port: int, address: str) -> None:
        listener = self._listener()
        if listener is None:
            return
        self.server = MetricsServer(
            _app(listener, self.registry), address, port, f"{listener.name}-metrics"
        )
        host, bound = self.server.address
        logger.info("prometheus metrics on http://%s:%d/metrics", host, bound)

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()


class CallbackDurations:
    """The optional per-callback half: observes ``callback_duration_seconds``.

    A plugin of its own, registered only when the histogram is asked for, so
    that by default no per-notification hook of this distribution exists.
    """

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    @hookimpl
    def listener_callback_done(self, notify: Notify, duration: float) -> None:
        self._metrics.duration_of(notify.channel).observe(duration)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


def _per_channel(
    name: str, documentation: str, counts: Any, listened: Iterable[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=["channel"])
    for channel in listened:
        family.add_metric([channel], float(counts.get(channel, 0)))
    return family


# -- health --------------------------------------------------------------------------


def livez(listener: Listener) -> tuple[bool, dict[str, Any]]:
    """Whether the serving loop is alive and not stuck, and why, as for ``/livez``."""
    alive = listener.responsive(LIVEZ_TIMEOUT)
    return alive, {
        "status": "ok" if alive else "unresponsive",
        "listener": listener.name,
        "detail": "the serving loop answered"
        if alive
        else f"the serving loop did not answer within {LIVEZ_TIMEOUT:g} s"
        " (stopped, or stuck in a callback, a hook or a connection attempt)",
    }


def readyz(listener: Listener) -> tuple[bool, dict[str, Any]]:
    """Whether the listener is connected with every channel listened to."""
    stats: ListenerStats = listener.stats()
    return stats.connected, {
        "status": "ok" if stats.connected else "not connected",
        "listener": stats.name,
        "connected": stats.connected,
        "active": stats.active,
        "backend_pid": stats.backend_pid,
        "connected_since": stats.connected_since,
        "channels": list(stats.channels),
    }


def _app(listener: Listener, registry: CollectorRegistry) -> Callable[..., Any]:
    metrics_app = make_wsgi_app(registry)
    ref = weakref.ref(listener)
    probes = {"/livez": livez, "/readyz": readyz}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics_app(environ, start_response)
        target = ref()
        ok, body = probe(target) if target is not None else (False, {"status": "gone"})
        payload = json.dumps(body).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
            ],
        )
        return [payload]

    return app


# -- the HTTP server ------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # A scrape in progress must not hold up close(), hence stop().
    block_on_close = False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr is noise


class MetricsServer:
    """HTTP on one port, closed at once.

    ``socketserver``'s ``shutdown()`` waits for its loop's next poll (half a
    second by default), which made each ``stop()`` 185-500 ms slower. This
    loop waits on the listening socket and a socket pair instead: ``close()``
    writes one byte, and the thread returns at once.
    """

    def __init__(self, app: Callable[..., Any], address: str, port: int, name: str):
        self._httpd = make_server(
            address, port, app, _ThreadingServer, handler_class=_QuietHandler
        )
        self._httpd.timeout = 0  # handle_request() only when select() said so
        self._wake, self._waker = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._httpd, selectors.EVENT_READ)
            selector.register(self._wake, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake:
                        return
                    self._httpd.handle_request()

    def close(self) -> None:
        self._waker.send(b"\0")
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._httpd.server_close()
        self._wake.close()
        self._waker.close()


# -- per listener ---------------------------------------------------------------

_lock = threading.Lock()
_metrics: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


def _get(listener: Listener) -> Metrics:
    metrics = _metrics.get(listener)
    if metrics is None:
        with _lock:
            metrics = _metrics.get(listener)
            if metrics is None:
                metrics = _metrics[listener] = Metrics(listener)
    return metrics


def registry(listener: Listener) -> CollectorRegistry:
    """The registry holding ``listener``'s metrics, for the application to expose."""
    return _get(listener).registry


def server_address(listener: Listener) -> tuple[str, int] | None:
    """Where ``listener``'s metrics are served, ``None`` when they are not."""
    server = _get(listener).server
    return None if server is None else server.address


# -- hooks ---------------------------------------------------------------------------


@hookimpl
def listener_register_callbacks(listener: Listener) -> None:
    # Create the metrics now, so that registry() has them before start().
    metrics = _get(listener)
    if os.environ.get(ENV_CALLBACK_HISTOGRAM, "") not in ("", "0"):
        listener.register_plugin(metrics.enable_callback_histogram(), HISTOGRAM_PLUGIN)


@hookimpl
def listener_started(listener: Listener) -> None:
    port = os.environ.get(ENV_PORT)
    if port:
        address = os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS
        _get(listener).serve(int(port), address)


@hookimpl
def listener_disconnected(listener: Listener) -> None:
    _get(listener).disconnects += 1


@hookimpl
def listener_ping(
    listener: Listener, duration: float, error: BaseException | None
) -> None:
    metrics = _get(listener)
    if error is None:
        metrics.ping_duration.observe(duration)
    else:
        metrics.ping_errors += 1


@hookimpl
def listener_unregistered(listener: Listener) -> None:
    metrics = _get(listener)
    metrics.close()
    if metrics.callback_duration is not None and any(
        plugin.name == HISTOGRAM_PLUGIN for plugin in listener.plugins
    ):
        listener.unregister_plugin(HISTOGRAM_PLUGIN)


@hookimpl
def listener_stopped(listener: Listener) -> None:
    _get(listener).close()

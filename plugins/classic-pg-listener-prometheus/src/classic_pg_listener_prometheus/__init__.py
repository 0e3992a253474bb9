"""Prometheus metrics for classic-pg-listener, built only on its hooks.

Each listener gets its own ``CollectorRegistry`` (``registry(listener)``), so
several listeners in one process, or in one test session, never collide on
metric names. Installed, the plugin joins every listener that autoloads
plugins; the environment decides whether it serves HTTP:

``CLASSIC_PG_LISTENER_PROMETHEUS_PORT``
    serve ``/metrics`` on this port from ``start()``/``run()`` until the
    listener stops; unset or empty: no server, expose ``registry(listener)``
    yourself (``prometheus_client.generate_latest(registry(listener))``).
``CLASSIC_PG_LISTENER_PROMETHEUS_ADDRESS``
    the address to bind; ``127.0.0.1`` by default, so that metrics are not
    published beyond the machine by accident.

Metrics (all prefixed ``classic_pg_listener_``): ``notifications_total``
{channel}, ``callback_duration_seconds`` {channel} (histogram),
``callback_errors_total`` {channel}, ``reconnects_total``,
``disconnects_total``, ``ping_duration_seconds`` (histogram),
``ping_errors_total``, ``backlog`` (read at scrape), ``connected``.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from classic.pg.listener import hookimpl

if TYPE_CHECKING:
    from psycopg import Notify

    from classic.pg.listener import Listener

ENV_PORT = "CLASSIC_PG_LISTENER_PROMETHEUS_PORT"
ENV_ADDRESS = "CLASSIC_PG_LISTENER_PROMETHEUS_ADDRESS"
DEFAULT_ADDRESS = "127.0.0.1"
PREFIX = "classic_pg_listener"

__all__ = ["ENV_ADDRESS", "ENV_PORT", "Metrics", "registry", "server_address"]

logger = logging.getLogger("classic.pg.listener")


class Metrics:
    """One listener's metrics, in a registry of their own."""

    def __init__(self, listener: Listener):
        self.registry = CollectorRegistry()
        r = self.registry
        self.notifications = Counter(
            f"{PREFIX}_notifications",
            "Notifications received.",
            ["channel"],
            registry=r,
        )
        self.callback_duration = Histogram(
            f"{PREFIX}_callback_duration_seconds",
            "Time each callback ran.",
            ["channel"],
            registry=r,
        )
        self.callback_errors = Counter(
            f"{PREFIX}_callback_errors",
            "Callbacks that raised.",
            ["channel"],
            registry=r,
        )
        self.reconnects = Counter(
            f"{PREFIX}_reconnects",
            "Connections re-established after a loss (notifications may be missed).",
            registry=r,
        )
        self.disconnects = Counter(
            f"{PREFIX}_disconnects", "Connections lost.", registry=r
        )
        self.ping_duration = Histogram(
            f"{PREFIX}_ping_duration_seconds", "Ping round trips.", registry=r
        )
        self.ping_errors = Counter(
            f"{PREFIX}_ping_errors", "Pings that failed or timed out.", registry=r
        )
        self.connected = Gauge(
            f"{PREFIX}_connected", "1 while the listener is connected.", registry=r
        )
        backlog = Gauge(
            f"{PREFIX}_backlog",
            "Notifications read but not yet through their callbacks.",
            registry=r,
        )
        # Read at scrape time; a weak reference, as the registry may outlive
        # the listener in the application's hands.
        ref = weakref.ref(listener)
        backlog.set_function(lambda: float(getattr(ref(), "backlog", 0)))
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None
        self._channels: dict[str, tuple[Counter, Histogram, Counter]] = {}

    def channel(self, channel: str) -> tuple[Counter, Histogram, Counter]:
        """The per-channel children, cached: ``labels()`` costs as much as an update."""
        children = self._channels.get(channel)
        if children is None:
            children = self._channels[channel] = (
                self.notifications.labels(channel),
                self.callback_duration.labels(channel),
                self.callback_errors.labels(channel),
            )
        return children

    def serve(self, port: int, address: str) -> None:
        self.server, self.thread = start_http_server(
            port, addr=address, registry=self.registry
        )
        logger.info("prometheus metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


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
    if server is None:
        return None
    host, port = server.server_address[:2]
    return str(host), int(port)


# -- hooks -------------------------------------------------------------------


@hookimpl
def listener_register_callbacks(listener: Listener) -> None:
    # Create the metrics now, so that registry() has them before start().
    _get(listener)


@hookimpl
def listener_started(listener: Listener) -> None:
    port = os.environ.get(ENV_PORT)
    if port:
        address = os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS
        _get(listener).serve(int(port), address)


@hookimpl
def listener_connected(listener: Listener) -> None:
    _get(listener).connected.set(1)


@hookimpl
def listener_reconnected(listener: Listener) -> None:
    _get(listener).reconnects.inc()


@hookimpl
def listener_disconnected(listener: Listener) -> None:
    metrics = _get(listener)
    metrics.connected.set(0)
    metrics.disconnects.inc()


@hookimpl
def listener_ping(
    listener: Listener, duration: float, error: BaseException | None
) -> None:
    metrics = _get(listener)
    if error is None:
        metrics.ping_duration.observe(duration)
    else:
        metrics.ping_errors.inc()


@hookimpl
def listener_notification(listener: Listener, notify: Notify) -> None:
    _get(listener).channel(notify.channel)[0].inc()


@hookimpl
def listener_callback_done(
    listener: Listener, notify: Notify, duration: float, error: BaseException | None
) -> None:
    # pluggy passes only the arguments named here: the callback is not needed.
    _, durations, errors = _get(listener).channel(notify.channel)
    durations.observe(duration)
    if error is not None:
        errors.inc()


@hookimpl
def listener_stopped(listener: Listener) -> None:
    metrics = _get(listener)
    metrics.connected.set(0)
    metrics.close()

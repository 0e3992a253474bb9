"""What plugins cost the serving hot path: drain a backlog with and without them.

    python bench/plugin_overhead.py [--n 200000] [--repeat 5] [--dsn DSN]

Each run builds a listener with ``max_workers=0`` (callbacks inline, so the
serving thread does all the work and the figure is its own), parks the
serving thread inside a callback on a gate channel, queues ``n``
notifications at the server in one statement, then opens the gate and times
until the last one has reached its callback. The variants differ only in the
plugin registered:

- ``none``: no plugin at all;
- ``unrelated``: a plugin implementing hooks that are not per notification
  (``listener_ping``, ``listener_connected``): the claim under test is that
  this costs nothing measurable;
- ``notification`` / ``callback_done``: a no-op implementation of one
  per-notification hook, for scale;
- ``prometheus``: the Prometheus plugin as installed (a collector reading
  ``stats()`` at scrape time, no per-notification hook); target >= 0.9x;
- ``prom+histogram``: the same with its optional callback-duration histogram;
- ``otel-off``: the OpenTelemetry plugin with no provider configured
  (the API's defaults), which must cost nothing;
- ``otel``: the same with the SDK's tracer and meter providers (a batch
  span processor whose exporter discards, a metric reader never collected
  during the drain): a span and a histogram record per callback.

Runs are interleaved (none, unrelated, ..., none, unrelated, ...) so that a
drift of the machine spreads over every variant; the median is reported, and
the rate against ``none`` is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from classic.pg.listener import Listener, hookimpl

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DSN_ENV = "CLASSIC_PG_LISTENER_TEST_DSN"
WAIT = 120.0


class Unrelated:
    @hookimpl
    def listener_ping(self, duration: float) -> None:
        pass

    @hookimpl
    def listener_connected(self) -> None:
        pass


class OnNotification:
    @hookimpl
    def listener_notification(self, notify: Any) -> None:
        pass


class OnCallbackDone:
    @hookimpl
    def listener_callback_done(self, duration: float) -> None:
        pass


Setup = Callable[[], contextlib.AbstractContextManager[list[object]]]


@contextlib.contextmanager
def plain(*plugins: object) -> Iterator[list[object]]:
    yield list(plugins)


@contextlib.contextmanager
def prometheus(histogram: bool = False) -> Iterator[list[object]]:
    import classic_pg_listener_prometheus as prom

    saved = os.environ.pop(prom.ENV_CALLBACK_HISTOGRAM, None)
    os.environ.pop(prom.ENV_PORT, None)
    if histogram:
        os.environ[prom.ENV_CALLBACK_HISTOGRAM] = "1"
    try:
        yield [prom]
    finally:
        os.environ.pop(prom.ENV_CALLBACK_HISTOGRAM, None)
        if saved is not None:
            os.environ[prom.ENV_CALLBACK_HISTOGRAM] = saved


@contextlib.contextmanager
def opentelemetry(configured: bool) -> Iterator[list[object]]:
    """The plugin, with the SDK's providers made global while it registers."""
    import classic_pg_listener_opentelemetry as otel
    from opentelemetry import metrics, trace

    if not configured:
        yield [otel]
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    get_tracer_provider, get_meter_provider = (
        trace.get_tracer_provider,
        metrics.get_meter_provider,
    )
    # The plugin reads the global providers at registration; the API lets a
    # process set them once, so the bench lends them through the getters.
    trace.get_tracer_provider = lambda: tracer_provider
    metrics.get_meter_provider = lambda: meter_provider
    try:
        yield [otel]
    finally:
        trace.get_tracer_provider = get_tracer_provider
        metrics.get_meter_provider = get_meter_provider
        tracer_provider.shutdown()
        meter_provider.shutdown()


VARIANTS: dict[str, Setup] = {
    "none": plain,
    "unrelated": lambda: plain(Unrelated()),
    "notification": lambda: plain(OnNotification()),
    "callback_done": lambda: plain(OnCallbackDone()),
    "prometheus": prometheus,
    "prom+histogram": lambda: prometheus(histogram=True),
    "otel-off": lambda: opentelemetry(configured=False),
    "otel": lambda: opentelemetry(configured=True),
}


def drain(dsn: str, n: int, setup: Setup = plain) -> float:
    """Seconds for the serving thread to take ``n`` queued notifications through."""
    channel = f"bench_{uuid.uuid4().hex[:12]}"
    gate = f"{channel}_gate"
    parked, release, done = threading.Event(), threading.Event(), threading.Event()
    count = 0

    def on_gate(notify: Any) -> None:
        parked.set()
        release.wait(WAIT)

    def on_notify(notify: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    # The setup stays open for the whole drain: the OpenTelemetry providers
    # must keep exporting while it runs.
    with setup() as plugins:
        listener = Listener(
            lambda: psycopg.connect(dsn, autocommit=True),
            max_workers=0,
            ping_period=0,
            autoload_plugins=False,
        )
        # Registered as the entry points would be, under their own names.
        for plugin in plugins:
            listener.register_plugin(plugin)
        listener.add_callback(on_notify, channel)
        added = listener.add_callback(on_gate, gate)
        with listener, psycopg.connect(dsn, autocommit=True) as conn:
            added.result(WAIT)
            conn.execute("SELECT pg_notify(%s, '')", (gate,))
            assert parked.wait(WAIT), "the gate callback never ran"
            conn.execute(
                "SELECT pg_notify(%s, i::text) FROM generate_series(1, %s) AS i",
                (channel, n),
            )
            started = time.perf_counter()
            release.set()
            assert done.wait(WAIT), f"only {count} of {n} notifications arrived"
            return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, DEFAULT_DSN))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(VARIANTS),
        help="run these variants only (none is always run)",
    )
    args = parser.parse_args(argv)
    names = ["none", *[v for v in args.only or VARIANTS if v != "none"]]

    drain(args.dsn, min(args.n, 10_000))  # warm up imports and the server
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:
            times[name].append(drain(args.dsn, args.n, VARIANTS[name]))

    print(f"drain of {args.n:,} notifications, max_workers=0, {args.repeat} runs each")
    print("rate: the median over rounds of (none's time / the variant's) in that round")
    print(f"{'plugin':<16}{'median s':>9}{'min s':>8}{'notif/s':>12}{'rate':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        # Paired by round, so that a drift of the machine cancels out.
        rate = statistics.median(
            b / v for b, v in zip(times["none"], values, strict=True)
        )
        print(
            f"{name:<16}{median:>9.3f}{min(values):>8.3f}"
            f"{args.n / median:>12,.0f}{rate:>7.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

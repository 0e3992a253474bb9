"""The ``pg-listener`` command: listen, run the installed plugins, list them, notify.

The command line is a thin user of the public API: a ``Listener`` in
background mode, stopped by SIGINT/SIGTERM from the main thread, which waits
on ``join()``. It may print (the library never does): notifications and
listings to stdout, one line per event, flushed; status lines and log
records to stderr, so that stdout stays clean for pipes and ``--json``.

Exit status: 0 after a clean stop, 1 for an error of the listener or a
plugin, 2 for a usage error or a connection failure (as psql does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Any

import psycopg
from psycopg import Notify
from psycopg.conninfo import conninfo_to_dict

from . import demo, doctor
from ._facade import check_channel
from .errors import ListenerError, ListenerStopped
from .hookspecs import PROJECT_NAME
from .listener import Listener
from .plugins import ENV_DISABLE_AUTOLOAD, discover

logger = logging.getLogger("classic.pg.listener")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONNECTION = 2

CONNECT_TIMEOUT = 10
"""Seconds a connection attempt may take unless the DSN or PGCONNECT_TIMEOUT
says otherwise; psycopg's own default (130 s) is long for a command line."""

CONNECTION_HELP = """\
connection:
  The server is chosen by --dsn, else by the DATABASE_URL environment
  variable, else by the libpq environment variables (PGHOST, PGPORT,
  PGDATABASE, PGUSER, PGPASSWORD, PGSERVICE, ...; libpq's defaults for the
  rest). A DSN is a key=value string ("host=db dbname=app") or a URI
  ("postgresql://user@db/app"). A connection attempt gives up after
  10 seconds unless connect_timeout or PGCONNECT_TIMEOUT says otherwise.
  If the server cannot be reached, one line says why on stderr and the
  exit status is 2. listen and run connect once before anything else, so a
  wrong DSN fails at once; once running, a lost connection is re-established
  with backoff (notifications sent meanwhile are lost).
"""

STOP_HELP = """\
stopping:
  Ctrl-C (SIGINT) or SIGTERM stops cleanly with exit status 0, letting
  callbacks already running finish; a second Ctrl-C interrupts at once, with
  exit status 130, abandoning the callbacks still running or queued.
"""

EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a command Ctrl-C ended."""

SIGNAL_POLL = 0.05
"""Seconds between two looks of the main thread at the signal flag: the
handler only sets it (see ``stop_on_signals``)."""


class ConnectionFailed(Exception):
    """The server could not be reached: reported in one line, exit status 2."""


# -- connection ------------------------------------------------------------------


def resolve_dsn(dsn: str | None) -> str:
    """``--dsn``, else ``DATABASE_URL``, else ``""``: libpq reads its PG* variables."""
    if dsn is not None:
        return dsn
    return os.environ.get("DATABASE_URL", "")


def connect(dsn: str) -> psycopg.Connection[Any]:
    """Open an autocommit connection, or raise ``ConnectionFailed`` with one line."""
    try:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in conninfo_to_dict(dsn) and not os.environ.get(
            "PGCONNECT_TIMEOUT"
        ):
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        return psycopg.connect(dsn, **kwargs)
    except psycopg.Error as ex:
        raise ConnectionFailed(f"cannot connect to PostgreSQL: {one_line(ex)}") from ex


def describe(conn: psycopg.Connection[Any]) -> str:
    """The session a connection reached: database, user, host and port.

    Notifications do not cross databases, and libpq's defaults differ from
    one shell to the next (the user's name for both role and database):
    naming the session in the status lines makes a mismatch show.
    """
    info = conn.info
    return (
        f"database {info.dbname}, user {info.user}, host {info.host}, port {info.port}"
    )


class Connector:
    """The listener's connection factory.

    Connects once when made, so that a bad DSN fails fast, and hands that
    connection to the listener as its first: later calls (reconnects) open
    new ones. ``session`` names the last connection opened (``describe``);
    it is computed in the thread that connected, before the listener owns
    the connection.
    """

    def __init__(self, dsn: str):
        self._dsn = dsn
        first = connect(dsn)
        self.session = describe(first)
        self._first = [first]

    def __call__(self) -> psycopg.Connection[Any]:
        conn = self._first.pop() if self._first else connect(self._dsn)
        self.session = describe(conn)
        return conn


def one_line(error: BaseException) -> str:
    """libpq's messages span lines (a hint, the host tried): fold them in one."""
    return " ".join(str(error).split()) or type(error).__name__


# -- output ------------------------------------------------------------------------


def status(message: str) -> None:
    """A line for the person at the terminal, on stderr: stdout carries data."""
    print(f"pg-listener: {message}", file=sys.stderr, flush=True)


def format_notify(notify: Notify, as_json: bool) -> str:
    now = datetime.now().astimezone().isoformat(timespec="milliseconds")
    if as_json:
        return json.dumps(
            {
                "channel": notify.channel,
                "payload": notify.payload,
                "pid": notify.pid,
                "time": now,
            }
        )
    return f"{now} {notify.channel} (pid {notify.pid}): {notify.payload}"


# -- serving -----------------------------------------------------------------------


class _Listener(Listener):
    """A listener that keeps the futures of every ``add_callback``.

    Plugins register their callbacks while the listener is constructed, and
    their futures go to the plugin; keeping them here lets the command say
    "listening" only once every channel really is listened to.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.requested: list[Future[None]] = []
        super().__init__(*args, **kwargs)

    def _request(self, *args: Any, **kwargs: Any) -> Future[None]:
        future = super()._request(*args, **kwargs)
        self.requested.append(future)
        return future


class Signals:
    """What the signal handler noted, for the main flow to act on."""

    received: signal.Signals | None = None


@contextmanager
def stop_on_signals() -> Iterator[Signals]:
    """Note SIGINT and SIGTERM; a second one acts as usual.

    The handler does no I/O and takes no lock: it runs in the main thread
    wherever the signal found it, possibly in the middle of a write to
    stderr (printing there raises "reentrant call") or inside a lock it
    would need. It sets a flag, which the main flow reports and acts on
    (``serve``), and restores the default handlers, so that a second
    SIGINT raises ``KeyboardInterrupt`` and a second SIGTERM kills.
    """
    signals = Signals()

    def handler(signum: int, frame: FrameType | None) -> None:
        signals.received = signal.Signals(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {
        signum: signal.signal(signum, handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield signals
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def serve(listener: _Listener, ready: Callable[[], str]) -> int:
    """Start, say ``ready()`` once every channel is listened to, wait for the end.

    The main thread only waits (on futures, then on ``join()``), in short
    slices: between two it looks whether a signal came, and if so reports
    it and stops the listener. ``stop()`` lets the callbacks already handed
    over finish before ``join()`` returns.
    """
    with stop_on_signals() as signals:
        stopping = False

        def wait(done: Callable[[float], bool]) -> None:
            nonlocal stopping
            while True:
                finished = done(SIGNAL_POLL)
                if signals.received is not None and not stopping:
                    stopping = True
                    status(f"{signals.received.name} received, stopping")
                    listener.stop()
                if finished:
                    return

        listener.start()
        wait(lambda timeout: not wait_futures(listener.requested, timeout).not_done)
        failed = 0
        for future in listener.requested:
            error = future.exception()
            if error is not None and not isinstance(error, ListenerStopped):
                failed += 1
                status(f"error: {one_line(error)}")
        if failed and failed == len(listener.requested):
            listener.stop()
        elif not stopping and listener.is_alive():
            status(ready())

        def joined(timeout: float) -> bool:
            listener.join(timeout)
            return not listener.is_alive()

        wait(joined)
    if listener.exception is not None:
        status(f"error: {one_line(listener.exception)}")
        return EXIT_ERROR
    return EXIT_ERROR if failed else EXIT_OK


def where(connector: Connector, listener: Listener) -> str:
    """`` (database ..., user ..., host ..., port ..., backend pid ...)``."""
    backend_pid = listener.backend_pid
    pid = f", backend pid {backend_pid}" if backend_pid else ""
    return f" ({connector.session}{pid})"


def exit_now(code: int) -> int:
    """Exit at once, threads still running or not: a second Ctrl-C.

    Interpreter exit would first join the pool's worker threads, which run
    every callback already queued (seconds, with slow callbacks): flush what
    was printed, then leave with ``os._exit``. Without other threads, a plain
    return does the same.
    """
    if threading.active_count() == 1:
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# -- commands ----------------------------------------------------------------------


def cmd_listen(args: argparse.Namespace) -> int:
    factory = Connector(resolve_dsn(args.dsn))
    as_json: bool = args.json
    listener = _Listener(
        factory, max_workers=0, ping_period=args.ping_period, autoload_plugins=False
    )

    def show(notify: Notify) -> None:
        try:
            print(format_notify(notify, as_json), flush=True)
        except BrokenPipeError:
            # The reader went away (``| head``): nobody wants more.
            listener.stop()

    for channel in dict.fromkeys(args.channels):
        listener.add_callback(show, channel)

    def ready() -> str:
        return f"listening on {', '.join(listener.channels)}{where(factory, listener)}"

    return serve(listener, ready)


def cmd_run(args: argparse.Namespace) -> int:
    factory = Connector(resolve_dsn(args.dsn))
    try:
        listener = _Listener(
            factory,
            max_workers=args.workers,
            ping_period=args.ping_period,
            autoload_plugins=False if args.no_autoload else None,
            blocked_plugins=args.block,
        )
    except ListenerError as ex:
        factory().close()
        status(f"error: {one_line(ex)}")
        return EXIT_ERROR

    def ready() -> str:
        names = ", ".join(info.name for info in listener.plugins) or "none"
        channels = ", ".join(listener.channels) or "no channel"
        return f"listening on {channels}{where(factory, listener)}; plugins: {names}"

    return serve(listener, ready)


def cmd_notify(args: argparse.Namespace) -> int:
    with connect(resolve_dsn(args.dsn)) as conn:
        try:
            conn.execute("SELECT pg_notify(%s, %s)", (args.channel, args.payload))
        except psycopg.Error as ex:
            status(f"error: {one_line(ex)}")
            return EXIT_ERROR
        if args.verbose:
            status(f"notified {args.channel} ({describe(conn)})")
    return EXIT_OK


def plugin_rows() -> Iterator[dict[str, Any]]:
    """Each discovered plugin, registered alone into a listener that never
    connects, so that the row shows what the plugin does when it is loaded."""
    for found in discover():
        row: dict[str, Any] = {
            "name": found.name,
            "distribution": found.distribution,
            "version": found.version,
            "hooks": [],
            "channels": [],
            "error": one_line(found.error) if found.error else None,
        }
        if found.error is None:
            listener = Listener(_never_connect, max_workers=0, autoload_plugins=False)
            with _hook_errors() as errors:
                try:
                    listener.register_plugin(found.plugin, found.name)
                except ListenerError as ex:
                    errors.append(one_line(ex))
            for info in listener.plugins:
                if info.name == found.name:
                    row.update(hooks=list(info.hooks), channels=list(info.channels))
            if errors:
                row["error"] = "; ".join(errors)
        yield row


def _never_connect() -> psycopg.Connection[Any]:
    raise AssertionError("listing plugins never connects")


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f": {type(error).__name__}: {one_line(error)}"
        self.into.append(message)


@contextmanager
def _hook_errors() -> Iterator[list[str]]:
    """Catch what the plugin host logs (a raising ``listener_register_callbacks``)
    as one line per error, instead of letting the traceback reach stderr."""
    errors: list[str] = []
    handler = _Collect(errors)
    previous = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield errors
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = list(plugin_rows())
    if args.json:
        print(json.dumps(rows, indent=2), flush=True)
    elif not rows:
        print(f"no plugins found (entry-point group {PROJECT_NAME})", flush=True)
    for row in [] if args.json else rows:
        origin = (
            f"{row['distribution']} {row['version']}" if row["distribution"] else "?"
        )
        print(f"{row['name']} ({origin})")
        if row["error"]:
            print(f"  error: {row['error']}")
        print(f"  hooks: {', '.join(row['hooks']) or '-'}")
        print(f"  channels: {', '.join(row['channels']) or '-'}", flush=True)
    if os.environ.get(ENV_DISABLE_AUTOLOAD):
        status(f"note: {ENV_DISABLE_AUTOLOAD} is set: 'run' loads none of these")
    return EXIT_ERROR if any(row["error"] for row in rows) else EXIT_OK


# -- parsing -----------------------------------------------------------------------


def _channel(value: str) -> str:
    try:
        return check_channel(value)
    except ValueError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        number = kind(value)
        if number < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return number

    convert.__name__ = kind.__name__
    return convert


def _wrap(text: str) -> str:
    """The epilogs are laid out by hand (raw), so descriptions are wrapped here."""
    return textwrap.fill(text, width=78)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="pg-listener",
        description="PostgreSQL LISTEN/NOTIFY from the command line.",
        epilog=CONNECTION_HELP + "\n" + STOP_HELP,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dsn",
        help="libpq connection string or URI (default: $DATABASE_URL, else the"
        " PG* environment variables)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more on stderr: -v connections, -vv debugging",
    )
    ping = argparse.ArgumentParser(add_help=False)
    ping.add_argument(
        "--ping-period",
        type=_non_negative(float),
        default=60.0,
        metavar="SECONDS",
        help="check the connection after this long without notifications;"
        " 0 never checks (default: 60)",
    )

    listen = commands.add_parser(
        "listen",
        parents=[common, ping],
        help="print the notifications of channels as they arrive",
        description=_wrap(
            "Print each notification of the CHANNELs as it arrives, one"
            " line each, on stdout; status lines go to stderr. Runs until stopped."
        ),
        epilog=CONNECTION_HELP + "\n" + STOP_HELP,
        formatter_class=formatter,
    )
    listen.add_argument("channels", nargs="+", type=_channel, metavar="CHANNEL")
    listen.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: channel, payload, pid, time",
    )
    listen.set_defaults(func=cmd_listen)

    run = commands.add_parser(
        "run",
        parents=[common, ping],
        help="serve the callbacks of the installed handler plugins",
        description=_wrap(
            "Start a listener with every plugin installed under the"
            f" {PROJECT_NAME!r} entry-point group and serve until stopped. The"
            " CLASSIC_PG_LISTENER_* environment switches apply (see the plugin"
            " author's guide). A plugin that fails to load stops it with exit status 1."
        ),
        epilog=CONNECTION_HELP + "\n" + STOP_HELP,
        formatter_class=formatter,
    )
    run.add_argument(
        "--workers",
        type=_non_negative(int),
        default=None,
        metavar="N",
        help="threads running the callbacks; 0 runs them in the serving thread"
        " (default: min(32, CPUs + 4))",
    )
    run.add_argument(
        "--no-autoload",
        action="store_true",
        help="load no entry-point plugin, whatever the environment says",
    )
    run.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NAME",
        help="never load the plugin of this entry-point name (repeatable)",
    )
    run.set_defaults(func=cmd_run)

    plugins = commands.add_parser(
        "plugins",
        help="list the installed plugins",
        description=_wrap(
            "List the plugins installed under the"
            f" {PROJECT_NAME!r} entry-point group: name, distribution, version,"
            " hooks implemented, channels contributed. A plugin that fails to load"
            " is shown with its error, and the exit status is then 1. Opens no"
            " connection."
        ),
        formatter_class=formatter,
    )
    plugins.add_argument("--json", action="store_true", help="print a JSON array")
    plugins.set_defaults(func=cmd_plugins)

    notify = commands.add_parser(
        "notify",
        parents=[common],
        help="send one notification",
        description="Send one notification (pg_notify(CHANNEL, PAYLOAD)).",
        epilog=CONNECTION_HELP,
        formatter_class=formatter,
    )
    notify.add_argument("channel", type=_channel, metavar="CHANNEL")
    notify.add_argument("payload", nargs="?", default="", metavar="PAYLOAD")
    notify.set_defaults(func=cmd_notify)
    demo.add_parser(commands, common, formatter)
    doctor.add_command(commands, [common], CONNECTION_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = getattr(args, "verbose", 0)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)],
        format="pg-listener: %(levelname)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except ConnectionFailed as ex:
        status(str(ex))
        return EXIT_CONNECTION
    except KeyboardInterrupt:
        status("interrupted")
        return exit_now(EXIT_INTERRUPTED)
    if sys.stdout.closed:
        return result
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the pipe again at exit: point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return result
